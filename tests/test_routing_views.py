"""The helpers the notebooks draw routing with: the replayed router (``moe.probe``), the
bias-only balancing run and the flat vs two-hop copy count, each against the real thing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax import sharding
from deepseek_jax.codesign.routing_traffic import internode_copies
from deepseek_jax.config import EPOptions
from deepseek_jax.mesh import make_mesh
from deepseek_jax.model import Transformer
from deepseek_jax.moe import routing
from deepseek_jax.moe.layer import MoE
from deepseek_jax.moe.probe import route_probe
from deepseek_jax.presets import get_preset
from tests.layouts import spec

# 16 experts in 4 groups (2 kept), top-4: the node limit bites on a (node=4, gpu=2) mesh.
CFG = get_preset("tiny", ["n_routed_experts=16", "num_experts_per_tok=4", "dtype=float32"])


def test_route_probe_replays_the_model_routing():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    bias = model.moe_layers.mlp.e_score_correction_bias  # a non-zero bias must be honoured
    bias[...] = jax.random.uniform(jax.random.key(3), bias[...].shape, minval=-0.2, maxval=0.2)
    ids = jax.random.randint(jax.random.key(1), (2, 16), 0, CFG.vocab_size)
    probe = nnx.jit(route_probe)(model, ids)
    L = CFG.num_moe_layers
    assert probe.idx_LBTK.shape == (L, 2, 16, CFG.num_experts_per_tok)
    load_LE = jnp.stack([routing.expert_load(i, CFG.n_routed_experts) for i in probe.idx_LBTK])
    np.testing.assert_array_equal(
        load_LE, nnx.jit(Transformer.__call__)(model, ids).moe_stats.load_LE
    )
    # At most topk_group groups per token, and weights sum to the scaling factor.
    groups = np.asarray(probe.idx_LBTK) // (CFG.n_routed_experts // CFG.n_group)
    assert max(len(set(row)) for row in groups.reshape(-1, groups.shape[-1])) <= CFG.topk_group
    np.testing.assert_allclose(probe.weight_LBTK.sum(-1), CFG.routed_scaling_factor, rtol=1e-5)


def test_bias_balancing_run_moves_the_load_towards_balance():
    E = CFG.n_routed_experts
    skew_E = jnp.linspace(-1.0, 1.0, E)  # later experts preferred by every token
    logits = jax.random.normal(jax.random.key(0), (512, E)) * 0.3 + skew_E[None, :]
    scores = routing.gate_scores(logits, CFG)
    bias_NE, load_NE = routing.bias_balancing_run(scores, CFG, gamma=0.01, steps=200)
    ratio_N = load_NE.max(-1) / load_NE.mean(-1)
    idx0, _ = routing.route(scores, None, CFG)
    np.testing.assert_array_equal(load_NE[0], routing.expert_load(idx0, E))  # step 0: no bias
    np.testing.assert_array_equal(bias_NE[0], 0.0)
    assert float(ratio_N[0]) > 2.0 and float(ratio_N[-20:].mean()) < 1.3
    assert float(bias_NE[-1, -1]) < 0 < float(bias_NE[-1, 0])  # the favoured expert is pushed down
    _, still = routing.bias_balancing_run(scores, CFG, gamma=0.0, steps=3)
    np.testing.assert_array_equal(still, jnp.broadcast_to(load_NE[0], still.shape))


def test_internode_copies_counts_by_hand():
    idx = np.array([[0, 1, 4, 9], [12, 13, 14, 15], [0, 4, 8, 12]])
    flat, two_hop = internode_copies(idx, np.array([0, 3, 1]), experts_per_node=4)
    np.testing.assert_array_equal(flat, [2, 0, 3])
    np.testing.assert_array_equal(two_hop, [2, 0, 3])
    flat, two_hop = internode_copies(np.array([[4, 5, 6, 8]]), np.array([0]), 4)
    assert (int(flat[0]), int(two_hop[0])) == (4, 2)
    with pytest.raises(ValueError, match="idx_TK"):
        internode_copies(idx, np.array([0, 1]), 4)


@pytest.mark.parametrize("path", ["flat", "two_hop"])
def test_internode_copies_match_the_exchange_counters(path):
    mesh = make_mesh(4, 2)
    model = MoE(CFG, rngs=nnx.Rngs(0), ep=EPOptions(path=path, capacity_factor=None))
    x = jax.random.normal(jax.random.key(1), (16, 8, CFG.hidden_size), jnp.float32)
    idx, _ = routing.route(
        routing.gate_scores(x.reshape(-1, CFG.hidden_size) @ model.gate[...], CFG), None, CFG
    )
    graphdef, state = nnx.split(model)
    with jax.set_mesh(mesh):
        state = jax.device_put(state, sharding.state_shardings(state, mesh))
        sharded = nnx.merge(graphdef, state)
        _, stats = nnx.jit(MoE.__call__)(sharded, jax.device_put(x, spec("batch")))
    rows_per_device = x.shape[0] // 8
    src_node = np.repeat(np.arange(x.shape[0]) // rows_per_device // 2, x.shape[1])
    flat, two_hop = internode_copies(np.asarray(idx), src_node, CFG.n_routed_experts // 4)
    assert int(stats.internode) == int((flat if path == "flat" else two_hop).sum())
    assert two_hop.sum() < flat.sum() and two_hop.max() <= CFG.topk_group
