"""RoPE/YaRN: golden values for the V3 config, plain RoPE when unscaled, layout equivalence."""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.layers import rope
from deepseek_jax.presets import get_preset

V3 = get_preset("v3-671b")
V2 = get_preset("v2-236b")
TINY = get_preset("tiny")


def _hf_yarn_inv_freq(dim, base, factor, orig, beta_fast, beta_slow):
    """HF ``_compute_yarn_parameters`` transcribed to numpy float64 (interpolation form)."""

    def corr_dim(rot):
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr_dim(beta_fast)), 0)
    high = min(math.ceil(corr_dim(beta_slow)), dim - 1)
    pos_freqs = base ** (np.arange(0, dim, 2) / dim)
    extrap, interp = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrap_factor = 1 - np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
    return interp * (1 - extrap_factor) + extrap * extrap_factor


def _official_rope(x, angle):
    """deepseek-ai inference ``apply_rotary_emb``: interleaved pairs as complex numbers."""
    z = x[..., 0::2] + 1j * x[..., 1::2]
    z = z * np.exp(1j * angle)
    return np.stack([z.real, z.imag], axis=-1).reshape(x.shape)


def test_v3_golden_correction_range_and_scales():
    assert rope.yarn_correction_range(64, 1e4, V3.rope_scaling) == (10, 23)
    expected = 192**-0.5 * (0.1 * math.log(40) + 1) ** 2
    assert rope.softmax_scale(V3) == pytest.approx(expected, rel=1e-12)
    assert rope.rope_attention_factor(V3) == 1.0


def test_v3_frequencies_match_hf_formula():
    inv = rope.rope_frequencies(V3)
    chex.assert_shape(inv, (32,))
    assert inv.dtype == np.float32
    ref = _hf_yarn_inv_freq(64, 1e4, 40.0, 4096, 32, 1)
    np.testing.assert_allclose(inv, ref, rtol=1e-6)
    plain = 1e4 ** (-np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(inv[:11], plain[:11], rtol=1e-6)  # high freq: extrapolate
    np.testing.assert_allclose(inv[23:], plain[23:] / 40, rtol=1e-6)  # low freq: interpolate


@pytest.mark.parametrize("cfg", [TINY, V2], ids=["tiny", "v2"])
def test_other_configs_match_hf_formula(cfg):
    s = cfg.rope_scaling
    ref = _hf_yarn_inv_freq(
        cfg.qk_rope_head_dim,
        cfg.rope_theta,
        s.factor,
        s.original_max_position_embeddings,
        s.beta_fast,
        s.beta_slow,
    )
    np.testing.assert_allclose(rope.rope_frequencies(cfg), ref, rtol=1e-6)


def test_v2_mscale():
    m = 0.1 * 0.707 * math.log(40) + 1
    assert rope.softmax_scale(V2) == pytest.approx(192**-0.5 * m * m, rel=1e-12)
    assert rope.rope_attention_factor(V2) == pytest.approx(1.0)


def test_attention_factor_without_mscale_all_dim():
    s = dataclasses.replace(V3.rope_scaling, mscale_all_dim=0.0)
    cfg = dataclasses.replace(V3, rope_scaling=s)
    assert rope.rope_attention_factor(cfg) == pytest.approx(0.1 * math.log(40) + 1)
    assert rope.softmax_scale(cfg) == pytest.approx(192**-0.5)
    cos, sin = rope.rope_cos_sin(jnp.arange(3)[None], cfg)
    np.testing.assert_allclose(
        cos**2 + sin**2, np.full((1, 3, 64), (0.1 * math.log(40) + 1) ** 2), rtol=1e-5
    )


@pytest.mark.parametrize(
    "cfg",
    [
        get_preset("tiny", ["rope_scaling=none"]),
        get_preset("tiny", ['rope_scaling={"type": "yarn", "factor": 1}']),
    ],
    ids=["none", "factor1"],
)
def test_unscaled_is_plain_rope(cfg):
    R = cfg.qk_rope_head_dim
    plain = (cfg.rope_theta ** (-np.arange(0, R, 2) / R)).astype(np.float32)
    np.testing.assert_allclose(rope.rope_frequencies(cfg), plain, rtol=1e-7)
    assert rope.softmax_scale(cfg) == pytest.approx(cfg.qk_head_dim**-0.5, rel=1e-12)
    assert rope.rope_attention_factor(cfg) == 1.0


def test_apply_rope_is_official_rotation_deinterleaved():
    cfg = TINY
    R = cfg.qk_rope_head_dim
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, 5, 3, R)), np.float64)
    pos = np.array([[0, 1, 2, 3, 4], [7, 100, 300, 511, 2]])
    cos, sin = rope.rope_cos_sin(jnp.asarray(pos), cfg)
    got = rope.apply_rope(jnp.asarray(x, jnp.float32), cos, sin)
    chex.assert_shape(got, x.shape)
    angle = pos[:, :, None, None] * rope.rope_frequencies(cfg).astype(np.float64)[None, None, None]
    want = rope.deinterleave(jnp.asarray(_official_rope(x, angle), jnp.float32))
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_scores_depend_on_relative_position_only():
    cfg = TINY
    q, k = jax.random.normal(jax.random.key(1), (2, cfg.qk_rope_head_dim))

    def score(m, n):
        cq, sq = rope.rope_cos_sin(jnp.array([m]), cfg)
        ck, sk = rope.rope_cos_sin(jnp.array([n]), cfg)
        return jnp.dot(rope.apply_rope(q[None], cq, sq)[0], rope.apply_rope(k[None], ck, sk)[0])

    np.testing.assert_allclose(score(3, 1), score(250, 248), rtol=1e-4)
    np.testing.assert_allclose(score(0, 0), jnp.dot(q, k), rtol=1e-5)
