"""Expert parallelism over (node, gpu) meshes of 8 virtual devices: two-hop and flat
exchanges equal the single-device layer; node limit, copies, identity and overflow."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from deepseek_jax import sharding
from deepseek_jax.config import EPOptions
from deepseek_jax.mesh import make_mesh
from deepseek_jax.moe import dispatch, routing
from deepseek_jax.moe.dispatch import Capacities, Topology
from deepseek_jax.moe.layer import MoE
from deepseek_jax.presets import get_preset
from tests.layouts import axes, spec
from tests.numerics import rel_err

# D 64, 16 experts in 4 groups (2 kept), top-4: on (node=4, gpu=2) the node limit bites.
CFG = get_preset("tiny", ["n_routed_experts=16", "num_experts_per_tok=4"])
DATA = spec("batch")
DROPLESS = EPOptions(capacity_factor=None)


def _inputs(B=16, T=8):
    x = jax.random.normal(jax.random.key(1), (B, T, CFG.hidden_size), jnp.float32)
    probe = jax.random.normal(jax.random.key(2), x.shape, jnp.float32)
    return x, probe


def _loss_and_grads(model: MoE):
    """jit(value_and_grad) of sum(probe * y) + balance loss, w.r.t. parameters and x."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def run(params, rest, x, probe):
        def f(params, x):
            y, stats = nnx.merge(graphdef, params, rest, copy=True)(x)
            return jnp.sum(probe * y) + 0.1 * stats.balance_loss, (y, stats)

        (_, (y, stats)), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, x)
        return y, stats, grads

    return params, rest, run


def _model(ep=DROPLESS):
    model = MoE(CFG, rngs=nnx.Rngs(0), ep=ep)
    model.e_score_correction_bias[...] = jnp.linspace(-0.3, 0.3, CFG.n_routed_experts)
    return model


@functools.cache
def _single_device():
    params, rest, run = _loss_and_grads(_model())
    x, probe = _inputs()
    return jax.device_get(run(params, rest, x, probe))


@pytest.mark.parametrize(
    "shape, ep",
    [
        ((1, 8), DROPLESS),
        ((2, 4), DROPLESS),
        ((4, 2), DROPLESS),
        ((1, 8), EPOptions(path="flat", capacity_factor=None)),
        ((2, 4), EPOptions(path="flat", capacity_factor=None)),
        ((4, 2), EPOptions(path="flat", capacity_factor=None)),
        ((4, 2), EPOptions(kernel="pallas")),  # the default capacity factor drops nothing
    ],
)
def test_layer_and_gradients_equal_single_device(shape, ep):
    y0, stats0, (dparams0, dx0) = _single_device()
    mesh = make_mesh(*shape)
    params, rest, run = _loss_and_grads(_model(ep))
    x, probe = _inputs()
    with jax.set_mesh(mesh):
        params = jax.device_put(params, sharding.state_shardings(params, mesh))
        rest = jax.device_put(rest, sharding.state_shardings(rest, mesh))
        y, stats, (dparams, dx) = run(
            params, rest, jax.device_put(x, DATA), jax.device_put(probe, DATA)
        )
    assert y.sharding.spec[0] == axes("batch")
    assert int(stats.dropped) == 0
    if ep.path == "two_hop":  # at most one copy per (token, other node), M nodes per token
        assert int(stats.internode) <= x.shape[0] * x.shape[1] * min(CFG.topk_group, shape[0] - 1)
    np.testing.assert_array_equal(np.asarray(stats.load_E), stats0.load_E)
    np.testing.assert_allclose(float(stats.balance_loss), float(stats0.balance_loss), rtol=1e-6)
    assert rel_err(y, y0) < 1e-6
    assert rel_err(dx, dx0) < 1e-5
    flat = jax.tree.leaves_with_path(jax.device_get(dparams))
    for (path, g), g0 in zip(flat, jax.tree.leaves(dparams0), strict=True):
        assert rel_err(g, g0) < 1e-5, jax.tree_util.keystr(path)


def test_config_that_does_not_fit_the_mesh_is_named():
    with pytest.raises(ValueError, match=r"n_group = 4 .*node=8, gpu=1"):
        Topology.for_mesh(CFG, make_mesh(8, 1))
    assert Topology.for_mesh(CFG, make_mesh(8, 1), "flat").max_nodes == 8
    with pytest.raises(ValueError, match=r"n_routed_experts = 12 .*8 devices"):
        Topology.for_mesh(
            get_preset("tiny", ["n_routed_experts=12", "n_group=2", "topk_group=1"]),
            make_mesh(2, 4),
        )


def test_the_rules_table_rules_the_expert_exchange():
    """The exchange reads its axes from the rules it is given, not from import time: the
    expert rule's major axis is the inter-node hop, and a table that replicates the experts
    turns expert parallelism off."""
    from deepseek_jax.moe.layer import _expert_parallel_fits

    mesh, rules = make_mesh(2, 4), sharding.RULES
    swapped = tuple((k, v[::-1] if k in ("batch", "expert") else v) for k, v in rules)
    default, other = Topology.for_mesh(CFG, mesh), Topology.for_mesh(CFG, mesh, rules=swapped)
    assert default.axes == sharding.mesh_axes_of("expert") == other.axes[::-1]
    assert (default.nodes, default.gpus, other.nodes, other.gpus) == (2, 4, 4, 2)
    replicated = tuple((k, None if k == "expert" else v) for k, v in rules)
    assert _expert_parallel_fits(mesh, 16) and _expert_parallel_fits(mesh, 16, swapped)
    assert not _expert_parallel_fits(mesh, 16, replicated)


def _routed_tokens(mesh, T=32, seed=0):
    """Local tokens, their experts and weights summing to 1 (each device's block)."""
    k = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k[0], (8 * T, CFG.hidden_size))
    gate = jax.random.normal(k[1], (CFG.hidden_size, CFG.n_routed_experts))
    scores = routing.gate_scores(x @ gate, CFG)
    idx, w = routing.route(scores, None, CFG)
    return x, idx.astype(jnp.int32), w / jnp.sum(w, -1, keepdims=True)


def _on_mesh(mesh, fn, *args, out_specs=DATA, check_vma=True):
    with jax.set_mesh(mesh):
        args = [jax.device_put(a, DATA) for a in args]
        fn = jax.shard_map(fn, in_specs=DATA, out_specs=out_specs, check_vma=check_vma)
        return jax.jit(fn)(*args)


def test_node_limit_and_one_internode_copy_per_node():
    mesh = make_mesh(4, 2)
    topo = Topology.for_mesh(CFG, mesh)
    x, idx, w = _routed_tokens(mesh)

    def copies(x_TD, idx_TK, w_TK):
        caps = Capacities.for_tokens(x_TD.shape[0], idx_TK.shape[1], topo, None)
        _, handle, _ = dispatch.two_hop_dispatch(x_TD, idx_TK, w_TK, topo, caps, DROPLESS)
        sent_TN = handle.row1_TN < topo.nodes * caps.node
        here_N = jnp.arange(topo.nodes) == jax.lax.axis_index(topo.inter)
        return jnp.sum(sent_TN & ~here_N[None, :], axis=1)

    inter_T = np.asarray(_on_mesh(mesh, copies, x, idx, w))
    node_TK = np.asarray(idx) // topo.experts_per_node
    own_T = np.arange(x.shape[0]) // (x.shape[0] // 8) // topo.gpus
    distinct = [len(set(n) - {o}) for n, o in zip(node_TK, own_T, strict=True)]
    assert max(len(set(n)) for n in node_TK) <= CFG.topk_group  # at most M nodes
    np.testing.assert_array_equal(inter_T, distinct)  # once per other node, no more
    assert inter_T.sum() < (node_TK != own_T[:, None]).sum()  # fewer than the flat path's


@pytest.mark.parametrize(
    "ep, tol",
    [
        (DROPLESS, 1e-6),
        (EPOptions(path="flat", capacity_factor=None), 1e-6),
        (EPOptions(capacity_factor=None, kernel="pallas", fp8_dispatch=True), 2**-4),
        (EPOptions(capacity_factor=None, logfmt_bits=10), 2**-5),
    ],
)
def test_dispatch_then_combine_with_identity_experts_is_identity(ep, tol):
    mesh = make_mesh(2, 4)
    topo = Topology.for_mesh(CFG, mesh, ep.path)
    x, idx, w = _routed_tokens(mesh)

    def identity(x_RD, expert_RK, weight_RK):
        return x_RD * jnp.sum(
            jnp.where(expert_RK < topo.experts_per_device, weight_RK, 0), axis=-1, keepdims=True
        )

    def fn(x_TD, idx_TK, w_TK, probe_TD):
        def f(x_TD, w_TK):
            y_TD = dispatch.exchange(x_TD, idx_TK, w_TK, identity, topo, ep)[0]
            return jnp.sum(probe_TD * y_TD), y_TD

        (_, y_TD), (dx_TD, dw_TK) = jax.value_and_grad(f, (0, 1), has_aux=True)(x_TD, w_TK)
        return y_TD, dx_TD, dw_TK

    probe = jax.random.normal(jax.random.key(9), x.shape)
    # the Pallas interpreter does not track varying mesh axes
    y, dx, dw = _on_mesh(
        mesh, fn, x, idx, w, probe, out_specs=(DATA,) * 3, check_vma=ep.kernel != "pallas"
    )
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=tol, atol=tol * 4)
    # backward: y = x sum_k w_k, so dx = probe (the FP8 send is straight-through) and
    # dw_k = <probe, x> for every k
    np.testing.assert_allclose(np.asarray(dx), np.asarray(probe), rtol=1e-5, atol=1e-5)
    lossy = ep.fp8_dispatch or ep.logfmt_bits
    dw_want = np.sum(np.asarray(probe) * np.asarray(y if lossy else x), -1)
    np.testing.assert_allclose(
        np.asarray(dw), np.broadcast_to(dw_want[:, None], dw.shape), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("path", ["two_hop", "flat"])
def test_overflow_is_counted_exactly(path):
    """Every token picks experts 8, 9 (device 4 = node 1, gpu 0) and 10, 11 (device 5) of
    (node=2, gpu=4); capacities far below that load."""
    mesh = make_mesh(2, 4)
    topo, T = Topology.for_mesh(CFG, mesh), 8
    caps = Capacities(flat=3, node=3, gpu=4)
    x = jax.random.normal(jax.random.key(0), (8 * T, CFG.hidden_size))
    idx = jnp.tile(jnp.array([[8, 9, 10, 11]], jnp.int32), (8 * T, 1))
    w = jnp.full((8 * T, 4), 0.25)
    ep = EPOptions(path=path)

    def identity(x_RD, expert_RK, weight_RK):
        return x_RD * jnp.sum(weight_RK, axis=-1, keepdims=True)

    def fn(x_TD, idx_TK, w_TK):
        y, stats = dispatch.exchange(x_TD, idx_TK, w_TK, identity, topo, ep, caps)
        return y, stats.dropped

    y, dropped = _on_mesh(mesh, fn, x, idx, w, out_specs=(DATA, P()))
    share = np.zeros((8, T))  # how much of each token's x comes back
    if path == "flat":
        # each device sends 2T copies to device 4 and 2T to device 5; the first 3 fit:
        # token 0's two, token 1's first
        expect = 8 * 2 * (2 * T - 3)
        share[:, 0], share[:, 1] = 1.0, 0.5
    else:
        # hop 1: the first 3 tokens per device reach node 1, the others lose all 4 experts.
        # hop 2: each node-1 device gets 3 rows from node 0, then 3 of its own, and sends
        # all 6 to gpus 0 and 1 with room for 4: its own tokens 1 and 2 lose 2 experts twice
        expect = 8 * (T - 3) * 4 + 4 * 2 * 2 * 2
        share[:4, :3], share[4:, 0] = 1.0, 1.0
    assert int(dropped) == expect
    y = np.asarray(y).reshape(8, T, -1)
    np.testing.assert_allclose(
        y, share[..., None] * np.asarray(x).reshape(8, T, -1), rtol=1e-6, atol=1e-6
    )


def test_fp8_experts_under_expert_parallelism_equal_single_device():
    """fp8=true on a (2, 4) mesh: each device's experts run the FP8 recipe on the tokens
    the exchange brought; 1x128 token tiles make that equal to the single-device layer."""
    cfg = get_preset("tiny", ["n_routed_experts=16", "num_experts_per_tok=4", "fp8=true"])
    model = MoE(cfg, rngs=nnx.Rngs(0), ep=DROPLESS)
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)[0])
    x, _ = _inputs()
    y0 = fwd(state, x)
    mesh = make_mesh(2, 4)
    with jax.set_mesh(mesh):
        state = jax.device_put(state, sharding.state_shardings(state, mesh))
        y = fwd(state, jax.device_put(x, DATA))
    assert "f8_e4m3fn" in str(jax.make_jaxpr(fwd)(state, x))
    assert rel_err(y, y0) < 1e-5
