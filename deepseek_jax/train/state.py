"""Train state born sharded: parameters, routing biases, ZeRO-1 optimizer state.

Parameters are float32 master weights, replicated over the data axes (no tensor
parallelism; routed experts are sharded over the expert axis). AdamW moments are split
over the data axes (ZeRO-1, ``sharding.zero1_sharding``): the step reduce-scatters the
gradients to that layout, updates each shard, and all-gathers the new parameters.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from deepseek_jax.build import abstract_model
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers.basic import is_matrix
from deepseek_jax.model import Transformer
from deepseek_jax.sharding import state_shardings, zero1_sharding
from deepseek_jax.train.config import TrainConfig


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: nnx.State  # nnx.Param leaves, float32
    rest: nnx.State  # everything else: the routing biases
    opt_state: Any


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio``."""
    return optax.warmup_cosine_decay_schedule(
        0.0,
        cfg.lr,
        max(cfg.warmup_steps, 1),
        max(cfg.steps, cfg.warmup_steps + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; weight decay on matrices only (no norms, biases)."""

    def decay_mask(params):
        return jax.tree.map(
            lambda v: is_matrix(v), params, is_leaf=lambda x: isinstance(x, nnx.Variable)
        )

    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(
            lr_schedule(cfg),
            cfg.b1,
            cfg.b2,
            cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        ),
    )


@flax.struct.dataclass
class Layout:
    """Shardings of a TrainState and of the ZeRO-1 copy of its parameters."""

    state: TrainState
    params_zero: nnx.State


def _with(abs_tree, shardings):
    """Attaches shardings to abstract leaves (inside nnx Variables too)."""

    def one(s, a):
        if isinstance(a, nnx.Variable):
            return a.replace(jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s))
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)

    return jax.tree.map(one, shardings, abs_tree)


def plan(
    cfg: ModelConfig, tcfg: TrainConfig, mesh: jax.sharding.Mesh
) -> tuple[nnx.GraphDef, TrainState, Layout, optax.GradientTransformation]:
    """Abstract train state and its shardings; nothing is allocated."""
    graphdef, abs_params, abs_rest = nnx.split(
        abstract_model(cfg, **tcfg.model_options), nnx.Param, ...
    )
    p_sh = state_shardings(abs_params, mesh)
    r_sh = state_shardings(abs_rest, mesh)
    pz_sh = jax.tree.map(lambda s, a: zero1_sharding(s, a.shape), p_sh, abs_params)
    tx = make_optimizer(tcfg)
    with jax.set_mesh(mesh):
        abs_opt = jax.eval_shape(tx.init, _with(abs_params, pz_sh))
    scalar = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    o_sh = jax.tree.map(  # concrete-mesh shardings (eval_shape yields abstract-mesh ones)
        lambda a: (
            jax.sharding.NamedSharding(mesh, a.sharding.spec)
            if isinstance(a.sharding, jax.sharding.NamedSharding)
            else scalar
        ),
        abs_opt,
    )
    abs_state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), abs_params, abs_rest, abs_opt)
    layout = Layout(TrainState(scalar, p_sh, r_sh, o_sh), pz_sh)
    return graphdef, abs_state, layout, tx


def init_state(
    cfg: ModelConfig, tcfg: TrainConfig, mesh: jax.sharding.Mesh
) -> tuple[nnx.GraphDef, TrainState, Layout, optax.GradientTransformation]:
    """A fresh train state, every leaf born with its final sharding."""
    graphdef, _, layout, tx = plan(cfg, tcfg, mesh)

    def init():
        model = Transformer(cfg, rngs=nnx.Rngs(tcfg.seed), **tcfg.model_options)
        _, params, rest = nnx.split(model, nnx.Param, ...)
        opt_state = tx.init(jax.reshard(params, layout.params_zero))
        return TrainState(jnp.zeros((), jnp.int32), params, rest, opt_state)

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=layout.state)()
    return graphdef, state, layout, tx


def abstract_state(abs_state: TrainState, layout: Layout) -> TrainState:
    """ShapeDtypeStructs with shardings: the restore target for a checkpoint."""
    return _with(abs_state, layout.state)
