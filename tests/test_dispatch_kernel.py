"""The Pallas dispatch kernels (interpret mode) against their jnp references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch as kd


def _codes(q):
    return np.asarray(q.astype(jnp.float32))


@pytest.mark.parametrize(
    "T, D, S, block",
    [
        (16, 128, 32, 16),  # aligned
        (37, 200, 45, 8),  # ragged rows and a partial 128-column tile
        (5, 300, 3, 16),  # fewer send rows than a block; three tiles, the last partial
    ],
)
def test_permute_quantize_matches_reference(T, D, S, block):
    k = jax.random.split(jax.random.key(T * D + S), 3)
    x = jax.random.normal(k[0], (T, D), jnp.float32) * jnp.exp(
        jax.random.normal(k[1], (T, 1))
    )  # rows of very different magnitude
    src = jax.random.randint(k[2], (S,), 0, T + 3)  # some rows empty (src >= T)
    bs = kd.BlockSizes(block)
    q, s = kd.permute_quantize(x, src, block_sizes=bs, interpret=True)
    q_ref, s_ref = kd.permute_quantize_reference(x, src)
    assert q.dtype == jnp.float8_e4m3fn and q.shape == (S, D)
    assert s.shape == (S, -(-D // 128))
    np.testing.assert_array_equal(_codes(q), _codes(q_ref))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s_ref))
    gathered = kd.permute_quantize(x, src, quantize=False, block_sizes=bs, interpret=True)
    want = np.where((np.asarray(src) < T)[:, None], np.asarray(x)[np.minimum(src, T - 1)], 0)
    np.testing.assert_array_equal(np.asarray(gathered), want)
    # 1x128 tiles, scale = amax / 448: E4M3 keeps 3 mantissa bits (error <= amax / 16)
    err = np.abs(np.asarray(kd.dequantize_rows(q, s)) - want)
    amax = np.repeat(np.asarray(s) * 448.0, 128, axis=1)[:, :D]
    assert (err <= amax / 16 + 1e-30).all()


@pytest.mark.parametrize(
    "S, D, T, J, dtype",
    [
        (32, 128, 16, 2, jnp.float32),
        (45, 200, 37, 4, jnp.bfloat16),  # ragged tokens and columns, BF16 payload
        (7, 64, 3, 8, jnp.float32),
    ],
)
def test_combine_matches_reference(S, D, T, J, dtype):
    k = jax.random.split(jax.random.key(S + T + J), 3)
    y = jax.random.normal(k[0], (S, D)).astype(dtype)
    row = jax.random.randint(k[1], (T, J), 0, S + 4)  # some copies absent (row >= S)
    w = jax.random.uniform(k[2], (T, J))
    out = kd.combine(y, row, w, block_sizes=kd.BlockSizes(8), interpret=True)
    ref = kd.combine_reference(y, row, w)
    assert out.dtype == jnp.float32 and out.shape == (T, D)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6, atol=1e-6)


def test_block_sizes_must_be_powers_of_two():
    with pytest.raises(ValueError, match="power of two"):
        kd.BlockSizes(12)
