"""The pipelined-equals-unpipelined check shared by the equality tests: the reference (one
device, one per layer count) and the comparison of loss terms, gradients and MoE loads."""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from deepseek_jax.build import init_model
from deepseek_jax.mesh import make_mesh
from deepseek_jax.pipeline.executor import value_and_grad
from deepseek_jax.pipeline.placement import Pipeline
from deepseek_jax.presets import get_preset
from deepseek_jax.sharding import state_shardings
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.loss import total_loss
from deepseek_jax.train.step import head_loss
from tests.layouts import spec

TCFG = TrainConfig()
SCHEDULES = ["1f1b", "zb1p", "dualpipe", "dualpipev"]

ROWS, T = 16, 8  # one global batch for every mesh: 16 sequences of 8 positions (+1 target)


@functools.cache
def reference(layers: int):
    """The unpipelined loss terms and gradient on one device, shared by every schedule and
    mesh of this layer count; the parameters (on the host) and tokens they used."""
    cfg = get_preset("tiny", [f"num_hidden_layers={layers}"])
    mesh = make_mesh(1, 1, devices=jax.devices()[:1])
    graphdef, params, rest = nnx.split(init_model(cfg, mesh, seed=1), nnx.Param, ...)
    ids = jax.random.randint(jax.random.key(0), (ROWS, T + 1), 0, cfg.vocab_size)
    with jax.set_mesh(mesh):
        terms, grads = jax.jit(unpipelined(graphdef))(params, rest, ids)
    return cfg, graphdef, *jax.device_get((params, rest, ids, terms, grads))


def unpipelined(graphdef):
    def ref(params, rest, ids):
        def loss_fn(p):
            out = nnx.merge(graphdef, p, rest, copy=True)(ids[:, :-1])
            return total_loss(out, ids, TCFG)

        (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return terms, grads

    return ref


@functools.cache
def reference_on(mesh_shape: tuple[int, int, int], layers: int, rows: int):
    """The same on a stage mesh (which exercises the gathered layer stacks), for the wider
    slow cases."""
    stage, node, gpu = mesh_shape
    cfg, graphdef, params, rest, _, _, _ = reference(layers)
    mesh = make_mesh(node, gpu, stage=stage)
    params, rest = placed(mesh, params, rest)
    ids = jax.random.randint(jax.random.key(0), (rows, T + 1), 0, cfg.vocab_size)
    with jax.set_mesh(mesh):
        ids = jax.device_put(ids, spec("batch", None))
        terms, grads = jax.jit(unpipelined(graphdef))(params, rest, ids)
    return ids, terms, grads


def placed(mesh, *states):
    return tuple(jax.device_put(s, state_shardings(s, mesh)) for s in states)


def check_equal(name, mesh_shape, layers, m, *, same_mesh: bool = False):
    """Pipelined loss terms, gradients and MoE loads against the unpipelined model's."""
    stage, node, gpu = mesh_shape
    cfg, graphdef, params, rest, ids, want_terms, want = reference(layers)
    mesh = make_mesh(node, gpu, stage=stage)
    params, rest = placed(mesh, params, rest)
    if same_mesh:
        ids, want_terms, want = reference_on(mesh_shape, layers, m * node * gpu)
    pipe = Pipeline.build(cfg, name, stage, m)
    step = functools.partial(head_loss, TCFG)
    with jax.set_mesh(mesh):
        ids = jax.device_put(ids, spec("batch", None))
        fn = jax.jit(
            lambda p, r, i: value_and_grad(pipe, graphdef, p, r, i, step, TCFG.balance_alpha)
        )
        terms, grads, moe, mtp = fn(params, rest, ids)
    for k, v in want_terms.items():
        np.testing.assert_allclose(terms[k], v, rtol=2e-6, err_msg=k)
    rel = jax.tree.map(
        lambda a, b: float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)), grads, want
    )
    worst = max(jax.tree_util.tree_leaves_with_path(rel), key=lambda kv: kv[1])
    assert worst[1] < 1e-5, worst
    assert moe[0].shape == (cfg.num_moe_layers, cfg.n_routed_experts)
    tokens = ids.shape[0] * (ids.shape[1] - 1) * cfg.num_experts_per_tok
    np.testing.assert_allclose(moe[0].sum(-1), tokens)  # every micro-batch's load, once
    np.testing.assert_allclose(mtp.load_LE.sum(-1), tokens)


def layers_for(name: str, stage: int) -> int:
    """An uneven split everywhere, the dense first layer on stage 0: tiny's 3 layers over 2
    stages (2 + 1), 5 over 4 stages or DualPipeV's 4 chunks, 9 over DualPipeV's 8 chunks."""
    chunks = stage * (2 if name == "dualpipev" else 1)
    return {2: 3, 4: 5, 8: 9}[chunks]


def fewest_microbatches(name: str, stage: int) -> int:
    """The fewest micro-batches a schedule takes: PP, or 2 PP for DualPipe(V)."""
    return 2 * stage if name.startswith("dualpipe") else stage
