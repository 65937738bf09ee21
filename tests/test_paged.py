"""Paged latent cache: the page allocator, and paged decode == dense-cache decode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.infer.generate import UnrolledDecoder
from deepseek_jax.infer.paged import TRASH_PAGE, PageAllocator, PagedDecoder
from deepseek_jax.model import Transformer
from deepseek_jax.presets import get_preset

CFG = get_preset("tiny")
P, M = 4, 4  # page size, page-table slots: 16 positions per request


@pytest.fixture(scope="module")
def model():
    return Transformer(CFG, rngs=nnx.Rngs(3))


def _dense(dec, ids_BT, prompt_len):
    cache = dec.init_cache(ids_BT.shape[0], M * P)
    out, cache = dec.decode(ids_BT[:, :prompt_len], cache, jnp.int32(0))
    outs = [out]
    for t in range(prompt_len, ids_BT.shape[1]):
        out, cache = dec.decode(ids_BT[:, t : t + 1], cache, jnp.int32(t))
        outs.append(out)
    return jnp.concatenate(outs, axis=1)


def _paged(dec, ids_BT, table_BM, prompt_lens):
    """Prefill each row's own prompt length (padded to the longest), then one token at a
    time; the logits of row b at its position t, [B, S - min prompt + 1, V] aligned to the
    dense layout by the caller."""
    caches = dec.init_cache(16, P)
    B, S = ids_BT.shape
    lens_B = jnp.zeros((B,), jnp.int32)
    out, _, caches = dec.forward(ids_BT[:, : max(prompt_lens)], caches, table_BM, lens_B)
    outs = {b: [out[b, : prompt_lens[b]]] for b in range(B)}
    for i in range(S - min(prompt_lens)):
        lens = [n + i for n in prompt_lens]
        tok_B1 = ids_BT[jnp.arange(B), jnp.minimum(jnp.asarray(lens), S - 1)][:, None]
        out, _, caches = dec.forward(tok_B1, caches, table_BM, jnp.asarray(lens, jnp.int32))
        for b in range(B):
            if lens[b] < S:
                outs[b].append(out[b])
    return [jnp.concatenate(outs[b], axis=0)[:S] for b in range(B)]


def test_paged_logits_identical_to_dense_cache(model):
    """Scattered pages, two rows at different lengths: row 0's logits equal the dense
    cache's exactly (same einsums over the same keys, float32)."""
    ids = jax.random.randint(jax.random.key(0), (2, 12), 0, CFG.vocab_size)
    dense = nnx.jit(_dense, static_argnums=2)(UnrolledDecoder(model), ids, 7)
    table = jnp.asarray([[3, 1, 7, 2], [5, 9, 4, 6]], jnp.int32)
    paged = nnx.jit(lambda d, i, t: _paged(d, i, t, (7, 4)))(PagedDecoder(model), ids, table)
    np.testing.assert_array_equal(paged[0], dense[0])  # the same calls as the dense cache
    # Row 1 prefilled 4 tokens and decoded the rest one by one: other matmul shapes.
    np.testing.assert_allclose(paged[1], dense[1], atol=1e-5, rtol=1e-5)


def test_allocator_books_grows_and_frees():
    a = PageAllocator(num_pages=6, page_size=4)  # 5 usable pages
    assert a.reserve("x", 9) and a.unbooked == 2 and a.in_use == 0  # 3 pages booked
    assert not a.reserve("y", 13)  # 4 pages: not there
    assert a.reserve("y", 8)
    px = a.grow("x", 5)
    assert len(px) == 2 and TRASH_PAGE not in px and a.in_use == 2
    with pytest.raises(ValueError, match="reservation"):
        a.grow("x", 13)
    py = a.grow("y", 8)
    assert not set(px) & set(py)
    a.free("x")
    assert a.in_use == 2 and a.unbooked == 3
    a.free("y")
    assert a.in_use == 0 and a.unbooked == 5
    with pytest.raises(ValueError, match="num_pages"):
        PageAllocator(1, 4)


@pytest.mark.parametrize("attention", ["xla", pytest.param("pallas", marks=pytest.mark.slow)])
def test_draft_and_head_at_the_kept_position_equal_all_positions(model, attention):
    """The MTP draft with ``keep_B`` (attention, MoE and head at one position per row) and
    the main head at one position give those positions' logits of the all-positions call,
    and write the same cache entries (both positions: a kept second draft needs the
    first's). Earlier positions hold random latents. ``pallas``: the decode kernel
    (interpret mode) at the kept position."""
    dec = PagedDecoder(model, attention=attention)
    table = jnp.asarray([[3, 1, 7, 2], [5, 9, 4, 6]], jnp.int32)
    ids = jax.random.randint(jax.random.key(1), (2, 7), 0, CFG.vocab_size)
    lens = jnp.asarray([5, 2], jnp.int32)
    keep = jnp.asarray([1, 0], jnp.int32)

    @nnx.jit
    def run(dec, ids, table, lens, keep):
        caches = [
            type(c)(
                *(jax.random.normal(jax.random.key(i), a.shape) for a in (c.ckv_NPC, c.krope_NPR))
            )
            for i, c in enumerate(dec.init_cache(16, P))
        ]
        head_at, h, caches = dec.forward(ids[:, 5:], caches, table, lens, head_at_B=keep)
        logits = dec.head(h)
        full, c_full = dec.draft(h, ids[:, 3:5], caches, table, lens)
        kept, c_kept = dec.draft(h, ids[:, 3:5], caches, table, lens, keep)
        return logits, head_at, full, c_full[-1], kept, c_kept[-1]

    logits, head_at, full, c_full, kept, c_kept = run(dec, ids, table, lens, keep)
    rows = jnp.arange(2)
    assert kept.shape == (2, 1, CFG.vocab_size) and head_at.shape == kept.shape
    np.testing.assert_allclose(head_at[:, 0], logits[rows, keep], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(kept[:, 0], full[rows, keep], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(c_kept.ckv_NPC, c_full.ckv_NPC)
    np.testing.assert_array_equal(c_kept.krope_NPR, c_full.krope_NPR)


def test_one_token_decode_writes_the_pool_in_place(model):
    """A batch-1, one-token step (the pool donated) copies no page pool: its cost must not
    grow with the pool (XLA:CPU fused the one-row write into the gather and copied the
    pool per layer before ``mla_paged``'s barrier)."""
    dec = PagedDecoder(model, attention="xla")
    g, state = nnx.split(dec)
    caches = dec.init_cache(64, P)

    def step(state, caches, tok_B1, table_BM, lens_B):
        logits, _, caches = nnx.merge(g, state).forward(tok_B1, caches, table_BM, lens_B)
        return logits, caches

    args = (state, caches, jnp.ones((1, 1), jnp.int32), jnp.asarray([[3, 1, 7, 2]]),
            jnp.asarray([5], jnp.int32))  # fmt: skip
    hlo = jax.jit(step, donate_argnums=1).lower(*args).compile().as_text()
    pool = f"f32[64,{P},{CFG.kv_lora_rank}]"
    copies = [ln for ln in hlo.splitlines() if f"= {pool}" in ln and " copy(" in ln]
    assert "dynamic-update-slice" in hlo and not copies, copies[:2]
