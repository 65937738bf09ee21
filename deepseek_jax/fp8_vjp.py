"""Custom VJPs of the FP8 linears: Fprop, Dgrad and Wgrad all on E4M3 operands.

Tile orientations (the design note in ``fp8.py``): Fprop x 1x128 along K with W in
128x128 blocks; Dgrad dy 1x128 along N with the same W blocks transposed; Wgrad x and dy
both re-tiled along tokens. The Fprop input is kept for Wgrad already re-tiled, in FP8.

Shape letters: B a leading batch of GEMMs in ``fp8_dot`` but 128-row blocks in the grouped
path, M rows, K contraction, N output columns, G and H 128-wide scale tiles, E experts, P
padded rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import deepseek_jax.fp8_gemm as fp8_gemm
import deepseek_jax.fp8_quant as fp8_quant


def _quantize_weight(w_BKN, pow2: bool):
    """W^T [B, N, K] in 128x128 blocks and its per-row scales, plus the same for W."""
    wq_BNK, s_BHG = fp8_quant.quantize_blocks(jnp.swapaxes(w_BKN, 1, 2), pow2=pow2)
    N, K = wq_BNK.shape[1:]
    wq_BKN, s_BGH = jnp.swapaxes(wq_BNK, 1, 2), jnp.swapaxes(s_BHG, 1, 2)
    return (wq_BNK, fp8_quant.block_rows(s_BHG, N)), (wq_BKN, fp8_quant.block_rows(s_BGH, K))


def _tokens_major(x_BMK, pow2: bool):
    """x^T [B, K, M] tiled 1x128 along tokens (x's 128x1 tiles), for Wgrad."""
    return fp8_quant.quantize_tiles(jnp.swapaxes(x_BMK, 1, 2), axis=-1, pow2=pow2)


# ---------------------------------------------------------------------------- dense


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def fp8_dot(x_BMK, w_BKN, backend, pow2):
    """y[b] = x[b] w[b] in x's dtype; b batches experts (1 for a plain linear)."""
    return _dot_fwd(x_BMK, w_BKN, backend, pow2)[0]


def _dot_fwd(x_BMK, w_BKN, backend, pow2):
    xq, sx = fp8_quant.quantize_tiles(x_BMK, axis=-1, pow2=pow2)
    w_nt, _ = _quantize_weight(w_BKN, pow2)
    y_BMN = fp8_gemm.scaled_matmul(xq, sx, *w_nt, backend=backend, out_dtype=x_BMK.dtype)
    res = (_tokens_major(x_BMK, pow2), w_BKN, jnp.zeros((0,), x_BMK.dtype))
    return y_BMN, res


def _dot_bwd(backend, pow2, res, dy_BMN):
    (xq_BKM, sx_BKG), w_BKN, x_dtype = res
    _, w_kn = _quantize_weight(w_BKN, pow2)
    dyq, sdy = fp8_quant.quantize_tiles(dy_BMN, axis=-1, pow2=pow2)  # Dgrad: 1x128 along N
    dx = fp8_gemm.scaled_matmul(dyq, sdy, *w_kn, backend=backend, out_dtype=x_dtype.dtype)
    dyq_t, sdy_t = _tokens_major(dy_BMN, pow2)  # Wgrad: along tokens
    dw = fp8_gemm.scaled_matmul(
        xq_BKM, sx_BKG, dyq_t, sdy_t, backend=backend, out_dtype=w_BKN.dtype
    )
    return dx, dw


fp8_dot.defvjp(_dot_fwd, _dot_bwd)


# ---------------------------------------------------------------------------- grouped


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def fp8_grouped_dot(x_PK, w_EKN, group_ids_B, backend):
    """y = x w[group of each 128-row block], rows in the m-grouped contiguous layout."""
    return _grouped_fwd(x_PK, w_EKN, group_ids_B, backend)[0]


def _grouped_fwd(x_PK, w_EKN, group_ids_B, backend):
    xq, sx = fp8_quant.quantize_tiles(x_PK, axis=-1)
    w_nt, _ = _quantize_weight(w_EKN, False)
    y = fp8_gemm.grouped_scaled_matmul(
        xq, sx, *w_nt, group_ids_B, backend=backend, out_dtype=x_PK.dtype
    )
    xt = _tokens_major(x_PK[None], False)
    return y, (xt, w_EKN, group_ids_B, jnp.zeros((0,), x_PK.dtype))


def _grouped_bwd(backend, res, dy_PN):
    (xq_1KP, sx_1KB), w_EKN, group_ids_B, x_dtype = res
    _, w_kn = _quantize_weight(w_EKN, False)
    dyq, sdy = fp8_quant.quantize_tiles(dy_PN, axis=-1)
    dx = fp8_gemm.grouped_scaled_matmul(
        dyq, sdy, *w_kn, group_ids_B, backend=backend, out_dtype=x_dtype.dtype
    )
    dw = _k_grouped_wgrad(
        xq_1KP[0],
        sx_1KB[0],
        *_tokens_major(dy_PN[None], False),
        group_ids_B,
        w_EKN.shape[0],
        backend,
    )
    return dx, dw.astype(w_EKN.dtype), None


def _k_grouped_wgrad(xq_KP, sx_KB, dyq_1NP, sdy_1NB, group_ids_B, E, backend):
    """dW_e = sum over e's 128-token blocks of x_b^T dy_b: one promoted K slice per block."""
    B = group_ids_B.shape[0]
    K, N = xq_KP.shape[0], dyq_1NP.shape[1]
    a = jnp.swapaxes(xq_KP.reshape(K, B, fp8_quant.TILE), 0, 1)  # [B, K, 128]
    b = jnp.swapaxes(dyq_1NP[0].reshape(N, B, fp8_quant.TILE), 0, 1)  # [B, N, 128]
    sa, sb = jnp.swapaxes(sx_KB, 0, 1)[:, :, None], jnp.swapaxes(sdy_1NB[0], 0, 1)[:, :, None]
    part_BKN = fp8_gemm.scaled_matmul(a, sa, b, sb, backend=backend)
    return jax.ops.segment_sum(part_BKN, group_ids_B, num_segments=E)


fp8_grouped_dot.defvjp(_grouped_fwd, _grouped_bwd)
