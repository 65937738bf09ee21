"""LogFMT-nBit: a logarithmic n-bit format for communicated activations (ISCA 2025, 3.2).

Design note.
What the paper does: in each 1x128 tile, take the min and max of log|x| over the tile's
nonzero values; code each value as a sign bit plus an (n-1)-bit magnitude code K, with
K = 0 for exact zero, K = 1 for the min, K = 2^(n-1) - 1 for the max, evenly spaced in
log space: step = (max - min) / (2^(n-1) - 2), decode sign x exp(min + step x (K - 1)).
min is clamped to max - ln(2^32), so a tile spans at most 32 binades. Rounding is done in
linear space, not log space, which keeps the quantiser unbiased.
What we do: exactly that, for any n in [4, 16], jittable (n static). A value is rounded to
whichever neighbouring code's decoded value is nearer in linear space, i.e. compared with
the arithmetic (not geometric) midpoint of the two; below the clamped min the neighbours
are 0 and exp(min). Nearest-in-log rounding would send everything between the geometric
and arithmetic midpoints up, a bias of about step/8 of a gap on locally uniform data
(``rounding="log"``, kept for that comparison). Deterministic rounding is unbiased only in
that sense: where the density falls with |x| (a Gaussian's), nearest rounding in either
space leans a little low or high, about 1 % of the rms error (``experiments.logfmt_error``).
What we simplify: min and max travel as float32 per tile (0.5 extra bits per value); codes
are uint8 (n <= 8) or uint16, one per value, not bit-packed.

Shape letters: T rows (tokens), D columns, G 1x128 tiles per row (G = D / 128, not groups),
C the 128 values of a tile.
"""

from __future__ import annotations

import functools
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, UInt

from deepseek_jax.fp8_quant import E4M3, TILE, dequantize_tiles, quantize_tiles

LOG_RANGE = 32 * math.log(2.0)  # the 2^32 dynamic-range clamp
Rounding = Literal["linear", "log"]


class LogFMTTiles(NamedTuple):
    codes_TD: UInt[Array, "T D"]  # sign at bit n-1, magnitude below
    lo_TG: Float[Array, "T G"]  # per 1x128 tile: min log|x|, clamped
    hi_TG: Float[Array, "T G"]  # max log|x|; G = D / 128


def _check(n_bits: int, d: int) -> None:
    if not 4 <= n_bits <= 16:
        raise ValueError(f"LogFMT: n_bits must be in [4, 16], got {n_bits}")
    if d % TILE:
        raise ValueError(f"LogFMT: last dimension {d} is not a multiple of the {TILE} tile")


def _tile_log_range(loga_TGC, nz_TGC):
    """Per-tile (min, max) of log|x| over nonzero values, min clamped to max - ln 2^32."""
    hi_TG = jnp.max(jnp.where(nz_TGC, loga_TGC, -jnp.inf), axis=-1)
    lo_TG = jnp.min(jnp.where(nz_TGC, loga_TGC, jnp.inf), axis=-1)
    hi_TG = jnp.where(jnp.isfinite(hi_TG), hi_TG, 0.0)  # all-zero tile
    lo_TG = jnp.maximum(jnp.where(jnp.isfinite(lo_TG), lo_TG, 0.0), hi_TG - LOG_RANGE)
    return lo_TG, hi_TG


def _magnitude_code(a_TGC, loga_TGC, lo_TGC, step_TGC, top: int, rounding: Rounding):
    """Magnitude codes in [0, top] for |x| (0 only where the nearest value is zero)."""
    safe_TGC = jnp.where(step_TGC > 0, step_TGC, 1.0)
    t_TGC = (loga_TGC - lo_TGC) / safe_TGC  # fractional code index, code = index + 1
    if rounding == "log":
        return jnp.where(a_TGC > 0, jnp.clip(jnp.round(t_TGC), 0, top - 1) + 1, 0)
    j_TGC = jnp.clip(jnp.floor(t_TGC), -1, top - 2)  # lower neighbour; -1 is the zero code
    v_lo = jnp.where(j_TGC >= 0, jnp.exp(lo_TGC + step_TGC * j_TGC), 0.0)
    v_hi = jnp.exp(lo_TGC + step_TGC * (j_TGC + 1))
    j_TGC = j_TGC + (a_TGC >= 0.5 * (v_lo + v_hi))
    return jnp.where(a_TGC > 0, j_TGC + 1, 0)


@functools.partial(jax.jit, static_argnames=("n_bits", "rounding"))
def logfmt_encode(
    x_TD: Float[Array, "T D"], n_bits: int = 8, rounding: Rounding = "linear"
) -> LogFMTTiles:
    """Encodes ``x`` tile by tile along its last axis.

    Args:
      x_TD: any leading shape (T stands for all of it); D a multiple of 128.
      n_bits: total bits per value, sign included, 4 to 16.
    Returns:
      codes of x's shape, and each tile's (lo, hi) log-magnitude bounds.
    """
    *lead, d = x_TD.shape
    _check(n_bits, d)
    x_TGC = x_TD.astype(jnp.float32).reshape(*lead, d // TILE, TILE)
    a_TGC = jnp.abs(x_TGC)
    nz_TGC = a_TGC > 0
    loga_TGC = jnp.log(jnp.where(nz_TGC, a_TGC, 1.0))
    lo_TG, hi_TG = _tile_log_range(loga_TGC, nz_TGC)
    top = 2 ** (n_bits - 1) - 1
    step_TG = (hi_TG - lo_TG) / (top - 1)
    mag = _magnitude_code(a_TGC, loga_TGC, lo_TG[..., None], step_TG[..., None], top, rounding)
    sign = jnp.where((x_TGC < 0) & (mag > 0), 1 << (n_bits - 1), 0)
    dtype = jnp.uint8 if n_bits <= 8 else jnp.uint16
    codes_TD = (mag.astype(jnp.int32) | sign).astype(dtype).reshape(x_TD.shape)
    return LogFMTTiles(codes_TD, lo_TG, hi_TG)


@functools.partial(jax.jit, static_argnames=("n_bits", "dtype"))
def logfmt_decode(
    enc: LogFMTTiles, n_bits: int = 8, dtype: jnp.dtype = jnp.float32
) -> Float[Array, "T D"]:
    """sign x exp(lo + step x (K - 1)) for K > 0, and 0 for K = 0."""
    *lead, d = enc.codes_TD.shape
    _check(n_bits, d)
    c_TGC = enc.codes_TD.astype(jnp.int32).reshape(*lead, d // TILE, TILE)
    top = 2 ** (n_bits - 1) - 1
    mag_TGC, neg_TGC = c_TGC & top, (c_TGC >> (n_bits - 1)) & 1
    lo_TG1, hi_TG1 = enc.lo_TG[..., None], enc.hi_TG[..., None]
    step_TG1 = (hi_TG1 - lo_TG1) / (top - 1)
    v_TGC = jnp.where(mag_TGC > 0, jnp.exp(lo_TG1 + step_TG1 * (mag_TGC - 1)), 0.0)
    v_TGC = jnp.where(neg_TGC == 1, -v_TGC, v_TGC)
    return v_TGC.reshape(enc.codes_TD.shape).astype(dtype)


def logfmt_quantize(
    x_TD: Float[Array, "T D"], n_bits: int = 8, rounding: Rounding = "linear"
) -> Float[Array, "T D"]:
    """Round trip: decode(encode(x)) in x's dtype."""
    return logfmt_decode(logfmt_encode(x_TD, n_bits, rounding), n_bits, x_TD.dtype)


# ------------------------------------------------------------ baselines for comparison
FP8_DTYPES = {"e4m3": E4M3, "e5m2": jnp.float8_e5m2}


@functools.partial(jax.jit, static_argnames=("fmt",))
def fp8_quantize_1x128(x_TD: Float[Array, "T D"], fmt: str = "e4m3") -> Float[Array, "T D"]:
    """FP8 round trip with one float32 max-abs scale per 1x128 tile (V3TR 3.3.1), by the
    package's one tile quantiser (``fp8_quant``: its floor and clip policy)."""
    _check(8, x_TD.shape[-1])
    q_TD, s_TG = quantize_tiles(x_TD, axis=-1, dtype=FP8_DTYPES[fmt])
    return dequantize_tiles(q_TD, s_TG, axis=-1, dtype=x_TD.dtype)


def bf16_quantize(x: Float[Array, "..."]) -> Float[Array, "..."]:
    """BF16 round trip (round to nearest even)."""
    return x.astype(jnp.bfloat16).astype(x.dtype)


def quantization_error(x: Float[Array, "..."], q: Float[Array, "..."]) -> tuple[float, float]:
    """(relative error ||q - x|| / ||x||, magnitude bias mean((q - x) sign x) / mean |x|)."""
    x, q = x.astype(jnp.float32), q.astype(jnp.float32)
    rel = jnp.linalg.norm(q - x) / jnp.linalg.norm(x)
    bias = jnp.mean((q - x) * jnp.sign(x)) / jnp.mean(jnp.abs(x))
    return float(rel), float(bias)
