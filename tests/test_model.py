"""The whole model: shapes, sharded == unsharded, born sharded, causality, remat."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from deepseek_jax.build import init_model
from deepseek_jax.config import get_preset
from deepseek_jax.mesh import make_mesh, single_device_mesh
from deepseek_jax.model import Transformer

CFG = get_preset("tiny")


def _ids(b=4, t=16, seed=0, vocab=CFG.vocab_size):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, vocab)


def test_forward_shapes_and_stats():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    out = model(_ids())
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
    assert w.sharding.spec == P(None, ("node", "gpu"), None, None)
    shard_shapes = {s.data.shape for s in w.addressable_shards}
    assert shard_shapes == {(w.shape[0], CFG.n_routed_experts // 8) + w.shape[2:]}

    ids = _ids(8, 16, seed=2)
    with jax.set_mesh(mesh):
        ids_sharded = jax.device_put(ids, P(("node", "gpu"), None))
        out = nnx.jit(lambda m, x: m(x))(model, ids_sharded)
    assert out.logits_BTV.sharding.spec[0] == ("node", "gpu")

    ref_model = init_model(CFG, single_device_mesh(), seed=1)
    # the same seed gives the same parameters whatever the mesh
    chex.assert_trees_all_equal(jax.device_get(nnx.state(model, nnx.Param)),
                                jax.device_get(nnx.state(ref_model, nnx.Param)))
    ref = nnx.jit(lambda m, x: m(x))(ref_model, ids)
    chex.assert_trees_all_close(jax.device_get(out), jax.device_get(ref), atol=2e-5, rtol=2e-5)


def _grad_wrt_table(model, ids, fn):
    """d fn(outputs) / d embedding table: row r is nonzero iff fn depends on token r."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def f(params):
        m = nnx.merge(graphdef, params, rest, copy=True)
        return fn(m(ids))

    g = jax.grad(f)(params)
    return np.abs(np.asarray(g["embed_tokens"]["embedding"][...])).sum(-1)


@pytest.mark.parametrize("t", [3, 7])
def test_causality_through_gradients(t):
    """Main logits at t see tokens <= t; MTP depth-1 logits at t see tokens <= t + 1."""
    cfg = get_preset("tiny", ["num_nextn_predict_layers=2"])
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    T = 12
    ids = jnp.arange(T)[None] + 10  # distinct tokens: embedding row <-> position
    rows = np.arange(T) + 10
    g = _grad_wrt_table(model, ids, lambda o: o.logits_BTV[0, t].sum())
    assert (g[rows[t + 1:]] == 0).all() and (g[rows[: t + 1]] > 0).all()
    for k in (1, 2):
        g = _grad_wrt_table(model, ids, lambda o, k=k: o.mtp_logits_KBTV[k - 1, 0, t].sum())
        assert (g[rows[t + k + 1:]] == 0).all(), f"MTP depth {k} sees the future"
        assert (g[rows[: t + k + 1]] > 0).all()


def test_remat_changes_nothing():
    ids = _ids(2, 8)
    loss = lambda m: m(ids).logits_BTV.astype(jnp.float32).std()  # noqa: E731
    m0 = Transformer(CFG, rngs=nnx.Rngs(0))
    m1 = Transformer(CFG, rngs=nnx.Rngs(0), remat="full")
    g0 = nnx.grad(loss)(m0)
    g1 = nnx.grad(loss)(m1)
    chex.assert_trees_all_close(g0, g1, atol=1e-6, rtol=1e-5)


def test_bad_remat_policy():
    with pytest.raises(ValueError, match="remat"):
        Transformer(CFG, rngs=nnx.Rngs(0), remat="sometimes")


