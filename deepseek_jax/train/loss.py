"""The training objective: next-token CE + MTP CE + sequence-wise balance loss.

Shape letters: B batch, T positions, V vocab, K MTP depth (not experts per token), L layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from deepseek_jax.model import ModelOutput
from deepseek_jax.mtp import mtp_targets
from deepseek_jax.train.config import TrainConfig


def cross_entropy(
    logits_BTV: Float[Array, "B T V"],
    targets_BT: Int[Array, "B T"],
    mask_BT: Bool[Array, "B T"] | None = None,
) -> Float[Array, ""]:
    """Mean token cross-entropy in float32 over the positions where ``mask`` is true."""
    logits = logits_BTV.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
    nll = logz - picked
    if mask_BT is None:
        return nll.mean()
    m = mask_BT.astype(jnp.float32)
    return (nll * m).sum() / jnp.maximum(m.sum(), 1.0)


def total_loss(
    out: ModelOutput, ids_BT1: Int[Array, "B T+1"], cfg: TrainConfig
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """Loss on a batch of T+1 tokens: inputs ids[:, :-1], targets ids[:, 1:].

    MTP depth k at position i predicts ids[i + k + 1] (relative to the inputs), which for the
    last positions lies beyond the window: those positions are masked out.
    """
    ce = cross_entropy(out.logits_BTV, ids_BT1[:, 1:])
    terms = {"ce": ce}
    loss = ce
    if out.mtp_logits_KBTV is not None:
        mtp = []
        for j in range(out.mtp_logits_KBTV.shape[0]):
            # Depth j + 1 predicts ids[i + j + 2]: valid for the first T - (j + 1) positions.
            tgt, valid = mtp_targets(ids_BT1, j + 1)
            mtp.append(cross_entropy(out.mtp_logits_KBTV[j], tgt[:, :-1], valid[:, :-1]))
        terms["mtp_ce"] = jnp.mean(jnp.stack(mtp))
        loss = loss + cfg.mtp_weight * terms["mtp_ce"]
    balance = jnp.zeros((), jnp.float32)
    for stats in (out.moe_stats, out.mtp_stats):
        if stats is not None:
            balance = balance + stats.balance_loss_L.sum()
    terms["balance"] = balance
    loss = loss + cfg.balance_alpha * balance
    terms["loss"] = loss
    return loss, terms
