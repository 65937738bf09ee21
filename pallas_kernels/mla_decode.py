"""MLA decode attention over the paged latent cache, in the spirit of FlashMLA.

One decode token per request. All H heads of a request attend to the same latent keys
(the absorbed query ``[q_lat; q_rope]`` against ``[c_kv; k_rope]``, values = ``c_kv``),
so a program loads each page once for a block of heads: the scores are one [Hb, C+R] x
[C+R, P] product per page instead of Hb matrix-vector products. The sequence is split:
program (g, b, s) runs an online softmax of head block g over its share of request b's
pages (read through the page table) and writes a partial output with its running max and
sum; ``mla_decode`` merges the splits by log-sum-exp. Long contexts thus use more programs
than there are requests.

Head blocks (as FlashMLA's 64 heads per block on Hopper): a program keeps a float32
[Hb, C] accumulator. With all of V3's H=128 heads in one block (C=512) that is 256 KiB,
and a deviceless compile for an H200 asks 346 KB of shared memory, over the 227 KiB a
block may have; Hb=64 fits. The trade-off: each page is loaded once per head block, H / Hb
times per step. The head-block axis leads the grid, which Triton launches fastest, so the
programs that read the same pages run side by side and repeats can come from L2 (not
measured). A ragged last block is padded with zero queries, whose rows are dropped.

Layout: ``qlat_BHC``, ``qrope_BHR`` (already scaled), the pool ``ckv_NPC``, ``krope_NPR``,
``table_BM`` page ids, ``n_keys_B`` visible positions per request (its own included).
Output: the probability-weighted latent ``olat_BHC`` (float32). ``mla_decode_reference``
is the plain-jnp twin (gather the pages, masked softmax).

Shape letters: B requests, H heads (G blocks of Hb), C kv_lora_rank, R rope dim, N pages
(not nope dim), P positions per page, M page slots per request, S splits in the kernel but
key positions (M P) in the reference.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from deepseek_jax.attention_core import latent_attention

NEG = -1e30  # finite "minus infinity": an all-masked split must not make exp(nan)


@dataclasses.dataclass(frozen=True)
class Blocks:
    pages_per_split: int = 8  # pages one program walks; splits = ceil(M / this)
    heads_per_block: int = 64  # heads one program holds (clamped to H); see the docstring


def _kernel(table_ref, nkeys_ref, qlat_ref, qrope_ref, ckv_ref, krope_ref,
            o_ref, m_ref, l_ref, *, pages_per_split: int, page_size: int):  # fmt: skip
    # table[B, M], nkeys[B]; qlat[1, Hb, C], qrope[1, Hb, R] (head block g of request b);
    # ckv[N, P, C], krope[N, P, R] (whole pool); o[1, 1, Hb, C], m/l[1, 1, Hb]
    b, s = pl.program_id(1), pl.program_id(2)
    qlat_HC = qlat_ref[0].astype(jnp.float32)
    qrope_HR = qrope_ref[0].astype(jnp.float32)
    n_keys = nkeys_ref[b]
    H, C = qlat_HC.shape

    def page(i, carry):
        m_H, l_H, acc_HC = carry
        j = s * pages_per_split + i  # page slot in the table
        pid = table_ref[b, j]
        ckv_PC = ckv_ref[pid].astype(jnp.float32)
        krope_PR = krope_ref[pid].astype(jnp.float32)
        dims = (((1,), (1,)), ((), ()))  # contract the feature axes: [H, K] x [P, K]
        s_HP = jax.lax.dot_general(qlat_HC, ckv_PC, dims, preferred_element_type=jnp.float32)
        s_HP += jax.lax.dot_general(qrope_HR, krope_PR, dims, preferred_element_type=jnp.float32)
        pos_1P = j * page_size + jax.lax.broadcasted_iota(jnp.int32, (1, page_size), 1)
        visible_1P = pos_1P < n_keys
        s_HP = jnp.where(visible_1P, s_HP, NEG)
        m_new_H = jnp.maximum(m_H, s_HP.max(axis=1))
        p_HP = jnp.where(visible_1P, jnp.exp(s_HP - m_new_H[:, None]), 0.0)
        alpha_H = jnp.exp(m_H - m_new_H)
        acc_HC = alpha_H[:, None] * acc_HC + jnp.dot(p_HP, ckv_PC)
        return m_new_H, alpha_H * l_H + p_HP.sum(axis=1), acc_HC

    init = (jnp.full((H,), NEG, jnp.float32), jnp.zeros((H,), jnp.float32),
            jnp.zeros((H, C), jnp.float32))  # fmt: skip
    m_H, l_H, acc_HC = jax.lax.fori_loop(0, pages_per_split, page, init)
    o_ref[0, 0] = acc_HC
    m_ref[0, 0] = m_H
    l_ref[0, 0] = l_H


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def mla_decode(
    qlat_BHC: Float[Array, "B H C"],
    qrope_BHR: Float[Array, "B H R"],
    ckv_NPC: Float[Array, "N P C"],
    krope_NPR: Float[Array, "N P R"],
    table_BM: Int[Array, "B M"],
    n_keys_B: Int[Array, " B"],
    *,
    blocks: Blocks = Blocks(),
    interpret: bool = False,
) -> Float[Array, "B H C"]:
    """softmax(q_lat c^T + q_rope k_rope^T) c over each request's first n_keys positions."""
    B, H, C = qlat_BHC.shape
    R = qrope_BHR.shape[-1]
    N, P, _ = ckv_NPC.shape
    M = table_BM.shape[1]
    if blocks.heads_per_block < 1:
        raise ValueError(f"Blocks.heads_per_block={blocks.heads_per_block}: must be >= 1")
    if blocks.pages_per_split < 1:
        raise ValueError(f"Blocks.pages_per_split={blocks.pages_per_split}: must be >= 1")
    hb = min(blocks.heads_per_block, H)
    G = -(-H // hb)
    pad_H = ((0, 0), (0, G * hb - H), (0, 0))  # ragged last block: zero queries, dropped
    qlat_BHC, qrope_BHR = jnp.pad(qlat_BHC, pad_H), jnp.pad(qrope_BHR, pad_H)
    per = min(blocks.pages_per_split, M)
    S = -(-M // per)
    table_BM = jnp.pad(table_BM, ((0, 0), (0, S * per - M)))  # padded slots: masked anyway
    whole = lambda shape: pl.BlockSpec(shape, lambda g, b, s: (0,) * len(shape))  # noqa: E731
    o, m, l = pl.pallas_call(
        functools.partial(_kernel, pages_per_split=per, page_size=P),
        grid=(G, B, S),  # g first: launched fastest, the head blocks of a split side by side
        in_specs=[
            whole(table_BM.shape),
            whole((B,)),
            pl.BlockSpec((1, hb, C), lambda g, b, s: (b, g, 0)),
            pl.BlockSpec((1, hb, R), lambda g, b, s: (b, g, 0)),
            whole((N, P, C)),
            whole((N, P, R)),
        ],
        out_specs=[
            pl.BlockSpec((1, 1, hb, C), lambda g, b, s: (b, s, g, 0)),
            pl.BlockSpec((1, 1, hb), lambda g, b, s: (b, s, g)),
            pl.BlockSpec((1, 1, hb), lambda g, b, s: (b, s, g)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, S, G * hb, C), jnp.float32),
            jax.ShapeDtypeStruct((B, S, G * hb), jnp.float32),
            jax.ShapeDtypeStruct((B, S, G * hb), jnp.float32),
        ],
        interpret=interpret,
    )(table_BM, n_keys_B, qlat_BHC, qrope_BHR, ckv_NPC, krope_NPR)
    return merge_splits(o[:, :, :H], m[:, :, :H], l[:, :, :H])


def merge_splits(o_BSHC, m_BSH, l_BSH) -> Float[Array, "B H C"]:
    """Log-sum-exp merge of per-split softmax partials (each normalised by its own max)."""
    mx_BH = m_BSH.max(axis=1)
    w_BSH = jnp.exp(m_BSH - mx_BH[:, None])
    num_BHC = (w_BSH[..., None] * o_BSHC).sum(axis=1)
    return num_BHC / (w_BSH * l_BSH).sum(axis=1)[..., None]


def mla_decode_reference(qlat_BHC, qrope_BHR, ckv_NPC, krope_NPR, table_BM, n_keys_B):
    """The plain-jnp twin: gather each request's pages, then the latent attention of the
    engine's jnp path (queries already scaled), one query per request."""
    B, M = table_BM.shape
    P = ckv_NPC.shape[1]
    f32 = jnp.float32
    ckv_BSC = ckv_NPC[table_BM].reshape(B, M * P, -1).astype(f32)
    krope_BSR = krope_NPR[table_BM].reshape(B, M * P, -1).astype(f32)
    visible_BS = jnp.arange(M * P)[None, :] < n_keys_B[:, None]
    q_B1HC, q_B1HR = qlat_BHC[:, None].astype(f32), qrope_BHR[:, None].astype(f32)
    out_B1HC = latent_attention(q_B1HC, q_B1HR, ckv_BSC, krope_BSR, visible_BS[:, None], 1.0)
    return out_B1HC[:, 0]
