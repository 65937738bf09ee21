"""The DeepSeekMoE layer: router, routed experts and shared experts (V3TR 2.1.2)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import MLP, param
from deepseek_jax.moe import routing
from deepseek_jax.moe.experts import Backend, routed_ffn


class RoutingBias(nnx.Variable):
    """V3's ``e_score_correction_bias``: moved by the load rule, never by gradients."""


class MoEStats(NamedTuple):
    load_E: Float[Array, " E"]  # noqa: N815 - assignments per expert in this call
    balance_loss: Float[Array, ""]  # sequence-wise balance loss, before its weight alpha


class MoE(nnx.Module):
    """y = shared(x) + sum_k g_k FFN_{e_k}(x), with the experts chosen by ``routing.route``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, backend: Backend = "einsum"):
        D, E, F = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
        std, dtype = cfg.initializer_range, jnp.dtype(cfg.dtype)
        self.cfg = cfg
        self.backend = backend
        self.gate = param(rngs, (D, E), ("embed", None), std=std)
        self.e_score_correction_bias = (
            RoutingBias(jnp.zeros((E,), jnp.float32), out_sharding=(None,), eager_sharding=False)
            if cfg.has_routing_bias
            else None
        )
        self.w_gate = param(rngs, (E, D, F), ("expert", "embed", "mlp"), std=std)
        self.w_up = param(rngs, (E, D, F), ("expert", "embed", "mlp"), std=std)
        self.w_down = param(rngs, (E, F, D), ("expert", "mlp", "embed"), std=std)
        self.shared_experts = (
            MLP(D, cfg.n_shared_experts * F, std=std, dtype=dtype, rngs=rngs)
            if cfg.n_shared_experts
            else None
        )

    def __call__(self, x_BTD: Float[Array, "B T D"]) -> tuple[Float[Array, "B T D"], MoEStats]:
        """Args: x_BTD [B, T, D]. Returns: y_BTD [B, T, D] in ``cfg.dtype``, and the stats.

        Router logits and scores are float32; the experts run in ``cfg.dtype``.
        """
        dtype = jnp.dtype(self.cfg.dtype)
        bias = self.e_score_correction_bias
        args = (
            x_BTD.astype(dtype),
            self.gate[...],
            None if bias is None else bias[...],
            self.w_gate[...],
            self.w_up[...],
            self.w_down[...],
        )
        fn = lambda *a: _routed(*a, cfg=self.cfg, backend=self.backend)  # noqa: E731
        y_BTD, load_E, loss = _partitioned(fn, args)
        if self.shared_experts is not None:
            with jax.named_scope("shared_experts"):
                y_BTD = y_BTD + self.shared_experts(x_BTD)
        return y_BTD, MoEStats(load_E, loss)


def _partitioned(fn, args):
    """Runs ``fn`` with the Explicit mesh axes made Auto, so that XLA partitions the expert
    layout (batch-sharded tokens meet expert-sharded weights). ``fn`` returns (y laid out
    like ``args[0]``, a replicated value, a replicated value).

    The mesh is the context mesh, else the one the arguments' types carry (a jit over
    sharded arrays without ``set_mesh``); with neither, or no Explicit axis, ``fn`` runs
    as is.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        meshes = [jax.typeof(a).sharding.mesh for a in jax.tree.leaves(args)]
        mesh = next((m for m in meshes if not m.empty), mesh)
    explicit = tuple(
        a
        for a, t in zip(mesh.axis_names, mesh.axis_types, strict=True)
        if t == jax.sharding.AxisType.Explicit
    )
    if not explicit:
        return fn(*args)
    x_spec = jax.typeof(args[0]).sharding.spec
    outs = tuple(NamedSharding(mesh, s) for s in (x_spec, P(), P()))
    return jax.sharding.auto_axes(fn, axes=explicit, out_sharding=outs)(*args)


def _routed(
    x_BTD, gate_DE, bias_E, w_gate_EDF, w_up_EDF, w_down_EFD, *, cfg: ModelConfig, backend: Backend
):
    """Router and routed experts: (y_BTD in x's dtype, load_E, balance loss)."""
    B, T, D = x_BTD.shape
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    x_TD = x_BTD.reshape(B * T, D)
    with jax.named_scope("router"):
        logits_TE = x_TD.astype(jnp.float32) @ gate_DE.astype(jnp.float32)
        scores_TE = routing.gate_scores(logits_TE, cfg)
        idx_TK, weight_TK = routing.route(scores_TE, bias_E, cfg)
        load_E = routing.expert_load(idx_TK, E)
        loss = routing.sequence_balance_loss(
            scores_TE.reshape(B, T, E), idx_TK.reshape(B, T, K), cfg
        )
    with jax.named_scope("routed_experts"):
        ws = [w.astype(x_TD.dtype) for w in (w_gate_EDF, w_up_EDF, w_down_EFD)]
        y_TD = routed_ffn(x_TD, idx_TK, weight_TK, *ws, backend=backend)
    return y_TD.astype(x_BTD.dtype).reshape(B, T, D), load_E, loss
