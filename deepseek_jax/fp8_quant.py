"""The one FP8 tile quantisation primitive: constants, scale policy, tiles and blocks.

Every FP8 quantiser of the package is this module (the FP8 recipe in ``fp8.py``, the
dispatch payload's kernel and reference in ``pallas_kernels/dispatch.py``, the FP8
baseline of ``logfmt.py``, the official weight format in ``interop/fp8_weights.py``).
The Pallas kernel bodies call ``quantize_groups`` on the tile they hold, so kernel and
reference share the policy by construction, not by copy.

*The policy* (V3TR 3.3.1-3.3.2): per group (a 1x128 tile or a 128x128 block), the FP32
scale is ``s = max(amax, AMAX_FLOOR) / fmt_max`` and the code ``clip(x / s, +-fmt_max)``
cast to the FP8 format, so that x ~ q s.
- Floor, not a branch: an all-zero group gets a finite scale and quantises to exact
  zeros, with one ``max`` (no select) in kernel bodies. Groups whose amax lies below
  1e-30 (far below any activation or weight we train) are quantised coarser than with an
  exact scale; the official checkpoints' scales (>= 1e-12 / 448) are never affected.
- Clip: ``x / s`` in FP32 can land a hair above fmt_max, and E4M3FN has no inf (an
  overflowing cast is NaN); round-to-nearest would give fmt_max anyway, the clip makes it
  independent of the cast's rounding.
- ``pow2`` rounds the scale up to a power of two (exact rescaling; kept for comparison).

Shape letters: R rows, C columns (``s_RC`` holds one scale per 128x128 block).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0  # float(jnp.finfo(E4M3).max)
TILE = 128  # quantisation group, promotion interval N_C and kernel tile (V3TR 3.3.2)
AMAX_FLOOR = 1e-30  # see the module note


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pad_to_multiple(x: Array, axis: int, multiple: int, value=0) -> Array:
    """x zero-padded (or ``value``-padded) at the end of ``axis`` to a multiple of ``multiple``."""
    extra = -x.shape[axis] % multiple
    if extra == 0:
        return x
    pads = [(0, 0)] * x.ndim
    pads[axis % x.ndim] = (0, extra)
    return jnp.pad(x, pads, constant_values=value)


def scale_from_amax(amax: Array, *, dtype=E4M3, pow2: bool = False) -> Array:
    """FP32 dequantisation scale of a group with max-abs ``amax`` (the module's policy)."""
    s = jnp.maximum(amax.astype(jnp.float32), AMAX_FLOOR) / float(jnp.finfo(dtype).max)
    if not pow2:
        return s
    mant, exp = jnp.frexp(s)  # s = mant 2^exp, mant in [0.5, 1): exact, unlike exp2(log2)
    return jnp.ldexp(jnp.ones_like(s), jnp.where(mant == 0.5, exp - 1, exp))


def quantize_groups(
    x: Float[Array, "..."], *, axis: int | tuple[int, ...] = -1, dtype=E4M3, pow2: bool = False
) -> tuple[Array, Float[Array, "..."]]:
    """Quantises groups laid out along ``axis`` (one scale per group), in FP32.

    Args:
      x: values whose ``axis`` (one axis or several) spans exactly one group: [..., 128]
        for 1x128 tiles, [..., 128, ..., 128] for blocks; also a kernel's [rows, 128] tile.
    Returns:
      q: ``dtype`` codes of x's shape; s: FP32 scales of x's shape with ``axis`` kept as
      size 1 (broadcastable against q); x ~ q * s.
    """
    x = x.astype(jnp.float32)
    s = scale_from_amax(jnp.max(jnp.abs(x), axis=axis, keepdims=True), dtype=dtype, pow2=pow2)
    fmax = float(jnp.finfo(dtype).max)
    return jnp.clip(x / s, -fmax, fmax).astype(dtype), s


# ------------------------------------------------------------------------ layouts


def quantize_tiles(
    x: Array, *, axis: int = -1, dtype=E4M3, pow2: bool = False
) -> tuple[Array, Array]:
    """1x128 tiles along ``axis`` (128x1 when ``axis`` is the token axis).

    Args:
      x: any float array; ``axis`` need not be a multiple of 128 (partial last tile).
    Returns:
      q: ``dtype`` (E4M3), x's shape.
      s: FP32 scales, x's shape with ``axis`` replaced by ceil(n / 128); x ~ q * s.
    """
    axis = axis % x.ndim
    n = x.shape[axis]
    xt = jnp.moveaxis(pad_to_multiple(x.astype(jnp.float32), axis, TILE), axis, -1)
    xt = xt.reshape(*xt.shape[:-1], xt.shape[-1] // TILE, TILE)
    q, s = quantize_groups(xt, axis=-1, dtype=dtype, pow2=pow2)
    q = q.reshape(*xt.shape[:-2], xt.shape[-2] * TILE)[..., :n]
    return jnp.moveaxis(q, -1, axis), jnp.moveaxis(s[..., 0], -1, axis)


def dequantize_tiles(q: Array, s: Array, *, axis: int = -1, dtype=jnp.float32) -> Array:
    """Inverse of ``quantize_tiles``, in ``dtype`` (computed in FP32)."""
    axis = axis % q.ndim
    s_full = jnp.repeat(s, TILE, axis=axis)
    s_full = lax.slice_in_dim(s_full, 0, q.shape[axis], axis=axis)
    return (q.astype(jnp.float32) * s_full).astype(dtype)


def quantize_blocks(w: Float[Array, "... K N"], *, pow2: bool = False) -> tuple[Array, Array]:
    """128x128 blocks over the last two axes (leading axes, e.g. experts, are batch).

    Returns:
      q: E4M3, w's shape.
      s: FP32 scales [..., ceil(K/128), ceil(N/128)]; w ~ q * s per block.
    """
    K, N = w.shape[-2:]
    wp = pad_to_multiple(pad_to_multiple(w.astype(jnp.float32), -1, TILE), -2, TILE)
    G, H = wp.shape[-2] // TILE, wp.shape[-1] // TILE
    wb = wp.reshape(*w.shape[:-2], G, TILE, H, TILE)
    q, s = quantize_groups(wb, axis=(-3, -1), pow2=pow2)
    return q.reshape(wp.shape)[..., :K, :N], s[..., :, 0, :, 0]


def dequantize_blocks(q: Array, s: Array) -> Float[Array, "... K N"]:
    """Inverse of ``quantize_blocks`` in FP32."""
    K, N = q.shape[-2:]
    s_full = jnp.repeat(jnp.repeat(s, TILE, axis=-2), TILE, axis=-1)[..., :K, :N]
    return q.astype(jnp.float32) * s_full


def quantize_tensor(x: Array) -> tuple[Array, Array]:
    """Per-tensor E4M3 (one FP32 scale): the coarse baseline fine-grained tiling beats."""
    q, s = quantize_groups(x, axis=tuple(range(x.ndim)))
    return q, s.reshape(())


def block_rows(s_RC: Float[Array, "... R/128 C/128"], rows: int) -> Float[Array, "... R C/128"]:
    """128x128 block scales of a K-major [R, C] operand as the NT GEMM's per-row scales.

    The GEMM wants one scale per row per 128-K slice; row r takes block (r // 128, g).
    """
    return jnp.repeat(s_RC, TILE, axis=-2)[..., :rows, :]
