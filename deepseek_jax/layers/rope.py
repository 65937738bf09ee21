"""Rotary position embedding with DeepSeek's YaRN extension, and the attention softmax scale.

Formulas follow the official DeepSeek-V3 ``inference/model.py`` (``precompute_freqs_cis``,
``MLA.softmax_scale``) and Hugging Face transformers (``_compute_yarn_parameters``,
``DeepseekV3Attention.scaling``); YaRN itself is arXiv 2309.00071, section 3.

Channel layout (what our weights hold, and what an importer must match)
-----------------------------------------------------------------------
The R rope channels of ``q_b_proj`` / ``q_proj`` and of ``kv_a_proj_with_mqa`` are in the
order of the released checkpoints: *interleaved pairs*, channel ``2i`` the real part and
``2i + 1`` the imaginary part of rotation pair ``i`` (the official code views them as
complex numbers). So weights load from the official or the HF safetensors unchanged; in HF
terms this is ``rope_interleave=True`` (``apply_rotary_pos_emb_interleave``).
``apply_rope`` first de-interleaves (``[x0, x2, ..., x1, x3, ...]``), then applies HF's
``rotate_half`` rotation. Its *output* is therefore in the half-split layout
``[re_0 .. re_{R/2-1}, im_0 .. im_{R/2-1}]``, as HF's is; the official code's output is the
same numbers re-interleaved. Queries and keys get the same permutation, so every q.k
product, hence attention, is identical. Only cached RoPE keys (``LatentCache.krope_BSR``)
carry the half-split layout, and they never leave this package.

What is scaled, and by what
---------------------------
* Frequencies (only when ``cfg.rope_scaling`` is set, as in HF; the official code applies
  them when its runtime ``max_seq_len`` exceeds ``original_seq_len``, true for every
  released config): ``low, high`` = correction range of ``beta_fast, beta_slow`` at
  ``original_max_position_embeddings`` (floor/ceil, clamped to ``[0, R-1]``), ``ramp`` =
  linear ramp over the R/2 pair indices, and ``f = f/factor * ramp + f * (1 - ramp)``:
  high frequencies extrapolate, low ones interpolate.
* cos/sin times HF's ``attention_factor`` = ``m(factor, mscale) / m(factor, mscale_all_dim)``
  (``m`` = ``yarn_mscale``), or ``m(factor, 1)`` when either is 0. 1.0 for V2 and V3.
* Softmax scale ``qk_head_dim**-0.5 * m(factor, mscale_all_dim)**2`` (HF; the official code
  uses its ``mscale`` field, equal to ``mscale_all_dim`` in the released configs).

Shape letters: B batch, S cached positions, R rope head dim.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from deepseek_jax.config import ModelConfig, RopeScaling


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature ``0.1 * mscale * ln(factor) + 1`` (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_correction_range(dim: int, theta: float, scaling: RopeScaling) -> tuple[int, int]:
    """Pair indices ``[low, high]`` between which YaRN ramps from extrapolation to interpolation.

    ``find_correction_dim``: the (fractional) dimension whose wavelength makes
    ``num_rotations`` turns over the original context (YaRN eq. 17-18).
    """

    def correction_dim(num_rotations: float) -> float:
        n = scaling.original_max_position_embeddings / (num_rotations * 2 * math.pi)
        return dim * math.log(n) / (2 * math.log(theta))

    low = math.floor(correction_dim(scaling.beta_fast))
    high = math.ceil(correction_dim(scaling.beta_slow))
    return max(low, 0), min(high, dim - 1)


def _linear_ramp(low: float, high: float, n: int) -> np.ndarray:
    if low == high:
        high += 0.001  # as the reference: avoid 0/0
    return np.clip((np.arange(n, dtype=np.float64) - low) / (high - low), 0.0, 1.0)


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies ``inv_freq[R/2]`` (float32), YaRN-corrected when configured.

    Computed in float64 on the host from the (static) config and rounded once to float32.
    """
    dim, theta = cfg.qk_rope_head_dim, cfg.rope_theta
    inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    s = cfg.rope_scaling
    if s is not None:
        low, high = yarn_correction_range(dim, theta, s)
        ramp = _linear_ramp(low, high, dim // 2)  # 0: keep (extrapolate), 1: divide by factor
        inv_freq = inv_freq / s.factor * ramp + inv_freq * (1.0 - ramp)
    return inv_freq.astype(np.float32)


def rope_attention_factor(cfg: ModelConfig) -> float:
    """HF's YaRN ``attention_factor``: multiplies cos and sin (so q_rope.k_rope by its square)."""
    s = cfg.rope_scaling
    if s is None:
        return 1.0
    if s.mscale and s.mscale_all_dim:
        return yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim)
    return yarn_mscale(s.factor)


def softmax_scale(cfg: ModelConfig) -> float:
    """Logit scale ``(N + R)**-0.5`` times the square of YaRN's ``mscale_all_dim`` temperature."""
    scale = cfg.qk_head_dim**-0.5
    s = cfg.rope_scaling
    if s is not None and s.mscale_all_dim:
        scale *= yarn_mscale(s.factor, s.mscale_all_dim) ** 2
    return scale


def rope_cos_sin(
    positions: Int[Array, "*P"], cfg: ModelConfig
) -> tuple[Float[Array, "*P R"], Float[Array, "*P R"]]:
    """float32 cos/sin tables for ``positions``, half-split layout (frequencies repeated twice).

    Args:
      positions: integer positions of any shape, e.g. [B, T].
    Returns:
      (cos, sin), each ``positions.shape + (R,)``, already times ``rope_attention_factor``.
    """
    inv_freq = rope_frequencies(cfg).reshape((1,) * positions.ndim + (-1,))
    angle = positions.astype(jnp.float32)[..., None] * inv_freq  # float32, as both references
    angle = jnp.concatenate([angle, angle], axis=-1)
    factor = rope_attention_factor(cfg)
    return jnp.cos(angle) * factor, jnp.sin(angle) * factor


def deinterleave(x: Float[Array, "... R"]) -> Float[Array, "... R"]:
    """Pairs ``(x[2i], x[2i+1])`` -> halves ``[x[0], x[2], ..., x[1], x[3], ...]``."""
    pairs = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    return jnp.swapaxes(pairs, -1, -2).reshape(x.shape)


def _rotate_half(x: Float[Array, "... R"]) -> Float[Array, "... R"]:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(
    x: Float[Array, "*P *M R"], cos: Float[Array, "*P R"], sin: Float[Array, "*P R"]
) -> Float[Array, "*P *M R"]:
    """Rotates ``x`` (interleaved weight layout in, half-split layout out), in float32.

    Args:
      x: ``positions.shape + middle + (R,)``, e.g. q [B, T, H, R] or k [B, T, R].
      cos, sin: from ``rope_cos_sin(positions, cfg)``, shape ``positions.shape + (R,)``;
        broadcast over the middle axes (heads).
    Returns:
      The rotated ``x`` in ``x.dtype``.
    """
    middle = tuple(range(cos.ndim - 1, x.ndim - 1))
    cos, sin = jnp.expand_dims(cos, middle), jnp.expand_dims(sin, middle)
    x32 = deinterleave(x.astype(jnp.float32))
    return (x32 * cos + _rotate_half(x32) * sin).astype(x.dtype)
