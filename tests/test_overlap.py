"""Dual micro-batch overlap (overlap.py) equals the unsplit MoE block on (node, gpu) meshes of
8 virtual CPU devices: forward values, gradients and statistics, two-hop and flat, with and
without FP8 dispatch; prefill's MoE likewise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax import overlap, sharding
from deepseek_jax.block import Block
from deepseek_jax.mesh import make_mesh
from deepseek_jax.moe.stages import Stages
from deepseek_jax.presets import get_preset
from tests.layouts import spec
from tests.numerics import rel_err

# D 64, 16 experts in 4 groups (2 kept), top-4, dropless buffers (capacities differ per half).
BASE = ["n_routed_experts=16", "num_experts_per_tok=4", "ep_capacity_factor=none"]
DATA = spec("batch")
B, T = 16, 8


def _run(cfg, mesh):
    """Block forward + gradients w.r.t. parameters and x, on ``mesh``."""
    block = Block(cfg, moe=True, rngs=nnx.Rngs(0))
    block.mlp.e_score_correction_bias[...] = jnp.linspace(-0.3, 0.3, cfg.n_routed_experts)
    graphdef, params, rest = nnx.split(block, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(1), (B, T, cfg.hidden_size), jnp.float32)
    probe = jax.random.normal(jax.random.key(2), x.shape, jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))

    @jax.jit
    def run(params, rest, x, probe, pos):
        def f(params, x):
            y, stats = nnx.merge(graphdef, params, rest, copy=True)(x, pos)
            return jnp.sum(probe * y) + 0.1 * stats.balance_loss, (y, stats)

        (_, (y, stats)), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, x)
        return y, stats, grads

    with jax.set_mesh(mesh):
        params = jax.device_put(params, sharding.state_shardings(params, mesh))
        rest = jax.device_put(rest, sharding.state_shardings(rest, mesh))
        args = [jax.device_put(a, DATA) for a in (x, probe, pos)]
        assert overlap.can_split(block.mlp, B) == (mesh.size > 1)
        return jax.device_get(run(params, rest, *args))


CASES = [  # (mesh, path, fp8 dispatch); the rest of the cross product is marked slow
    ((1, 8), "two_hop", False),
    ((2, 4), "two_hop", True),
    ((4, 2), "two_hop", False),
    ((1, 8), "flat", True),
    ((2, 4), "flat", False),
    ((4, 2), "flat", True),
]
SLOW = [(m, p, not f) for m, p, f in CASES]


@pytest.mark.parametrize(
    "shape, path, fp8", CASES + [pytest.param(*c, marks=pytest.mark.slow) for c in SLOW]
)
def test_dual_equals_unsplit_block(shape, path, fp8):
    mesh = make_mesh(*shape)
    opts = [*BASE, f"ep_dispatch={path}", f"ep_fp8_dispatch={fp8}"]
    y0, s0, (dp0, dx0) = _run(get_preset("tiny", opts), mesh)
    y1, s1, (dp1, dx1) = _run(get_preset("tiny", [*opts, "overlap=dual"]), mesh)
    assert int(s0.dropped) == int(s1.dropped) == 0
    for name in ("load_E", "dropped", "internode", "intranode"):  # sums over the halves
        np.testing.assert_array_equal(getattr(s1, name), getattr(s0, name), err_msg=name)
    np.testing.assert_allclose(float(s1.balance_loss), float(s0.balance_loss), rtol=1e-6)
    assert rel_err(y1, y0) < 1e-6
    assert rel_err(dx1, dx0) < 1e-5
    flat = jax.tree.leaves_with_path(dp1)
    for (p, g), g0 in zip(flat, jax.tree.leaves(dp0), strict=True):
        assert rel_err(g, g0) < 1e-5, jax.tree_util.keystr(p)


def test_dual_moe_for_prefill_equals_unsplit():
    mesh = make_mesh(2, 4)
    cfg = get_preset("tiny", [*BASE, "overlap=dual"])
    block = Block(cfg, moe=True, rngs=nnx.Rngs(0))
    h = jax.random.normal(jax.random.key(3), (B, T, cfg.hidden_size), jnp.float32)
    graphdef, state = nnx.split(block.mlp)

    @jax.jit
    def both(state, h):
        moe = nnx.merge(graphdef, state)
        return moe(h), overlap.dual_moe(moe, h)

    with jax.set_mesh(mesh):
        state = jax.device_put(state, sharding.state_shardings(state, mesh))
        (y0, s0), (y1, s1) = jax.device_get(both(state, jax.device_put(h, DATA)))
    assert rel_err(y1, y0) < 1e-6
    np.testing.assert_array_equal(s1.load_E, s0.load_E)


@pytest.mark.parametrize("shares", [[3, 1], [1, 0], [1, 1, 2]])
def test_expert_groups_sum_to_the_experts(shares):
    """experts(B) cut into groups of local experts (one group per combine hop it fills):
    the groups' outputs sum to the experts' output, an empty group included (4 experts per
    device on (2, 4))."""
    mesh = make_mesh(2, 4)
    cfg = get_preset("tiny", [*BASE, "n_routed_experts=32"])
    moe = Block(cfg, moe=True, rngs=nnx.Rngs(0)).mlp
    h = jax.random.normal(jax.random.key(4), (B, T, cfg.hidden_size), jnp.float32)
    graphdef, state = nnx.split(moe)

    @jax.jit
    def both(state, h):
        st = Stages(nnx.merge(graphdef, state), h.shape)
        assert st.topo.experts_per_device == 4
        d = h
        for hop in st.dispatch_hops():
            d = hop(d)
        ws = st.expert_weights()
        return st.experts(d.recv, ws), [part() for part in st.experts_in_parts(d.recv, ws, shares)]

    with jax.set_mesh(mesh):
        state = jax.device_put(state, sharding.state_shardings(state, mesh))
        whole, parts = jax.device_get(both(state, jax.device_put(h, DATA)))
    assert len(parts) == len(shares)
    assert all(np.abs(p).max() > 0 for p, share in zip(parts, shares, strict=True) if share)
    assert rel_err(sum(parts), whole) < 1e-6


def test_overlap_field_is_validated():
    with pytest.raises(ValueError, match="overlap"):
        get_preset("tiny", ["overlap=triple"])


def test_a_batch_that_cannot_be_halved_runs_unsplit_and_says_so(caplog, monkeypatch):
    """One sequence per device: dual does not apply, and one log line names the field and
    the batch (once per batch size); a batch that splits, or a single device, says nothing."""
    import deepseek_jax.block as block_mod

    monkeypatch.setattr(block_mod, "_unsplit_logged", set())
    block = Block(get_preset("tiny", [*BASE, "overlap=dual"]), moe=True, rngs=nnx.Rngs(0))
    with caplog.at_level("WARNING", logger="deepseek_jax.block"):
        with jax.set_mesh(make_mesh(1, 8)):
            assert [block._dual(b) for b in (16, 8, 8)] == [True, False, False]
        with jax.set_mesh(make_mesh(1, 1, devices=jax.devices()[:1])):
            assert not block._dual(8) and not block._dual(2)
    lines = [r.getMessage() for r in caplog.records if r.name == "deepseek_jax.block"]
    assert len(lines) == 1 and "overlap=dual" in lines[0] and "batch of 8 " in lines[0], lines


def test_packed_exchange_is_separate_all_to_alls_bit_for_bit_and_in_the_vjp():
    """bf16 payload, int32 ids and float32 weights in ONE all_to_all (a uint16 carrier): what
    arrives, bit for bit, and the cotangents sent back equal three separate all_to_alls."""
    from jax.sharding import PartitionSpec as P

    from deepseek_jax.moe import payload

    mesh = make_mesh(2, 4)
    names, hop = mesh.axis_names, mesh.axis_names[-1]  # hop 2's axis, whatever its name
    G, C = mesh.shape[hop], 3
    k1, k2, k3 = jax.random.split(jax.random.key(4), 3)
    x = jax.random.normal(k1, (8 * G, C, 5), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(k2, (8 * G, C, 2), jnp.float32).at[0, 0].set(jnp.array([-0.0, jnp.inf]))
    ids = jax.random.randint(k3, (8 * G, C, 2), -(2**31), 2**31 - 1, jnp.int32)
    probe = jax.random.normal(k1, (G, C, 5), jnp.float32)  # one device's block

    def loss(move, x, ids, w):
        xo, io, wo = move((x, ids, w))
        return jnp.sum(probe * xo) + jnp.sum(wo * jnp.arange(2.0)[None, None, :]), (xo, io, wo)

    def run(move):
        def local(x, ids, w):
            (_, out), g = jax.value_and_grad(
                lambda x, w: loss(move, x, ids, w), argnums=(0, 1), has_aux=True
            )(x, w)
            return out, g

        s = P(names)
        fn = jax.shard_map(local, mesh=mesh, in_specs=(s, s, s), out_specs=((s, s, s), (s, s)))
        args = [jax.device_put(a, jax.NamedSharding(mesh, s)) for a in (x, ids, w)]
        return jax.device_get(jax.jit(fn)(*args))

    packed = run(lambda parts: payload.exchange(parts, hop))
    apart = run(lambda parts: tuple(payload.all_to_all(p, hop) for p in parts))
    for a, b in zip(jax.tree.leaves(packed), jax.tree.leaves(apart), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
    assert not np.array_equal(packed[0][0], x)  # rows moved


def _model_grads(overrides, mesh, loop):
    """Transformer forward (logits, MTP logits, stats) + parameter gradients on ``mesh``."""
    from deepseek_jax.build import init_model

    cfg = get_preset("tiny", [*BASE, "num_hidden_layers=3", "first_k_dense_replace=1", *overrides])
    model = init_model(cfg, mesh, seed=3, layer_loop=loop)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids = jax.random.randint(jax.random.key(5), (B, T), 0, cfg.vocab_size)
    probe = jax.random.normal(jax.random.key(6), (B, T, cfg.vocab_size), jnp.float32)

    @jax.jit
    def run(params, rest, ids):
        def f(params):
            out = nnx.merge(graphdef, params, rest, copy=True)(ids)
            loss = jnp.sum(probe * out.logits_BTV) + jnp.sum(probe * out.mtp_logits_KBTV[0])
            return loss + 0.1 * jnp.sum(out.moe_stats.balance_loss_L), out

        return jax.grad(f, has_aux=True)(params)

    with jax.set_mesh(mesh):
        assert model.moe_layers._dual(B) == ("overlap=dual_deferred" in overrides)
        return jax.device_get(run(params, rest, jax.device_put(ids, DATA)))


@pytest.mark.slow  # two 3-layer models with MTP: over the fast tests' time budget
@pytest.mark.parametrize("loop, path", [("scan", "two_hop"), ("unroll", "flat")])
def test_dual_stack_with_combine_b_deferred_equals_unsplit(loop, path):
    """Two MoE blocks in a loop, each leaving half B's combine to the next, the last one's
    finished beside the head, and the MTP block's beside the MTP head: logits, MTP logits,
    statistics and gradients equal the unsplit model's."""
    mesh = make_mesh(2, 4)
    opts = [f"ep_dispatch={path}"]
    g0, out0 = _model_grads(opts, mesh, loop)
    g1, out1 = _model_grads([*opts, "overlap=dual_deferred"], mesh, loop)
    assert rel_err(out1.logits_BTV, out0.logits_BTV) < 1e-6
    assert rel_err(out1.mtp_logits_KBTV, out0.mtp_logits_KBTV) < 1e-6
    for stats in ("moe_stats", "mtp_stats"):  # the MTP block defers its combine(B) too
        s1, s0 = getattr(out1, stats), getattr(out0, stats)
        for name in ("load_LE", "dropped_L"):
            np.testing.assert_array_equal(getattr(s1, name), getattr(s0, name))
        np.testing.assert_allclose(s1.balance_loss_L, s0.balance_loss_L, 1e-6)
    for (p, g), h in zip(jax.tree.leaves_with_path(g1), jax.tree.leaves(g0), strict=True):
        assert rel_err(g, h) < 1e-5, jax.tree_util.keystr(p)
