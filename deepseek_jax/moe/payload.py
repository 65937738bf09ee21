"""Moving payload rows across the mesh: gather into send buffers (optionally FP8), all-to-all,
and the weighted sum back to token order; each with our Pallas kernel or its jnp twin.

Everything a hop sends travels in ONE all_to_all (``exchange``): the payload rows and,
beside them in the same row, the expert ids and gate weights (and the FP8 scales), their
bits laid side by side in an unsigned carrier. A separate small transfer of ids would find
no compute of its own to hide behind on a GPU (in our compiles XLA ran one all-to-all at a
time), so it ran sync; the backward sends the gate weights' cotangents with the payload's.

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
import numpy as np
from jaxtyping import Array, Float

import deepseek_jax.logfmt as logfmt
import pallas_kernels.dispatch as kernels
from deepseek_jax.config import KernelBackend


def all_to_all(x_P, axis):
    """Block p of the leading axis goes to peer p; block q of the result came from q."""
    return jax.lax.all_to_all(x_P, axis, 0, 0, tiled=True)


def send(
    x_SD,
    src_PC,
    axis,
    *,
    fp8: bool,
    kernel: KernelBackend,
    logfmt_bits: int = 0,
    extras: tuple[Array, ...] = (),
) -> tuple[Float[Array, "P C D"], tuple[Array, ...]]:
    """The rows ``x[src]`` (zero where ``src`` is out of range) sent to their peers: row block
    p of the [P, C] buffer goes to peer p. ``extras``: [P, C, k] buffers (ids, gate weights)
    that travel in the payload's all_to_all. Returns (what arrives, in x's dtype; the
    extras received)."""
    P, C = src_PC.shape
    extras = tuple(extras)
    if logfmt_bits:
        x_PCD = _send_logfmt(x_SD, src_PC, axis, logfmt_bits)
        return x_PCD, exchange(extras, axis) if extras else ()
    if fp8:
        return _send_fp8(x_SD, src_PC, extras, axis, kernel)
    x_PCD = _gather(x_SD, src_PC.reshape(-1), kernel).reshape(P, C, -1)
    x_PCD, *rest = exchange((x_PCD, *extras), axis)
    return x_PCD, tuple(rest)


def packed_all_to_all(parts: tuple[Array, ...], axis) -> tuple[Array, ...]:
    """One all_to_all for [P, C, ...] buffers of any dtypes: their bits side by side in each
    row of an unsigned carrier as wide as the narrowest dtype (not differentiable)."""
    if len(parts) <= 1:
        return tuple(all_to_all(p, axis) for p in parts)
    size = min(jnp.dtype(p.dtype).itemsize for p in parts)
    carrier = jnp.dtype(f"uint{8 * size}")
    P, C = parts[0].shape[:2]
    bits = [jax.lax.bitcast_convert_type(p, carrier).reshape(P, C, -1) for p in parts]
    moved = all_to_all(jnp.concatenate(bits, axis=-1), axis)
    cuts = np.cumsum([b.shape[-1] for b in bits])[:-1]
    out = []
    for got, p in zip(jnp.split(moved, cuts, axis=-1), parts, strict=True):
        ratio = jnp.dtype(p.dtype).itemsize // size
        got = got.reshape(*p.shape, ratio) if ratio > 1 else got.reshape(p.shape)
        out.append(jax.lax.bitcast_convert_type(got, p.dtype))
    return tuple(out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def exchange(parts: tuple[Array, ...], axis) -> tuple[Array, ...]:
    """``packed_all_to_all``, differentiable: the float parts' cotangents go back together
    in one all_to_all (the transpose of a tiled all_to_all over axis 0 is itself)."""
    return packed_all_to_all(parts, axis)


def _exchange_fwd(parts, axis):
    return exchange(parts, axis), None


def _exchange_bwd(axis, _, g_parts):
    return (_send_back(g_parts, axis),)


def _send_back(g_parts, axis) -> tuple[Array | None, ...]:
    """The float cotangents back over ``axis`` in one all_to_all; None for integer parts."""
    live = [i for i, g in enumerate(g_parts) if jnp.issubdtype(g.dtype, jnp.inexact)]
    back = packed_all_to_all(tuple(g_parts[i] for i in live), axis)
    out: list[Array | None] = [None] * len(g_parts)
    for i, g in zip(live, back, strict=True):
        out[i] = g
    return tuple(out)


exchange.defvjp(_exchange_fwd, _exchange_bwd)


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _send_fp8(x_SD, src_PC, extras, axis, kernel: KernelBackend):
    """FP8 dispatch: gather + quantise (1x128 tiles), one all_to_all of codes, scales and
    extras, dequantise. The backward sends the cotangent back in x's dtype (straight
    through), with the extras' float cotangents."""
    P, C = src_PC.shape
    src_R = src_PC.reshape(-1)
    if kernel == "pallas":
        q_RD, s_RB = kernels.permute_quantize(x_SD, src_R)
    else:
        q_RD, s_RB = kernels.permute_quantize_reference(x_SD, src_R)
    # The codes travel as bytes: collectives need not know FP8 types.
    codes = jax.lax.bitcast_convert_type(q_RD, jnp.uint8).reshape(P, C, -1)
    bytes_PCD, s_PCB, *rest = packed_all_to_all((codes, s_RB.reshape(P, C, -1), *extras), axis)
    q_PCD = jax.lax.bitcast_convert_type(bytes_PCD, q_RD.dtype)
    return kernels.dequantize_rows(q_PCD, s_PCB, x_SD.dtype), tuple(rest)


def _send_fp8_fwd(x_SD, src_PC, extras, axis, kernel):
    return _send_fp8(x_SD, src_PC, extras, axis, kernel), (src_PC, x_SD.shape[0])


def _send_fp8_bwd(axis, _kernel, res, g):
    src_PC, rows = res
    g_PCD, g_extras = g
    g_RD, *g_back = _send_back((g_PCD, *g_extras), axis)
    g_RD = g_RD.reshape(-1, g_PCD.shape[-1])
    return _scatter_add(g_RD, src_PC.reshape(-1), rows), None, tuple(g_back)


_send_fp8.defvjp(_send_fp8_fwd, _send_fp8_bwd)


def _send_bwd(axis, _codec, res, g_PCD):
    """Straight-through: the cotangent goes back in the compute dtype, scattered to rows."""
    src_PC, rows = res
    g_RD = all_to_all(g_PCD, axis).reshape(-1, g_PCD.shape[-1])
    return _scatter_add(g_RD, src_PC.reshape(-1), rows), None


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
