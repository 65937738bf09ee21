"""LogFMT-nBit (ISCA 3.2): codes, error bound, unbiased linear-space rounding."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.logfmt import (
    LOG_RANGE,
    fp8_quantize_1x128,
    logfmt_decode,
    logfmt_encode,
    logfmt_quantize,
    quantization_error,
)


def _per_element(enc, n_bits):
    """Each element's tile step and lower log bound, broadcast to the codes' shape."""
    step_TG = (enc.hi_TG - enc.lo_TG) / (2 ** (n_bits - 1) - 2)
    return jnp.repeat(step_TG, 128, axis=-1), jnp.repeat(enc.lo_TG, 128, axis=-1)


@pytest.mark.parametrize("n_bits", [4, 5, 8, 10, 16])
def test_error_bounded_by_half_a_step(n_bits):
    x = jax.random.normal(jax.random.key(n_bits), (64, 256))
    enc = logfmt_encode(x, n_bits)
    q = logfmt_decode(enc, n_bits)
    step, lo = _per_element(enc, n_bits)
    a = jnp.abs(x)
    # Nearest in linear space: at most half the gap to the next code (or to zero below min).
    half_gap = jnp.maximum(a * jnp.expm1(step) / 2, jnp.exp(lo) / 2)
    slop = 1e-5 * a  # float32 log/exp at 16 bits
    assert bool(jnp.all(jnp.abs(q - x) <= 1.001 * half_gap + slop))
    assert bool(jnp.all(jnp.abs(jnp.log(jnp.abs(q)) - jnp.log(a)) <= step + 1e-5))
    assert bool(jnp.all(jnp.sign(q) == jnp.sign(x)))


def _linear_uniform_tiles(key, n_tiles, lo=-4.6, hi=0.0):
    """Tiles whose magnitudes are uniform in linear space, with min and max pinned."""
    k1, k2 = jax.random.split(key)
    a = jax.random.uniform(k1, (n_tiles, 128), minval=math.exp(lo), maxval=math.exp(hi))
    a = a.at[:, 0].set(math.exp(lo)).at[:, 1].set(math.exp(hi))
    return a * jax.random.rademacher(k2, a.shape).astype(jnp.float32)


@pytest.mark.parametrize("n_bits", [4, 5])
def test_linear_rounding_is_unbiased_log_rounding_is_not(n_bits):
    x = _linear_uniform_tiles(jax.random.key(0), 1024)
    enc = logfmt_encode(x, n_bits)
    step, _ = _per_element(enc, n_bits)
    gap = jnp.mean(jnp.abs(x) * jnp.expm1(step))

    def bias(rounding):
        q = logfmt_quantize(x, n_bits, rounding)
        return float(jnp.mean((q - x) * jnp.sign(x)) / gap)

    # Mean error in units of the mean gap: zero within sampling noise (~0.002) for linear
    # rounding; nearest-in-log sends the values between the geometric and arithmetic means
    # up, about step / 8 of a gap.
    assert abs(bias("linear")) < 0.01
    assert bias("log") > 0.02


def test_gaussian_bias_small_against_the_step():
    x = jax.random.normal(jax.random.key(1), (256, 512))
    enc = logfmt_encode(x, 8)
    step, _ = _per_element(enc, 8)
    q = logfmt_decode(enc, 8)
    assert abs(float(jnp.mean((q - x) * jnp.sign(x) / (jnp.abs(x) * step)))) < 0.02


def test_codes_zero_min_max():
    x = jnp.zeros((2, 128)).at[0, 3].set(-0.5).at[0, 7].set(4.0).at[0, 9].set(1.0)
    enc = logfmt_encode(x, 8)
    c = np.asarray(enc.codes_TD)
    assert c.dtype == np.uint8
    assert c[0, 0] == 0 and (c[1] == 0).all()  # exact zeros, and an all-zero tile
    assert c[0, 3] == 0x80 | 1  # sign bit + min code
    assert c[0, 7] == 127  # max code
    q = np.asarray(logfmt_decode(enc, 8))
    np.testing.assert_allclose(q[0, [3, 7]], [-0.5, 4.0], rtol=1e-6)
    assert (q[1] == 0).all() and np.isfinite(q).all()


def test_range_clamp_2_pow_32():
    x = jnp.ones((1, 128)).at[0, 0].set(1e-12).at[0, 1].set(2.4e-10).at[0, 2].set(1e-10)
    enc = logfmt_encode(x, 8)
    assert float(enc.hi_TG[0, 0] - enc.lo_TG[0, 0]) == pytest.approx(LOG_RANGE, rel=1e-6)
    q = np.asarray(logfmt_decode(enc, 8))
    # Below exp(min) = 2^-32 ~ 2.3e-10: nearest of {0, 2^-32} in linear space.
    assert q[0, 0] == 0 and q[0, 2] == 0
    assert q[0, 1] == pytest.approx(2.0**-32, rel=1e-5)


def test_sign_symmetry_shapes_and_dtypes():
    x = jax.random.normal(jax.random.key(2), (2, 3, 256)).astype(jnp.bfloat16)
    q = logfmt_quantize(x, 10)
    assert q.shape == x.shape and q.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(logfmt_quantize(-x, 10)), -np.asarray(q))
    assert logfmt_encode(x, 10).codes_TD.dtype == jnp.uint16
    assert logfmt_encode(x, 10).lo_TG.shape == (2, 3, 2)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_bits"):
        logfmt_encode(jnp.ones((1, 128)), 3)
    with pytest.raises(ValueError, match="n_bits"):
        logfmt_encode(jnp.ones((1, 128)), 17)
    with pytest.raises(ValueError, match="multiple"):
        logfmt_encode(jnp.ones((1, 100)), 8)


def test_more_bits_less_error_and_logfmt8_beats_fp8():
    x = jax.random.normal(jax.random.key(3), (128, 512))
    errs = [quantization_error(x, logfmt_quantize(x, n))[0] for n in (4, 6, 8, 10, 12)]
    assert errs == sorted(errs, reverse=True)
    e8 = quantization_error(x, logfmt_quantize(x, 8))[0]
    assert e8 < quantization_error(x, fp8_quantize_1x128(x, "e4m3"))[0]
    assert e8 < quantization_error(x, fp8_quantize_1x128(x, "e5m2"))[0]


def test_logfmt_error_experiment(monkeypatch, capsys):
    import json

    from experiments import logfmt_error

    def fake_hidden(tokens, seed):  # building the small model is for the real run
        return 3.0 * jax.random.normal(jax.random.key(seed), (tokens, 256))

    monkeypatch.setattr(logfmt_error, "small_model_hidden", fake_hidden)
    out = logfmt_error.main(["--tokens", "128", "--dim", "256"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(
        json.dumps(out)
    )
    for claim in out["claims"].values():
        assert claim["logfmt8_beats_e4m3"] and claim["logfmt8_beats_e5m2"]
