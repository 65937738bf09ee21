"""The whole model: shapes, sharded == unsharded, born sharded, causality, remat."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.build import init_model
from deepseek_jax.mesh import make_mesh, single_device_mesh
from deepseek_jax.model import Transformer
from deepseek_jax.presets import get_preset
from tests.layouts import axes, spec

CFG = get_preset("tiny")


def _ids(b=4, t=16, seed=0, vocab=CFG.vocab_size):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, vocab)


def test_forward_shapes_and_stats():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    out = nnx.jit(lambda m, x: m(x))(model, _ids())
    chex.assert_shape(out.logits_BTV, (4, 16, CFG.vocab_size))
    chex.assert_shape(out.mtp_logits_KBTV, (1, 4, 16, CFG.vocab_size))
    chex.assert_shape(out.moe_stats.load_LE, (CFG.num_moe_layers, CFG.n_routed_experts))
    chex.assert_shape(out.mtp_stats.load_LE, (1, CFG.n_routed_experts))
    # every token goes to exactly k experts in every MoE layer
    np.testing.assert_allclose(out.moe_stats.load_LE.sum(-1), 4 * 16 * CFG.num_experts_per_tok)
    chex.assert_tree_all_finite(out)


def test_born_sharded_and_sharded_forward_equals_single_device():
    mesh = make_mesh(2, 4)
    model = init_model(CFG, mesh, seed=1)
    w = model.moe_layers.mlp.w_gate[...]
    assert w.sharding.spec == spec(None, "expert", None, None)
    shard_shapes = {s.data.shape for s in w.addressable_shards}
    assert shard_shapes == {(w.shape[0], CFG.n_routed_experts // 8) + w.shape[2:]}

    ids = _ids(8, 16, seed=2)
    with jax.set_mesh(mesh):
        ids_sharded = jax.device_put(ids, spec("batch", None))
        out = nnx.jit(lambda m, x: m(x))(model, ids_sharded)
    assert out.logits_BTV.sharding.spec[0] == axes("batch")

    ref_model = init_model(CFG, single_device_mesh(), seed=1)
    # the same seed gives the same parameters whatever the mesh
    chex.assert_trees_all_equal(
        jax.device_get(nnx.state(model, nnx.Param)), jax.device_get(nnx.state(ref_model, nnx.Param))
    )
    ref = nnx.jit(lambda m, x: m(x))(ref_model, ids)
    chex.assert_trees_all_close(jax.device_get(out), jax.device_get(ref), atol=2e-5, rtol=2e-5)


def test_causality_through_gradients():
    """Main logits at t see tokens <= t; MTP depth-k logits at t see tokens <= t + k.

    With distinct tokens, embedding-table row r's gradient is nonzero iff the output
    depends on the position holding token r.
    """
    cfg = get_preset("tiny", ["num_nextn_predict_layers=2"])
    graphdef, params, rest = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    T = 12
    ids = jnp.arange(T)[None] + 10
    rows = np.arange(T) + 10

    @jax.jit
    def dependence(params, t):  # [1 + MTP depth, V]: |d logits[t] / d table row|
        def head(params, k):
            out = nnx.merge(graphdef, params, rest, copy=True)(ids)
            logits = out.logits_BTV if k == 0 else out.mtp_logits_KBTV[k - 1]
            return jax.lax.dynamic_index_in_dim(logits[0], t, keepdims=False).sum()

        grads = [jax.grad(head)(params, k) for k in range(3)]
        return jnp.stack([jnp.abs(g["embed_tokens"]["embedding"][...]).sum(-1) for g in grads])

    for t in (3, 7):
        g = np.asarray(dependence(params, t))
        for k in range(3):  # k = 0: the main head
            assert (g[k, rows[t + k + 1 :]] == 0).all(), f"depth {k} at {t} sees the future"
            assert (g[k, rows[: t + k + 1]] > 0).all(), f"depth {k} at {t} misses a past token"


@functools.cache
def _forward_and_grad(loop: str, remat: str):
    """Logits/statistics and the gradient of a scalar of the logits, for one layer loop and
    remat policy: computed once, shared by the remat and layer-loop tests below."""
    ids = _ids(2, 8)
    model = Transformer(CFG, rngs=nnx.Rngs(0), remat=remat, layer_loop=loop)
    loss = lambda m: m(ids).logits_BTV.astype(jnp.float32).std()  # noqa: E731
    return nnx.jit(lambda m: m(ids))(model), nnx.jit(nnx.grad(loss))(model)


@pytest.mark.parametrize("loop", ["scan", "unroll"])  # "auto" is unroll on CPU
def test_remat_changes_nothing(loop):
    g0 = _forward_and_grad(loop, "none")[1]
    g1 = _forward_and_grad(loop, "full")[1]
    chex.assert_trees_all_close(g0, g1, atol=1e-6, rtol=1e-5)


def test_bad_remat_policy():
    with pytest.raises(ValueError, match="remat"):
        Transformer(CFG, rngs=nnx.Rngs(0), remat="sometimes")


@pytest.mark.parametrize("remat", ["none", "full"])
def test_unrolled_layers_equal_the_scan(remat):
    """Same logits, MoE statistics and stacked-parameter gradients either way."""
    (out_s, g_s), (out_u, g_u) = (
        _forward_and_grad("scan", remat),
        _forward_and_grad("unroll", remat),
    )
    assert CFG.num_moe_layers > 1 and out_u.moe_stats.load_LE.shape[0] == CFG.num_moe_layers
    chex.assert_trees_all_close(out_u, out_s, atol=1e-6, rtol=1e-5)
    chex.assert_trees_all_close(g_u, g_s, atol=1e-6, rtol=1e-5)


def test_bad_layer_loop():
    with pytest.raises(ValueError, match="layer_loop"):
        Transformer(CFG, rngs=nnx.Rngs(0), layer_loop="sometimes")
