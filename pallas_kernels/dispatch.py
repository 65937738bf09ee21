"""Expert-parallel payload kernels: fused permute + FP8 quantise, and weighted combine.

DeepSeek-V3 (V3TR 3.3.2, 3.2.2) sends the dispatch payload in FP8 with one FP32 scale per
1x128 tile (the expert GEMM's input format, so the receiver feeds it on as is) and the
combine payload in BF16. The two data movements around the all-to-alls are:
- ``permute_quantize``: ``send[s] = x[src[s]]`` (zero where ``src[s]`` is out of range),
  rows of the destination-sorted send buffer gathered from token order, quantised to
  E4M3 in the same pass by the package's one tile quantiser
  (``deepseek_jax.fp8_quant.quantize_groups``: ``scale = max(max|tile|, 1e-30) / 448``,
  ``q = clip(x / scale, +-448)``), which the kernel body calls on the [rows, 128] tile it
  holds and the reference on the padded rows. With ``quantize=False`` it is the plain
  gather.
- ``combine``: ``out[t] = sum_j w[t, j] * y[row[t, j]]`` in FP32, rows out of range add
  nothing: each token reads back its copies' results and sums them with their weights.
  This is the scatter-add "results back to token order" written as a gather per token, so
  no two program instances write one row and no atomics are needed.

Each has a plain-``jnp`` ``*_reference`` twin and a ``pl.pallas_call`` kernel over a grid
of (row blocks, 128-wide column tiles); the gathered operand stays in place (``pl.ANY``)
and is read with one vector gather per block. ``interpret=True`` runs it on CPU (tests);
on a GPU it compiles through the Triton backend (the kernels cross-lower for CUDA on a CPU
host; speed is unmeasured). Shapes need not be multiples of the blocks: the wrappers pad
rows and columns and slice the result.

Shape letters: T tokens, D hidden, S send-buffer rows, B 1x128 scale tiles per row (not
batch), J copies per token.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from deepseek_jax.backends import pallas_interpret
from deepseek_jax.fp8_quant import (
    E4M3,
    TILE,
    dequantize_tiles,
    pad_to_multiple,
    quantize_groups,
    quantize_tiles,
)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Rows per grid step (send rows for permute, tokens for combine); a power of two."""

    block_rows: int = 16

    def __post_init__(self):
        n = self.block_rows
        if n < 1 or n & (n - 1):
            raise ValueError(f"block_rows must be a power of two, got {n}")


# ------------------------------------------------------------------------ references


def quantize_rows(x_SD: Float[Array, "S D"]) -> tuple[Array, Float[Array, "S B"]]:
    """E4M3 with one FP32 scale per 1x128 tile (B = ceil(D / 128)); x ~ q * scale."""
    return quantize_tiles(x_SD, axis=-1)


def dequantize_rows(q_SD: Array, scale_SB: Float[Array, "S B"], dtype=jnp.float32) -> Array:
    """Inverse of ``quantize_rows``; works on any leading axes."""
    return dequantize_tiles(q_SD, scale_SB, axis=-1, dtype=dtype)


def permute_quantize_reference(
    x_TD: Float[Array, "T D"], src_S: Int[Array, " S"], *, quantize: bool = True
):
    """The plain twin: gather rows ``x[src]`` (zero rows for ``src`` out of range), then
    quantise. Returns (q [S, D] E4M3, scale [S, ceil(D/128)] FP32), or x's rows unquantised.
    """
    x_SD = jnp.take(x_TD, src_S, axis=0, mode="fill", fill_value=0)
    return quantize_rows(x_SD) if quantize else x_SD


def combine_reference(
    y_SD: Float[Array, "S D"], row_TJ: Int[Array, "T J"], w_TJ: Float[Array, "T J"]
) -> Float[Array, "T D"]:
    """The plain twin: ``out[t] = sum_j w[t, j] * y[row[t, j]]`` in FP32."""
    out_TD = jnp.zeros((row_TJ.shape[0], y_SD.shape[1]), jnp.float32)
    for j in range(row_TJ.shape[1]):
        rows_TD = jnp.take(y_SD, row_TJ[:, j], axis=0, mode="fill", fill_value=0)
        out_TD = out_TD + w_TJ[:, j, None].astype(jnp.float32) * rows_TD.astype(jnp.float32)
    return out_TD


# ------------------------------------------------------------------------ kernels


def _gather_tile(rows_ref, table_ref):
    """Rows ``rows_ref[...]`` of column tile ``program_id(1)`` of ``table_ref`` (0 if out of
    range): [block_rows, 128]."""
    j = pl.program_id(1)
    rows_b = rows_ref[...]
    n = table_ref.shape[0]
    v_bC = table_ref[jnp.minimum(rows_b, n - 1), pl.ds(j * TILE, TILE)]
    return jnp.where((rows_b < n)[:, None], v_bC, jnp.zeros_like(v_bC))


def permute_quantize_kernel(src_ref, x_ref, q_ref, *scale_ref):
    """One block of send rows, one 128-wide tile.

    src_ref: [b] int32 token of each send row (>= T: empty row).
    x_ref: [T, D] token rows, left in place (pl.ANY); read by a vector gather.
    q_ref: [b, 128] E4M3 (or x's dtype without quantisation); scale_ref: [b, 1] FP32.
    """
    v_bC = _gather_tile(src_ref, x_ref)
    if not scale_ref:
        q_ref[...] = v_bC
        return
    q_bC, s_b1 = quantize_groups(v_bC, axis=1, dtype=q_ref.dtype)
    q_ref[...] = q_bC
    scale_ref[0][...] = s_b1


def combine_kernel(row_ref, w_ref, y_ref, o_ref):
    """One block of tokens, one 128-wide tile: o = sum_j w[:, j] * y[row[:, j]].

    row_ref, w_ref: [b, J] int32 rows of y / FP32 weights; y_ref: [S, D] in place (pl.ANY).
    o_ref: [b, 128] FP32.
    """
    acc_bC = jnp.zeros(o_ref.shape, jnp.float32)
    for k in range(row_ref.shape[1]):  # J is small (experts, nodes or GPUs per token)
        y_bC = _gather_tile(row_ref.at[:, k], y_ref).astype(jnp.float32)
        acc_bC = acc_bC + w_ref[:, k][:, None].astype(jnp.float32) * y_bC
    o_ref[...] = acc_bC


# ------------------------------------------------------------------------ wrappers


@functools.partial(jax.jit, static_argnames=("quantize", "block_sizes", "interpret"))
def permute_quantize(
    x_TD: Float[Array, "T D"],
    src_S: Int[Array, " S"],
    *,
    quantize: bool = True,
    block_sizes: BlockSizes = BlockSizes(),
    interpret: bool | None = None,
):
    """Gathers ``x[src]`` into a send buffer and quantises it, fused (see the module note).

    Args:
      x_TD: token rows, any float dtype. src_S: int32 token of each send row; a value
        outside [0, T) leaves the row empty (zeros).
      interpret: run the kernel in the Pallas interpreter; default: compiled on a GPU,
        interpreted elsewhere.
    Returns:
      (q [S, D] E4M3, scale [S, ceil(D/128)] FP32), or x's rows [S, D] if not ``quantize``.
    """
    S, D = src_S.shape[0], x_TD.shape[1]
    b = block_sizes.block_rows
    T = x_TD.shape[0]
    x_TDp = pad_to_multiple(x_TD, 1, TILE)
    src_Sp = pad_to_multiple(src_S.astype(jnp.int32), 0, b, value=T)
    Sp, Dp = src_Sp.shape[0], x_TDp.shape[1]
    out_shape = [_like(x_TDp, (Sp, Dp), E4M3 if quantize else x_TD.dtype)]
    out_specs = [pl.BlockSpec((b, TILE), lambda i, j: (i, j))]
    if quantize:
        out_shape.append(_like(x_TDp, (Sp, Dp // TILE), jnp.float32))
        out_specs.append(pl.BlockSpec((b, 1), lambda i, j: (i, j)))
    out = pl.pallas_call(
        permute_quantize_kernel,
        grid=(Sp // b, Dp // TILE),
        in_specs=[pl.BlockSpec((b,), lambda i, j: (i,)), pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=_interpret(interpret),
    )(src_Sp, x_TDp)
    if not quantize:
        return out[0][:S, :D]
    return out[0][:S, :D], out[1][:S, : -(-D // TILE)]


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def combine(
    y_SD: Float[Array, "S D"],
    row_TJ: Int[Array, "T J"],
    w_TJ: Float[Array, "T J"],
    *,
    block_sizes: BlockSizes = BlockSizes(),
    interpret: bool | None = None,
) -> Float[Array, "T D"]:
    """``out[t] = sum_j w[t, j] * y[row[t, j]]`` in FP32 (rows outside [0, S) add nothing).

    Args:
      y_SD: results per received copy, any float dtype (BF16 on the wire).
      row_TJ: int32 row of y for each of a token's J copies; w_TJ: their weights.
      interpret: as ``permute_quantize``.
    """
    T, D, S = row_TJ.shape[0], y_SD.shape[1], y_SD.shape[0]
    b = block_sizes.block_rows
    row_TpJ = pad_to_multiple(row_TJ.astype(jnp.int32), 0, b, value=S)
    w_TpJ = pad_to_multiple(w_TJ.astype(jnp.float32), 0, b)
    y_SDp = pad_to_multiple(y_SD, 1, TILE)
    Tp, J, Dp = row_TpJ.shape[0], row_TJ.shape[1], y_SDp.shape[1]
    out = pl.pallas_call(
        combine_kernel,
        grid=(Tp // b, Dp // TILE),
        in_specs=[
            pl.BlockSpec((b, J), lambda i, j: (i, 0)),
            pl.BlockSpec((b, J), lambda i, j: (i, 0)),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=pl.BlockSpec((b, TILE), lambda i, j: (i, j)),
        out_shape=_like(y_SDp, (Tp, Dp), jnp.float32),
        interpret=_interpret(interpret),
    )(row_TpJ, w_TpJ, y_SDp)
    return out[:T, :D]


def _like(x: Array, shape, dtype) -> jax.ShapeDtypeStruct:
    """An output type varying over the same manual mesh axes as x (inside shard_map)."""
    mat = getattr(jax.typeof(x), "mat", None)
    if mat is None:  # jax < 0.12 has no manual axis types on abstract values
        return jax.ShapeDtypeStruct(shape, dtype)
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)


def _interpret(interpret: bool | None) -> bool:
    return pallas_interpret(interpret)
