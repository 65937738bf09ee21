"""The DeepSeekMoE layer: router, routed experts and shared experts (V3TR 2.1.2).

On a mesh of more than one device whose ``batch`` and ``expert`` axes are both (node, gpu)
the router and routed experts run inside ``shard_map``, exchanging tokens with
``dispatch.exchange`` (two-hop or flat, ``EPOptions``); otherwise, or when the batch does
not split over the devices, XLA partitions the single-device computation.

Shape letters: B batch, T positions (``x_TD``: B T tokens), D hidden, E routed experts, F
expert FFN width, K experts per token, R received rows.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int

import deepseek_jax.backends as backends
import deepseek_jax.moe.dispatch as dispatch
import deepseek_jax.moe.routing as routing
from deepseek_jax.config import EPOptions, ModelConfig
from deepseek_jax.fp8 import fp8_mode
from deepseek_jax.layers import MLP, param
from deepseek_jax.moe.dispatch import SlotSizes, Topology
from deepseek_jax.moe.experts import ExpertBackend, resolve_backend, routed_ffn
from deepseek_jax.sharding import RULES, Rules, logical_to_spec, mesh_axes_of


class RoutingBias(nnx.Variable):
    """V3's ``e_score_correction_bias``: moved by the load rule, never by gradients."""


class MoEStats(NamedTuple):
    load_E: Float[Array, " E"]  # assignments per expert in this call (all devices)
    balance_loss: Float[Array, ""]  # sequence-wise balance loss, before its weight alpha
    dropped: Int[Array, ""]  # assignments dropped by full expert-parallel buffers
    internode: Int[Array, ""]  # token copies sent to another node (dispatch)
    intranode: Int[Array, ""]  # token copies sent to another GPU of the node (dispatch)


class MoE(nnx.Module):
    """y = shared(x) + sum_k g_k FFN_{e_k}(x), with the experts chosen by ``routing.route``."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        backend: ExpertBackend | None = None,
        ep: EPOptions | None = None,
        rules: Rules = RULES,
    ):
        """backend: the local expert compute (``experts.routed_ffn``); default
        ``cfg.run.moe_backend``. ep: the expert-parallel exchange on a multi-device mesh;
        default ``cfg.run.ep``. rules: the logical-to-mesh table the exchange follows
        (which mesh axes hold experts and tokens, which one crosses nodes)."""
        D, E, F = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
        std, dtype = cfg.initializer_range, jnp.dtype(cfg.run.dtype)
        self.cfg = cfg
        self.backend = resolve_backend(backend or cfg.run.moe_backend)
        ep = ep or cfg.run.ep
        self.ep = dataclasses.replace(ep, kernel=backends.pallas_kernel("ep_kernel", ep.kernel))
        self.rules = rules
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
            MLP(D, cfg.n_shared_experts * F, std=std, dtype=dtype, rngs=rngs, fp8=fp8_mode(cfg))
            if cfg.n_shared_experts
            else None
        )

    def __call__(self, x_BTD: Float[Array, "B T D"]) -> tuple[Float[Array, "B T D"], MoEStats]:
        """Args: x_BTD [B, T, D]. Returns: y_BTD [B, T, D] in ``cfg.run.dtype``, and the stats.

        Router logits and scores are float32; the experts run in ``cfg.run.dtype``.
        """
        dtype = jnp.dtype(self.cfg.run.dtype)
        bias = self.e_score_correction_bias
        args = (
            x_BTD.astype(dtype),
            self.gate[...],
            None if bias is None else bias[...],
            self.w_gate[...],
            self.w_up[...],
            self.w_down[...],
        )
        mesh = _mesh_of(args)
        if _expert_parallel_fits(mesh, x_BTD.shape[0], self.rules):
            y_BTD, stats = _expert_parallel(
                *args, cfg=self.cfg, backend=self.backend, opts=self.ep, mesh=mesh, rules=self.rules
            )
        else:
            fn = lambda *a: _routed(*a, cfg=self.cfg, backend=self.backend)  # noqa: E731
            y_BTD, load_E, loss = _partitioned(fn, args, mesh)
            zero = jnp.zeros((), jnp.int32)
            stats = MoEStats(load_E, loss, zero, zero, zero)
        if self.shared_experts is not None:
            with jax.named_scope("shared_experts"):
                y_BTD = y_BTD + self.shared_experts(x_BTD)
        return y_BTD, stats


def _mesh_of(args):
    """The context mesh, else the one the arguments' types carry (a jit over sharded arrays
    without ``set_mesh``); possibly empty."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        meshes = [jax.typeof(a).sharding.mesh for a in jax.tree.leaves(args)]
        mesh = next((m for m in meshes if not m.empty), mesh)
    return mesh


def _expert_parallel_fits(mesh, batch: int, rules: Rules = RULES) -> bool:
    """Explicit node and gpu axes, more than one device, tokens and experts both laid out
    over (node, gpu), and a batch that splits over them."""
    expert_axes = mesh_axes_of("expert", rules)
    if mesh.empty or len(expert_axes) != 2 or any(a not in mesh.axis_names for a in expert_axes):
        return False
    types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    if any(types[a] != jax.sharding.AxisType.Explicit for a in expert_axes):
        return False
    devices = math.prod(mesh.shape[a] for a in expert_axes)
    spec = lambda name: logical_to_spec((name,), rules, mesh.axis_names)[0]  # noqa: E731
    return devices > 1 and batch % devices == 0 and spec("batch") == spec("expert") == expert_axes


def _expert_parallel(
    x_BTD,
    gate_DE,
    bias_E,
    w_gate_EDF,
    w_up_EDF,
    w_down_EFD,
    *,
    cfg: ModelConfig,
    backend: ExpertBackend,
    opts: EPOptions,
    mesh,
    rules: Rules = RULES,
):
    """Router and routed experts in ``shard_map`` over the expert axes: (y_BTD, MoEStats)."""
    topo = Topology.for_mesh(cfg, mesh, opts.path, rules)
    data = logical_to_spec(("batch", None, None), rules, mesh.axis_names)
    experts = logical_to_spec(("expert", None, None), rules, mesh.axis_names)
    rep = P()
    args = (
        *_router_inputs(x_BTD, gate_DE, bias_E, cfg, mesh, data),
        *(_laid_out(w, experts, mesh) for w in (w_gate_EDF, w_up_EDF, w_down_EFD)),
    )
    local = functools.partial(
        _routed_local, cfg=cfg, backend=backend, opts=opts, topo=topo, has_bias=bias_E is not None
    )
    in_specs = (data, rep, rep, experts, experts, experts)
    out_specs = (data, MoEStats(rep, rep, rep, rep, rep))
    return _expert_shard_map(local, mesh, topo, opts, in_specs, out_specs)(*args)


def _expert_shard_map(fn, mesh, topo: Topology, opts: EPOptions, in_specs, out_specs):
    """``fn`` in ``shard_map`` over the expert axes (the expert-parallel layer and each stage
    of the dual overlap); the Pallas exchange kernel carries no varying-axis types, so the
    check is off for it."""
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=in_specs,
        out_specs=out_specs,
        axis_names=set(topo.axes),
        check_vma=opts.kernel != "pallas",
    )


def _router_inputs(x_BTD, gate_DE, bias_E, cfg: ModelConfig, mesh, data: P):
    """(x, gate, bias) laid out for the router inside ``_expert_shard_map``: tokens on
    ``data``, gate and bias replicated; zeros stand in for a model without a bias (the local
    function is told ``has_bias``)."""
    bias = jnp.zeros((cfg.n_routed_experts,), jnp.float32) if bias_E is None else bias_E
    return tuple(_laid_out(a, s, mesh) for a, s in ((x_BTD, data), (gate_DE, P()), (bias, P())))


def _laid_out(x, spec: P, mesh):
    """x resharded to ``spec`` unless its type already says so (shard_map does not reshard)."""
    have = tuple(jax.typeof(x).sharding.spec)
    want = tuple(spec)
    pad = lambda s: s + (None,) * (x.ndim - len(s))  # noqa: E731
    if pad(have) == pad(want):
        return x
    return jax.reshard(x, NamedSharding(mesh, spec))


def _routed_local(
    x_BTD,
    gate_DE,
    bias_E,
    w_gate_EDF,
    w_up_EDF,
    w_down_EFD,
    *,
    cfg: ModelConfig,
    backend: ExpertBackend,
    opts: EPOptions,
    topo: Topology,
    has_bias: bool,
):
    """One device's share: x[B_(node,gpu), T, D] tokens, w_*[E_(node,gpu), ...] experts."""
    assert w_gate_EDF.shape[0] == topo.experts_per_device, (w_gate_EDF.shape, topo)
    B, T, D = x_BTD.shape
    x_TD = x_BTD.reshape(B * T, D)
    idx_TK, weight_TK, load_E, loss = _router(x_TD, gate_DE, bias_E if has_bias else None, cfg, B)
    ws = _expert_weights(cfg, x_TD.dtype, w_gate_EDF, w_up_EDF, w_down_EFD)
    K, El = cfg.num_experts_per_tok, topo.experts_per_device

    def experts(x_RD, expert_RK, weight_RK):
        sizes = SlotSizes.for_shapes(B * T, K, El, max_capacity=x_RD.shape[0])
        return routed_ffn(
            x_RD, expert_RK, weight_RK, *ws, backend=backend, sizes=sizes, fp8=fp8_mode(cfg)
        )

    with jax.named_scope("routed_experts"):
        y_TD, st = dispatch.exchange(x_TD, idx_TK, weight_TK, experts, topo, opts)
    stats = MoEStats(jax.lax.psum(load_E, topo.axes), jax.lax.pmean(loss, topo.axes), *st)
    return y_TD.astype(x_BTD.dtype).reshape(B, T, D), stats


def _partitioned(fn, args, mesh):
    """Runs ``fn`` with the Explicit mesh axes made Auto, so that XLA partitions the expert
    layout (batch-sharded tokens meet expert-sharded weights). ``fn`` returns (y laid out
    like ``args[0]``, a replicated value, a replicated value). With no mesh, or no Explicit
    axis, ``fn`` runs as is.
    """
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
    x_BTD,
    gate_DE,
    bias_E,
    w_gate_EDF,
    w_up_EDF,
    w_down_EFD,
    *,
    cfg: ModelConfig,
    backend: ExpertBackend,
):
    """Router and routed experts: (y_BTD in x's dtype, load_E, balance loss)."""
    B, T, D = x_BTD.shape
    x_TD = x_BTD.reshape(B * T, D)
    idx_TK, weight_TK, load_E, loss = _router(x_TD, gate_DE, bias_E, cfg, B)
    with jax.named_scope("routed_experts"):
        ws = _expert_weights(cfg, x_TD.dtype, w_gate_EDF, w_up_EDF, w_down_EFD)
        y_TD = routed_ffn(x_TD, idx_TK, weight_TK, *ws, backend=backend, fp8=fp8_mode(cfg))
    return y_TD.astype(x_BTD.dtype).reshape(B, T, D), load_E, loss


def _expert_weights(cfg: ModelConfig, dtype, *ws):
    """The expert weights as the GEMMs take them: the FP32 masters under FP8 (quantised
    per 128x128 block inside), else cast to the compute dtype."""
    return list(ws) if cfg.run.fp8 else [w.astype(dtype) for w in ws]


def _router(x_TD, gate_DE, bias_E, cfg: ModelConfig, batch: int):
    """(idx_TK, weight_TK, load_E, balance loss) of B = ``batch`` sequences in x_TD."""
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    with jax.named_scope("router"):
        logits_TE = x_TD.astype(jnp.float32) @ gate_DE.astype(jnp.float32)
        scores_TE = routing.gate_scores(logits_TE, cfg)
        idx_TK, weight_TK = routing.route(scores_TE, bias_E, cfg)
        load_E = routing.expert_load(idx_TK, E)
        loss = routing.sequence_balance_loss(
            scores_TE.reshape(batch, -1, E), idx_TK.reshape(batch, -1, K), cfg
        )
    return idx_TK, weight_TK, load_E, loss


# The layer's pieces that the dual overlap's stages call (moe/stages.py, overlap.py, block.py).
mesh_of = _mesh_of
expert_parallel_fits = _expert_parallel_fits
expert_shard_map = _expert_shard_map
expert_weights = _expert_weights
laid_out = _laid_out
router = _router
router_inputs = _router_inputs
