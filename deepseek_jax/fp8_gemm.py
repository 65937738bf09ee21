"""Block-scaled FP8 GEMMs (the NT form of the ``fp8.py`` design note) on either backend.

``scaled_matmul_reference`` is the slow twin; ``scaled_matmul`` runs ``xla`` (plain jnp)
or ``pallas`` (``pallas_kernels/fp8_matmul.py``); ``grouped_scaled_matmul`` takes rows in
the m-grouped contiguous layout that ``contiguous_layout`` builds.

Shape letters: M rows, K contraction, N output columns (not experts per token / nope dim), G
K/128 scale tiles, E experts, B 128-row blocks (M = 128 B), P padded positions.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

import pallas_kernels.fp8_matmul as kernels
from deepseek_jax.config import Fp8Backend
from deepseek_jax.fp8_quant import TILE, cdiv, pad_to_multiple


def scaled_matmul_reference(
    a8_MK: Array, sa_MG: Float[Array, "M G"], b8_NK: Array, sb_NG: Float[Array, "N G"]
) -> Float[Array, "M N"]:
    """out = sum_g (a[:, g] . b[:, g]) sa[:, g] sb[:, g]^T, in FP32 (the slow twin).

    Each 128-wide K slice g is accumulated on its own in FP32 (exact FP8 products, FP32
    sums, ``HIGHEST`` precision so no TF32 on GPU), scaled by both operands' scales, then
    added: promotion every 128 elements (V3TR 3.3.2).
    """
    G = sa_MG.shape[-1]
    a = pad_to_multiple(a8_MK.astype(jnp.float32), -1, TILE).reshape(a8_MK.shape[0], G, TILE)
    b = pad_to_multiple(b8_NK.astype(jnp.float32), -1, TILE).reshape(b8_NK.shape[0], G, TILE)
    part_GMN = jnp.einsum("mgk,ngk->gmn", a, b, precision=lax.Precision.HIGHEST)
    return jnp.sum(part_GMN * sa_MG.T[:, :, None] * sb_NG.T[:, None, :], axis=0)


def _scaled_matmul_xla(a8, sa, b8, sb, out_dtype):
    """Batched ([Bt, M, K] x [Bt, N, K]) FP8 dot per K slice, then the scaled FP32 sum."""
    Bt, M, K = a8.shape
    N, G = b8.shape[1], sa.shape[-1]
    a = pad_to_multiple(a8, -1, TILE).reshape(Bt, M, G, TILE)
    b = pad_to_multiple(b8, -1, TILE).reshape(Bt, N, G, TILE)
    dims = (((3,), (3,)), ((0, 2), (0, 2)))
    part = lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)  # [Bt, G, M, N]
    sa_t, sb_t = jnp.swapaxes(sa, 1, 2), jnp.swapaxes(sb, 1, 2)
    out = jnp.sum(part * sa_t[:, :, :, None] * sb_t[:, :, None, :], axis=1)
    return out.astype(out_dtype)


def scaled_matmul(
    a8: Array,
    sa: Array,
    b8: Array,
    sb: Array,
    *,
    backend: Fp8Backend = "xla",
    out_dtype=jnp.float32,
) -> Array:
    """The NT block-scaled GEMM on either backend, batched over an optional leading axis.

    Args:
      a8: E4M3 [(Bt,) M, K]; sa: FP32 [(Bt,) M, ceil(K/128)].
      b8: E4M3 [(Bt,) N, K] (K-major); sb: FP32 [(Bt,) N, ceil(K/128)].
    Returns:
      [(Bt,) M, N] in ``out_dtype``, accumulated in FP32 with per-128-K promotion.
    """
    batched = a8.ndim == 3
    if not batched:
        a8, sa, b8, sb = a8[None], sa[None], b8[None], sb[None]
    if backend == "xla":
        out = _scaled_matmul_xla(a8, sa, b8, sb, out_dtype)
    elif backend == "pallas":
        out = kernels.fp8_matmul(a8, sa, b8, sb, out_dtype=out_dtype)
    else:
        raise ValueError(f"fp8 backend must be 'xla' or 'pallas', got {backend!r}")
    return out if batched else out[0]


def grouped_scaled_matmul(
    a8_MK: Array,
    sa_MG: Array,
    b8_ENK: Array,
    sb_ENG: Array,
    group_ids_B: Int[Array, " B"],
    *,
    backend: Fp8Backend = "xla",
    out_dtype=jnp.float32,
) -> Array:
    """m-grouped contiguous NT GEMM: 128-row block b of ``a`` uses expert group_ids[b].

    Args:
      a8_MK: rows sorted by expert, each expert's rows padded to a multiple of 128
        (M = 128 B); sa_MG its 1x128 scales.
      b8_ENK, sb_ENG: per-expert K-major weights and per-row scales.
      group_ids_B: the expert of each 128-row block.
    """
    if backend == "pallas":
        return kernels.fp8_grouped_matmul(
            a8_MK, sa_MG, b8_ENK, sb_ENG, group_ids_B, out_dtype=out_dtype
        )
    if backend != "xla":
        raise ValueError(f"fp8 backend must be 'xla' or 'pallas', got {backend!r}")
    B = group_ids_B.shape[0]
    a = a8_MK.reshape(B, TILE, -1)
    sa = sa_MG.reshape(B, TILE, -1)
    # Gathering whole expert weights per row block: fine for tests and small MoEs.
    out = _scaled_matmul_xla(a, sa, b8_ENK[group_ids_B], sb_ENG[group_ids_B], out_dtype)
    return out.reshape(B * TILE, -1)


def contiguous_layout(
    group_sizes_E: Int[Array, " E"], rows: int
) -> tuple[Int[Array, " P"], Int[Array, " B"]]:
    """Padded positions of ``rows`` expert-sorted rows, each group padded to 128.

    Returns:
      row_P: source row of each padded position (``rows`` for padding), static
        P = 128 * (ceil(rows / 128) + E), enough for any group sizes.
      group_ids_B: the expert of each 128-row block (the last expert for unused blocks).
    """
    E = group_sizes_E.shape[0]
    B = cdiv(rows, TILE) + E
    sizes = group_sizes_E.astype(jnp.int32)
    blocks_E = (sizes + TILE - 1) // TILE
    pstart_E = (jnp.cumsum(blocks_E) - blocks_E) * TILE
    start_E = jnp.cumsum(sizes) - sizes
    p = jnp.arange(B * TILE, dtype=jnp.int32)
    group_ids_B = jnp.minimum(
        jnp.searchsorted(jnp.cumsum(blocks_E), jnp.arange(B), side="right"), E - 1
    ).astype(jnp.int32)
    e_P = jnp.repeat(group_ids_B, TILE)
    local = p - pstart_E[e_P]
    valid = (local >= 0) & (local < sizes[e_P])
    row_P = jnp.where(valid, start_E[e_P] + local, rows)
    return row_P, group_ids_B
