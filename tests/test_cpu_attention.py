"""The C++ causal attention (cpu_kernels/attention.py) against its jnp definition."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from cpu_kernels import attention, build
from deepseek_jax import causal_attention
from deepseek_jax.mesh import make_mesh
from deepseek_jax.presets import get_preset
from tests.layouts import axes, spec
from tests.numerics import rel_err

pytestmark = pytest.mark.skipif(
    not attention.available(), reason="the C++ attention kernel does not build here"
)


def problem(B, T, H, K, O, seed=0, scale=0.5):
    k = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(k[0], (B, T, H, K), jnp.float32) * scale
    kk = jax.random.normal(k[1], (B, T, H, K), jnp.float32)
    v = jax.random.normal(k[2], (B, T, H, O), jnp.float32)
    probe = jax.random.normal(k[3], (B, T, H, O), jnp.float32)
    return q, kk, v, probe


VARIANTS = build.runnable_variants()  # every instruction-set build this CPU runs

# (B, T, H, Dk, Dv): one token; T below one 16-wide vector; tails of the 64-row query
# block and of the 14 x 32, 6 x 16 and 4 x 8 register tiles in every dimension; the
# bench-small shape.
SHAPES = [
    (1, 1, 1, 8, 8),
    (2, 5, 3, 24, 16),
    (2, 130, 2, 40, 33),
    (1, 193, 3, 96, 64),
    (4, 512, 8, 96, 64),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_equals_the_definition(shape, variant):
    q, k, v, _ = problem(*shape)
    out = jax.jit(functools.partial(attention.causal_attention, variant=variant))(q, k, v)
    assert rel_err(out, attention.causal_attention_reference(q, k, v)) < 1e-6


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_equal_the_definitions(shape, variant):
    q, k, v, probe = problem(*shape)
    kernel = functools.partial(attention.causal_attention, variant=variant)

    def grads(fn):
        return jax.jit(jax.grad(lambda *a: jnp.sum(probe * fn(*a)), argnums=(0, 1, 2)))(q, k, v)

    for got, want in zip(
        grads(kernel),
        grads(attention.causal_attention_reference),
        strict=True,
    ):
        # T = 1: one key has probability 1 whatever its score, so dq is exactly zero and
        # the kernel's is float32 rounding (~1e-7); elsewhere the relative error counts.
        assert rel_err(got, want) < 1e-5 or np.abs(np.asarray(got - want)).max() < 1e-6


def test_large_scores_stay_finite():
    """Scores near float32's exp range: the softmax is shifted by each row's maximum."""
    q, k, v, probe = problem(1, 70, 2, 16, 16, scale=30.0)
    out = attention.causal_attention(q, k, v)
    assert np.isfinite(np.asarray(out)).all()
    assert rel_err(out, attention.causal_attention_reference(q, k, v)) < 1e-5


def test_future_tokens_do_not_leak():
    q, k, v, _ = problem(1, 40, 2, 16, 8)
    out = attention.causal_attention(q, k, v)
    k2 = k.at[:, 20:].set(7.0)
    v2 = v.at[:, 20:].set(-3.0)
    out2 = attention.causal_attention(q, k2, v2)
    np.testing.assert_array_equal(out[:, :20], out2[:, :20])


def test_batch_sharded_over_the_mesh():
    """Each device runs its own batch shard (shard_map); the result stays sharded."""
    mesh = make_mesh(2, 4)
    q, k, v, probe = problem(8, 48, 2, 24, 16)
    with jax.set_mesh(mesh):
        sh = NamedSharding(mesh, spec("batch"))
        args = [jax.device_put(a, sh) for a in (q, k, v)]

        def loss(q, k, v):
            return jnp.sum(probe * attention.causal_attention(q, k, v))

        out = jax.jit(attention.causal_attention)(*args)
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)
    assert out.sharding.spec[0] == axes("batch")
    assert rel_err(out, attention.causal_attention_reference(q, k, v)) < 1e-6
    want = jax.grad(
        lambda *a: jnp.sum(probe * attention.causal_attention_reference(*a)), argnums=(0, 1, 2)
    )(q, k, v)
    for g, w in zip(grads, want, strict=True):
        assert rel_err(g, w) < 1e-5


def test_bad_inputs_name_the_problem():
    q, k, v, _ = problem(1, 8, 2, 16, 8)
    with pytest.raises(ValueError, match=r"q\[B, T, H, Dk\]"):
        attention.causal_attention(q, k[:, :4], v)
    with pytest.raises(ValueError, match="float32 only"):
        attention.causal_attention(q.astype(jnp.bfloat16), k, v)


def test_attention_backend_resolution():
    """Explicit choices win; bfloat16 never reaches the float32 kernel (auto's measured
    race is tested with injected timings in tests/test_backends.py)."""
    shape = (2, 64, 4, 16, 8, 16)
    f32 = get_preset("tiny", ["dtype=float32"])
    xla = f32.with_overrides(["attention_backend=xla"])
    kernel = f32.with_overrides(["attention_backend=cpu_kernel"])
    assert causal_attention.resolve_attention_backend(xla, shape) == "xla"
    assert causal_attention.resolve_attention_backend(kernel, shape) == "cpu_kernel"
    bf16 = get_preset("tiny", ["dtype=bfloat16"])
    assert causal_attention.resolve_attention_backend(bf16, shape) == "xla"  # float32 only
    with pytest.raises(ValueError, match="attention_backend"):
        f32.with_overrides(["attention_backend=flash"])
