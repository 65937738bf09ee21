"""layers.matmul: the flattened 2-D GEMM every projection goes through."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from deepseek_jax.layers import matmul
from deepseek_jax.mesh import make_mesh
from tests.layouts import axes, spec


def _xw(x_shape, w_shape):
    k = jax.random.split(jax.random.key(0), 2)
    return jax.random.normal(k[0], x_shape), jax.random.normal(k[1], w_shape)


@pytest.mark.parametrize(
    "spec, x_shape, w_shape, n_in",
    [
        ("btd,dv->btv", (2, 5, 8), (8, 12), 1),
        ("btq,qhk->bthk", (2, 5, 6), (6, 3, 4), 1),
        ("btho,hod->btd", (2, 5, 3, 4), (3, 4, 7), 2),
        ("td,df->tf", (9, 8), (8, 5), 1),
    ],
)
def test_matmul_equals_einsum_value_and_gradient(spec, x_shape, w_shape, n_in):
    x, w = _xw(x_shape, w_shape)
    np.testing.assert_allclose(matmul(x, w, n_in), jnp.einsum(spec, x, w), rtol=1e-5, atol=1e-5)
    got = jax.grad(lambda x, w: jnp.sum(jnp.sin(matmul(x, w, n_in))), (0, 1))(x, w)
    want = jax.grad(lambda x, w: jnp.sum(jnp.sin(jnp.einsum(spec, x, w))), (0, 1))(x, w)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_matmul_keeps_a_batch_sharded_over_the_mesh():
    mesh = make_mesh(2, 4)
    x, w = _xw((8, 5, 3, 4), (3, 4, 6))
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, spec("batch")))
        y = jax.jit(lambda x, w: matmul(x, w, 2))(xs, w)
    assert jax.typeof(y).sharding.spec[0] == axes("batch")
    np.testing.assert_allclose(y, jnp.einsum("btho,hod->btd", x, w), rtol=1e-5, atol=1e-5)


def test_matmul_out_dtype_and_shape_errors():
    x, w = _xw((4, 8), (8, 3))
    assert matmul(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), out_dtype=jnp.float32).dtype == (
        jnp.float32
    )
    with pytest.raises(ValueError, match="disagree on 1 contracted axes"):
        matmul(x, w.T)
