"""The MoE layer, its dispatch and expert kernels against naive references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import nnx

from cpu_kernels import grouped_gemm
from deepseek_jax import sharding
from deepseek_jax.config import EPOptions
from deepseek_jax.mesh import make_mesh
from deepseek_jax.moe import dispatch, experts
from deepseek_jax.moe.dispatch import SlotSizes
from deepseek_jax.moe.layer import MoE, RoutingBias
from deepseek_jax.presets import get_preset
from tests.layouts import spec
from tests.numerics import rel_err
from tests.reference.moe_reference import moe_reference

CFG = get_preset("tiny")  # D 64, E 8 in 4 groups (2 kept), top-2, F 32, 1 shared


def make_moe(cfg=CFG, seed=0, bias=None, **kw):
    model = MoE(cfg, rngs=nnx.Rngs(seed), **kw)
    if bias is not None:
        model.e_score_correction_bias[...] = jnp.asarray(bias, jnp.float32)
    return model


def reference(model: MoE, x_BTD):
    s = model.shared_experts
    params = {
        "gate": model.gate[...],
        "w_gate": model.w_gate[...],
        "w_up": model.w_up[...],
        "w_down": model.w_down[...],
        "e_score_correction_bias": None
        if model.e_score_correction_bias is None
        else model.e_score_correction_bias[...],
        "shared": None if s is None else (s.gate_proj[...], s.up_proj[...], s.down_proj[...]),
    }
    return moe_reference(np.asarray(x_BTD), params, model.cfg)


def inputs(B=2, T=16, D=CFG.hidden_size, seed=1):
    return jax.random.normal(jax.random.key(seed), (B, T, D), jnp.float32)


def expert_weights(E=8, D=16, F=8, seed=3):
    k = jax.random.split(jax.random.key(seed), 3)
    return (
        0.3 * jax.random.normal(k[0], (E, D, F)),
        0.3 * jax.random.normal(k[1], (E, D, F)),
        0.3 * jax.random.normal(k[2], (E, F, D)),
    )


class MoELayerTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_naive_loop(self):
        model, x = make_moe(), inputs()
        y, stats = self.variant(lambda x: model(x))(x)
        self.assertLess(rel_err(y, reference(model, x)), 2e-6)
        self.assertEqual(float(stats.load_E.sum()), 2 * 16 * CFG.num_experts_per_tok)
        self.assertTrue(np.isfinite(float(stats.balance_loss)))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("einsum", "grouped")
    def test_skewed_routing_is_dropless(self, backend):
        # The bias sends every token to experts 0 and 1: each gets all 64 tokens, far
        # beyond its dense slots, so with "einsum" most assignments go through the spill
        # loop; "grouped" gets two groups of 64 rows and six empty ones.
        model = make_moe(bias=[9.0, 9.0, 0, 0, 0, 0, 0, 0], backend=backend)
        x = inputs(B=4)
        y, stats = self.variant(lambda x: model(x))(x)
        np.testing.assert_array_equal(stats.load_E, [64, 64, 0, 0, 0, 0, 0, 0])
        self.assertLess(rel_err(y, reference(model, x)), 2e-6)

    @parameterized.parameters("einsum", "grouped", "ragged_dot")
    def test_backends_agree(self, backend):
        model, x = make_moe(backend=backend), inputs()
        self.assertLess(rel_err(model(x)[0], reference(model, x)), 2e-6)


def test_gradients_finite_and_bias_not_a_param():
    model, x = make_moe(bias=[0.3, 0.3, 0, 0, 0, 0, 0, 0]), inputs(B=4)
    assert isinstance(model.e_score_correction_bias, RoutingBias)
    assert "e_score_correction_bias" not in nnx.state(model, nnx.Param)

    def loss(model, x):
        y, stats = model(x)
        return jnp.mean(jnp.sin(y)) + 1e-2 * stats.balance_loss

    grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, nnx.Param)))(model, x)
    chex.assert_tree_all_finite(grads)
    assert "e_score_correction_bias" not in grads
    assert float(jnp.abs(grads["gate"][...]).max()) > 0  # the router learns via the gates
    used = np.asarray(model(x)[1].load_E) > 0
    np.testing.assert_array_equal(np.abs(np.asarray(grads["w_down"][...])).max((1, 2)) > 0, used)


@pytest.mark.parametrize(
    "routing, sizes",
    [
        ("random", None),
        ("random", SlotSizes(4, 2)),  # most rows spill, blocks of 2
        ("random", SlotSizes(64, 8)),  # C = T: nothing can spill
        ("skewed", None),
        ("skewed", SlotSizes(1, 1)),
        ("repeated", SlotSizes(4, 16)),
        ("none", SlotSizes(4, 2)),  # id E = no expert (expert-parallel padding rows)
    ],
)
def test_routed_ffn_and_its_vjp_match_reference(routing, sizes):
    _check_routed_ffn(routing, sizes=sizes)


@pytest.mark.parametrize("routing", ["random", "skewed", "repeated", "none"])
def test_grouped_routed_ffn_and_its_vjp_match_reference(routing):
    _check_routed_ffn(routing, backend="grouped")


def test_auto_backend_and_bad_names():
    cpu_kernel = grouped_gemm.available()  # CPU with the C++ kernel built
    # Without shapes "auto" waits for routed_ffn's real shapes (tests/test_backends.py).
    assert experts.resolve_backend("auto") == ("auto" if cpu_kernel else "einsum")
    assert experts.resolve_backend("einsum") == "einsum"
    with pytest.raises(ValueError, match="'fast'"):
        experts.resolve_backend("fast")
    with pytest.raises(ValueError, match="moe_backend"):
        CFG.with_overrides(["moe_backend=fast"])


def _check_routed_ffn(routing, **kw):
    T, K, E = 64, 2, 8
    ws = expert_weights(E)
    x = jax.random.normal(jax.random.key(0), (T, 16))
    weight = jax.random.uniform(jax.random.key(1), (T, K))
    idx = {
        "random": jnp.argsort(jax.random.uniform(jax.random.key(2), (T, E)), -1)[:, :K],
        "skewed": jnp.broadcast_to(jnp.array([3, 5], jnp.int32), (T, K)),
        "repeated": jnp.zeros((T, K), jnp.int32),  # not from route(); must still be exact
        "none": jax.random.randint(jax.random.key(2), (T, K), 0, E + 1),
    }[routing]
    fast = jax.jit(lambda *a: experts.routed_ffn(a[0], idx, *a[1:], **kw))
    slow = lambda *a: experts.routed_ffn_reference(a[0], idx, *a[1:])  # noqa: E731
    args = (x, weight, *ws)
    assert rel_err(fast(*args), slow(*args)) < 1e-6
    probe = jax.random.normal(jax.random.key(4), (T, 16))
    grads = jax.grad(lambda *a: jnp.sum(probe * fast(*a)), argnums=range(5))(*args)
    grads_ref = jax.grad(lambda *a: jnp.sum(probe * slow(*a)), argnums=range(5))(*args)
    for g, r in zip(grads, grads_ref, strict=True):
        assert rel_err(g, r) < 1e-6


def test_dispatch_then_combine_with_identity_experts():
    T, K, E, D = 32, 3, 8, 4
    x = jax.random.normal(jax.random.key(0), (T, D))
    idx = jnp.argsort(jax.random.uniform(jax.random.key(1), (T, E)), -1)[:, :K]
    weight = jax.random.uniform(jax.random.key(2), (T, K))
    expect = x * jnp.sum(weight, -1, keepdims=True)
    x_ECD, d = dispatch.permute(x, idx, E, SlotSizes(T))
    np.testing.assert_allclose(dispatch.unpermute(x_ECD, weight, d), expect, rtol=1e-6)
    x_AD = dispatch.permute_sorted(x, d)
    np.testing.assert_allclose(dispatch.unpermute_sorted(x_AD, weight, d), expect, rtol=1e-6)
    sorted_experts = np.repeat(np.arange(E), np.asarray(d.counts_E))
    np.testing.assert_array_equal(
        np.asarray(idx).ravel()[np.asarray(d.order_P[: T * K])], sorted_experts
    )


def test_spill_blocks_cover_exactly_the_overflow():
    T, E, C, b = 40, 4, 6, 4
    idx = jnp.stack([jnp.zeros(T, jnp.int32), 1 + jnp.arange(T, dtype=jnp.int32) % 3], -1)
    d = dispatch.sort_assignments(idx, E, SlotSizes(C, b))
    counts = np.asarray(d.counts_E)
    n = int(d.num_blocks)
    assert n == sum(-(-max(c - C, 0) // b) for c in counts)
    rows = set()
    for j in range(n):
        start, end = int(d.block_start_N[j]), int(d.block_end_N[j])
        rows |= set(range(start, min(start + b, end)))
    starts = np.asarray(d.starts_E)
    expect = {p for e in range(E) for p in range(starts[e] + C, starts[e] + counts[e])}
    assert rows == expect


def test_sharded_equals_unsharded():
    # Skewed routing would overflow capacity-factor buffers: use the dropless mode.
    model = make_moe(bias=np.linspace(-0.5, 0.5, 8), ep=EPOptions(capacity_factor=None))
    x = inputs(B=8, T=8)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    y0, stats0 = forward(state, x)
    mesh = make_mesh(2, 4)
    with jax.set_mesh(mesh):
        state_s = jax.device_put(state, sharding.state_shardings(state, mesh))
        assert state_s["w_gate"][...].sharding.spec == spec("expert", None, None)
        y1, stats1 = forward(state_s, jax.device_put(x, spec("batch")))
        assert y1.sharding.spec == spec("batch", None, None)
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(stats1.load_E), np.asarray(stats0.load_E))
    assert int(stats1.dropped) == 0
    np.testing.assert_allclose(float(stats1.balance_loss), float(stats0.balance_loss), rtol=1e-6)
