"""The DeepSeekMoE layer: router, routed experts and shared experts (V3TR 2.1.2).

On a mesh of more than one device whose ``batch`` and ``expert`` axes are both (node, gpu)
the router and routed experts run inside ``shard_map``, exchanging tokens with
``dispatch.exchange`` (two-hop or flat, ``EPOptions``); otherwise, or when the batch does
not split over the devices, XLA partitions the single-device computation.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int

from deepseek_jax.config import ModelConfig
from deepseek_jax.fp8 import fp8_mode
from deepseek_jax.layers import MLP, param
from deepseek_jax.moe import dispatch, routing
from deepseek_jax.moe.dispatch import EPOptions, SlotSizes, Topology
from deepseek_jax.moe.experts import Backend, resolve_backend, routed_ffn
from deepseek_jax.sharding import EXPERT_AXES, logical_to_spec


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
        backend: Backend | None = None,
        ep: EPOptions | None = None,
    ):
        """backend: the local expert compute (``experts.routed_ffn``); default
        ``cfg.moe_backend``. ep: the expert-parallel exchange on a multi-device mesh;
        default from ``cfg.ep_*``."""
        D, E, F = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
        std, dtype = cfg.initializer_range, jnp.dtype(cfg.dtype)
        self.cfg = cfg
        self.backend = resolve_backend(backend or cfg.moe_backend)
        self.ep = ep or EPOptions.from_config(cfg)
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
        mesh = _mesh_of(args)
        if _expert_parallel_fits(mesh, x_BTD.shape[0]):
            y_BTD, stats = _expert_parallel(
                *args, cfg=self.cfg, backend=self.backend, opts=self.ep, mesh=mesh
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


def _expert_parallel_fits(mesh, batch: int) -> bool:
    """Explicit node and gpu axes, more than one device, tokens and experts both laid out
    over (node, gpu), and a batch that splits over them."""
    if mesh.empty or any(a not in mesh.axis_names for a in EXPERT_AXES):
        return False
    types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    if any(types[a] != jax.sharding.AxisType.Explicit for a in EXPERT_AXES):
        return False
    devices = math.prod(mesh.shape[a] for a in EXPERT_AXES)
    spec = lambda name: logical_to_spec((name,), mesh_axes=mesh.axis_names)[0]  # noqa: E731
    return devices > 1 and batch % devices == 0 and spec("batch") == spec("expert") == EXPERT_AXES


def _expert_parallel(
    x_BTD,
    gate_DE,
    bias_E,
    w_gate_EDF,
    w_up_EDF,
    w_down_EFD,
    *,
    cfg: ModelConfig,
    backend: Backend,
    opts: EPOptions,
    mesh,
):
    """Router and routed experts in ``shard_map`` over (node, gpu): (y_BTD, MoEStats)."""
    topo = Topology.for_mesh(cfg, mesh, opts.path)
    data = logical_to_spec(("batch", None, None), mesh_axes=mesh.axis_names)
    experts = logical_to_spec(("expert", None, None), mesh_axes=mesh.axis_names)
    rep = P()
    args = [
        _laid_out(a, s, mesh)
        for a, s in (
            (x_BTD, data),
            (gate_DE, rep),
            (w_gate_EDF, experts),
            (w_up_EDF, experts),
            (w_down_EFD, experts),
        )
    ]
    bias = jnp.zeros((cfg.n_routed_experts,), jnp.float32) if bias_E is None else bias_E
    args.insert(2, _laid_out(bias, rep, mesh))
    local = functools.partial(
        _routed_local, cfg=cfg, backend=backend, opts=opts, topo=topo, has_bias=bias_E is not None
    )
    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(data, rep, rep, experts, experts, experts),
        out_specs=(data, MoEStats(rep, rep, rep, rep, rep)),
        axis_names=set(EXPERT_AXES),
        check_vma=opts.kernel != "pallas",
    )
    return fn(*args)


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
    backend: Backend,
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
    stats = MoEStats(jax.lax.psum(load_E, EXPERT_AXES), jax.lax.pmean(loss, EXPERT_AXES), *st)
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
    x_BTD, gate_DE, bias_E, w_gate_EDF, w_up_EDF, w_down_EFD, *, cfg: ModelConfig, backend: Backend
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
    return list(ws) if cfg.fp8 else [w.astype(dtype) for w in ws]


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
