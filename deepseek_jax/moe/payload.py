"""Moving payload rows across the mesh: gather into send buffers (optionally FP8), all-to-all,
and the weighted sum back to token order; each with our Pallas kernel or its jnp twin.

The kernels (``pallas_kernels/dispatch.py``) are not differentiable as Pallas calls, so
each gets a custom VJP here: the transpose of a gather is a scatter-add, that of the
weighted combine a scatter-add of the weighted cotangent (and a row gather for the
weights). The FP8 send is straight-through: quantise, all_to_all codes and scales,
dequantise; its cotangent travels back in the compute dtype.

Shape letters: S source rows, T tokens, J rows per token to combine, R received rows, P
peers, C capacity per peer, D hidden, B 128-wide scale tiles of D (not batch).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

import deepseek_jax.logfmt as logfmt
import pallas_kernels.dispatch as kernels
from deepseek_jax.config import KernelBackend


def all_to_all(x_P, axis):
    """Block p of the leading axis goes to peer p; block q of the result came from q."""
    return jax.lax.all_to_all(x_P, axis, 0, 0, tiled=True)


def send(
    x_SD, src_PC, axis, *, fp8: bool, kernel: KernelBackend, logfmt_bits: int = 0
) -> Float[Array, "P C D"]:
    """The rows ``x[src]`` (zero where ``src`` is out of range) sent to their peers: row block
    p of the [P, C] buffer goes to peer p. Returns what arrives, in x's dtype."""
    P, C = src_PC.shape
    if logfmt_bits:
        return _send_logfmt(x_SD, src_PC, axis, logfmt_bits)
    if fp8:
        return _send_fp8(x_SD, src_PC, axis, kernel)
    x_PCD = _gather(x_SD, src_PC.reshape(-1), kernel).reshape(P, C, -1)
    return all_to_all(x_PCD, axis)


def _gather(x_SD, src_R, kernel: KernelBackend):
    if kernel == "pallas":
        return _gather_pallas(x_SD, src_R)
    return kernels.permute_quantize_reference(x_SD, src_R, quantize=False)


def _scatter_add(g_RD, src_R, rows: int):
    """Transpose of the gather: rows of g summed into their sources."""
    out = jnp.zeros((rows, g_RD.shape[-1]), g_RD.dtype)
    return out.at[src_R].add(g_RD, mode="drop")


@jax.custom_vjp
def _gather_pallas(x_SD, src_R):
    return kernels.permute_quantize(x_SD, src_R, quantize=False)


def _gather_pallas_fwd(x_SD, src_R):
    return _gather_pallas(x_SD, src_R), (src_R, x_SD.shape[0])


def _gather_pallas_bwd(res, g_RD):
    src_R, rows = res
    return _scatter_add(g_RD, src_R, rows), None


_gather_pallas.defvjp(_gather_pallas_fwd, _gather_pallas_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _send_fp8(x_SD, src_PC, axis, kernel: KernelBackend):
    """FP8 dispatch: gather + quantise (1x128 tiles), all_to_all of codes and scales,
    dequantise. The backward sends the cotangent back in x's dtype (straight through)."""
    P, C = src_PC.shape
    src_R = src_PC.reshape(-1)
    if kernel == "pallas":
        q_RD, s_RB = kernels.permute_quantize(x_SD, src_R)
    else:
        q_RD, s_RB = kernels.permute_quantize_reference(x_SD, src_R)
    # The codes travel as bytes: collectives need not know FP8 types.
    bytes_PCD = all_to_all(jax.lax.bitcast_convert_type(q_RD, jnp.uint8).reshape(P, C, -1), axis)
    q_PCD = jax.lax.bitcast_convert_type(bytes_PCD, q_RD.dtype)
    s_PCB = all_to_all(s_RB.reshape(P, C, -1), axis)
    return kernels.dequantize_rows(q_PCD, s_PCB, x_SD.dtype)


def _send_fp8_fwd(x_SD, src_PC, axis, kernel):
    return _send_fp8(x_SD, src_PC, axis, kernel), (src_PC, x_SD.shape[0])


def _send_bwd(axis, _codec, res, g_PCD):
    """Straight-through: the cotangent goes back in the compute dtype, scattered to rows."""
    src_PC, rows = res
    g_RD = all_to_all(g_PCD, axis).reshape(-1, g_PCD.shape[-1])
    return _scatter_add(g_RD, src_PC.reshape(-1), rows), None


_send_fp8.defvjp(_send_fp8_fwd, _send_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _send_logfmt(x_SD, src_PC, axis, n_bits: int):
    """LogFMT-n dispatch: gather, encode 1x128 tiles (codes + per-tile log range), all_to_all,
    decode. Rows are zero-padded to whole tiles (zeros encode exactly). Straight-through
    backward, as the FP8 send."""
    P, C = src_PC.shape
    D = x_SD.shape[1]
    x_RD = kernels.permute_quantize_reference(x_SD, src_PC.reshape(-1), quantize=False)
    x_RD = jnp.pad(x_RD, ((0, 0), (0, -D % logfmt.TILE)))
    enc = logfmt.logfmt_encode(x_RD, n_bits)
    moved = logfmt.LogFMTTiles(*(all_to_all(a.reshape(P, C, -1), axis) for a in enc))
    return logfmt.logfmt_decode(moved, n_bits, x_SD.dtype)[..., :D]


def _send_logfmt_fwd(x_SD, src_PC, axis, n_bits):
    return _send_logfmt(x_SD, src_PC, axis, n_bits), (src_PC, x_SD.shape[0])


_send_logfmt.defvjp(_send_logfmt_fwd, _send_bwd)


def combine_rows(y_SD, row_TJ, w_TJ, kernel: KernelBackend) -> Float[Array, "T D"]:
    """sum_j w[t, j] y[row[t, j]] in float32 (w None: all ones)."""
    if w_TJ is None:
        w_TJ = jnp.ones(row_TJ.shape, jnp.float32)
    if kernel == "pallas":
        return _combine_pallas(y_SD, row_TJ, w_TJ)
    return kernels.combine_reference(y_SD, row_TJ, w_TJ)


@jax.custom_vjp
def _combine_pallas(y_SD, row_TJ, w_TJ):
    return kernels.combine(y_SD, row_TJ, w_TJ)


def _combine_pallas_fwd(y_SD, row_TJ, w_TJ):
    return _combine_pallas(y_SD, row_TJ, w_TJ), (y_SD, row_TJ, w_TJ)


def _combine_pallas_bwd(res, g_TD):
    y_SD, row_TJ, w_TJ = res
    g_TJD = g_TD[:, None, :] * w_TJ[:, :, None]
    dy = _scatter_add(g_TJD.reshape(-1, g_TD.shape[1]), row_TJ.reshape(-1), y_SD.shape[0])
    y_TJD = jnp.take(y_SD, row_TJ, axis=0, mode="fill", fill_value=0).astype(jnp.float32)
    dw = jnp.sum(y_TJD * g_TD[:, None, :], axis=-1)
    return dy.astype(y_SD.dtype), None, dw.astype(w_TJ.dtype)


_combine_pallas.defvjp(_combine_pallas_fwd, _combine_pallas_bwd)
