"""The serving engine's compiled programs: a prefill chunk, a decode step, a speculative step.

Each is a pure function of (model state, page pool, batch arrays) that returns new tokens
and the pool (donated). ``PagedDecoder`` is rebuilt from (graphdef, state) inside the
trace. Shapes are fixed by the caller's buckets. Shape letters: B decode rows, R prefill
requests, T prompt tokens, M page-table slots, D hidden, V vocab; digits are literal sizes.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

import deepseek_jax.backends as backends
from deepseek_jax.infer.sampling import RowSampling, distribution, sample, verify

DRAFT_STREAM = 3  # the random stream of MTP drafts (0: tokens; 1, 2: verification)


@backends.forward_only
def prefill_chunk(
    graphdef, state, caches, ids_RT, next_ids_RT, last_R, lens_R, table_RM, samp, final_R, *, mtp
):
    """One prompt chunk of each of R requests: row r's tokens at positions ``lens_R[r] ..``
    (the first ``last_R[r] + 1`` real; padding rows point at the trash page, and also
    fill a mesh's batch axis). Samples each row's token after position ``last_R`` (used on
    a request's final chunk, ``final_R``). With ``mtp``, also runs the MTP layer over the
    chunk (its inputs: each position's hidden state and the token after it,
    ``next_ids_RT``, on a final chunk the sampled token after the prompt's last) and
    drafts the token after the sampled one.

    Returns (token [R], draft [R], draft distribution [R, V], caches); without ``mtp`` the
    draft is the token and the distribution is empty [R, 0].
    """
    dec = nnx.merge(graphdef, state)
    logits_R1V, h_RTD, caches = dec.forward(ids_RT, caches, table_RM, lens_R, head_at_B=last_R)
    pos_R = lens_R + last_R + 1  # position of the sampled token
    tok_R, _ = sample(logits_R1V[:, 0], samp, pos_R)
    if not mtp:
        return tok_R, tok_R, jnp.zeros((tok_R.shape[0], 0), jnp.float32), caches
    at_last_RT = jnp.arange(ids_RT.shape[1])[None, :] == last_R[:, None]
    next_ids_RT = jnp.where(at_last_RT & final_R[:, None], tok_R[:, None], next_ids_RT)
    dlogits_R1V, caches = dec.draft(h_RTD, next_ids_RT, caches, table_RM, lens_R, last_R)
    draft_R, q_RV = sample(dlogits_R1V[:, 0], samp, pos_R + 1, DRAFT_STREAM)
    return tok_R, draft_R, q_RV, caches


@backends.forward_only
def decode_step(graphdef, state, caches, tok_B, lens_B, table_BM, samp):
    """One token per row: ``tok_B`` goes into the cache at ``lens_B``; returns the next
    token [B] and the caches."""
    dec = nnx.merge(graphdef, state)
    logits_B1V, _, caches = dec.forward(tok_B[:, None], caches, table_BM, lens_B)
    nxt_B, _ = sample(logits_B1V[:, 0], samp, lens_B + 1)
    return nxt_B, caches


@backends.forward_only
def speculative_step(
    graphdef, state, caches, tok_B, draft_B, q_BV, lens_B, table_BM, samp: RowSampling
):
    """Verifies last step's MTP draft and drafts again (V3TR 2.2, used for decoding).

    The main model runs on [token, draft] at positions lens, lens + 1. Its first logits
    verify the draft (``sampling.verify``): y1 is the draft when accepted, else the
    corrected token; its second logits give y2, the token after an accepted draft. The MTP
    layer then writes its cache entries for (hidden at lens, y1) and (hidden at lens + 1,
    y2), and runs its attention, MoE and vocab head only at the last accepted position,
    whose output drafts the next token. A rejected draft's cache entries at lens + 1 (main
    and MTP) are rolled back by the caller advancing ``lens`` by one only.

    Returns (y1 [B], y2 [B], accepted [B] bool, next draft [B], its distribution [B, V],
    caches).
    """
    dec = nnx.merge(graphdef, state)
    ids_B2 = jnp.stack([tok_B, draft_B], axis=1)
    logits_B2V, h_B2D, caches = dec.forward(ids_B2, caches, table_BM, lens_B)
    p_BV = distribution(logits_B2V[:, 0], samp)
    accepted_B, y1_B = verify(draft_B, q_BV, p_BV, samp, lens_B + 1)
    y2_B, _ = sample(logits_B2V[:, 1], samp, lens_B + 2)
    idx_B = accepted_B.astype(jnp.int32)
    ids_B2 = jnp.stack([y1_B, y2_B], 1)
    dlogits_B1V, caches = dec.draft(h_B2D, ids_B2, caches, table_BM, lens_B, keep_B=idx_B)
    draft_B, q_BV = sample(dlogits_B1V[:, 0], samp, lens_B + 2 + idx_B, DRAFT_STREAM)
    return y1_B, y2_B, accepted_B, draft_B, q_BV, caches
