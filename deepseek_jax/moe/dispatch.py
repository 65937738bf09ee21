"""Expert-parallel dispatch and combine over the (node, gpu) mesh, inside ``shard_map``.

Design note.
*What DeepSeek-V3 does* (V3TR 2.1.2 and 3.2.2, ISCA 4.3; DESIGN.md "One MoE layer"): the
256 routed experts are spread over 8 nodes of 8 GPUs, one routing group per node, and each
token may use at most M = 4 nodes (node-limited routing). A token crosses InfiniBand once
per chosen node, not once per expert: it goes to the GPU with the same in-node index on
each target node, then is forwarded over NVLink to the GPUs holding its experts there.
The experts' outputs come back the same way, summed per GPU and per node before each hop.
DeepEP implements this with NVSHMEM kernels, dispatch in FP8 with 1x128 scales, combine
in BF16, and a handle from dispatch that combine reuses.

*What we do.* Experts are sharded over (node, gpu) in order: device d = node x G + gpu
holds experts [d E/R, (d+1) E/R), so routing group g (E / n_group experts) lies on node
g / (n_group / N): the node limit of ``routing.route`` bounds nodes per token by
``topk_group`` (``Topology.for_mesh`` checks that the config fits the mesh). Per device,
with T local tokens:
- ``two_hop_dispatch`` (default). Hop 1, ``all_to_all`` over ``node``: one row per
  (token, destination node) to the peer with the same ``gpu`` index, carrying the token's
  K expert ids (node-local, others blanked) and gate weights. Hop 2, ``all_to_all`` over
  ``gpu``: each received row once per destination GPU, ids now device-local. The experts
  run on what arrives (``experts.routed_ffn``, which applies the gate weights and sums a
  row's local experts). ``two_hop_combine`` reverses it: back over ``gpu``, each hop-1
  row sums its GPUs' results, back over ``node``, each token sums its nodes' results.
  So at most one vector per (token, node) crosses ``node`` either way.
- ``flat_dispatch`` (the reference and the comparison, what MaxText and EasyDeL do): one
  ``all_to_all`` over (node, gpu) with a row per (token, expert); the gate weights are
  applied when the results come back (``flat_combine``).
Each hop is one padded ``all_to_all`` of a [peers, capacity, D] buffer (``ragged_all_to_all``
has no XLA:CPU lowering), the ids and gate weights packed beside the payload in each row
(``payload.exchange``: a lone small transfer of ids could not hide behind compute). Row r
of peer p's block is the r-th copy, in token order, this device sends to p; copies beyond
the capacity are dropped (they contribute nothing), counted exactly and reported
(``ExchangeStats.dropped``, in (token, expert) assignments).
The permute into the send buffer is ``permute_quantize`` (optionally E4M3 with 1x128
scales: the FP8 dispatch) and the return to token order is ``combine``, our Pallas kernels
(``pallas_kernels/dispatch.py``) or their jnp twins (``EPOptions.kernel``), made
differentiable in ``payload.py``.

*Capacities* (``Capacities.for_tokens``): a capacity factor times the balanced load, plus
two standard deviations of a balanced load, rounded up to 8 and capped at the worst case,
which ``capacity_factor=None`` (dropless) uses outright. Balanced loads per peer: flat
T K / R; hop 1 T M / N (each token reaches at most M = min(topk_group, N) nodes); hop 2
T min(K, M G) / G. Worst cases: flat T min(K, E/R); hop 1 T (a token goes once to a
node); hop 2 N C1 (every received row to one GPU). The node limit is what keeps hop 1
small: its worst case is T per peer, against T min(K, E/R) for a flat buffer that never
drops. The default factor, 3, dropped nothing in our checks (tiny and small presets at
init; tiny's first steps on text, where factor 2 dropped 0.4 %; ``bench_ep``).

*What we simplify relative to DeepEP.* Dense padded buffers and XLA collectives instead
of NVSHMEM kernels writing straight into the receivers' buffers, so the wire carries the
full capacity, not the used rows; no overlap of the hops with compute (that is
``overlap.py``'s job via XLA's scheduler); the FP8 payload is dequantised on arrival and
requantised for hop 2 (lossless: the dequantised tile requantises to the same codes)
instead of forwarded as raw bytes; the combine payload is the compute dtype (BF16 when
training in BF16, as V3); a capacity overflow drops the copy (DeepEP is dropless with
dynamic sizes); the gradients travel the reverse routes in the compute dtype.

Shape letters (one device's block inside shard_map): T tokens, K experts per token, D
hidden, A = T K assignments, P peers of an all_to_all, C capacity per peer, R devices
(``x_RCD``) or received rows (``x_RD``), N nodes and G GPUs per node (here, not nope dim and
groups), U rows received by hop 1, X the items ``_slots`` places.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from deepseek_jax.config import EPOptions, EPPath, ModelConfig
from deepseek_jax.moe.payload import all_to_all, combine_rows, send
from deepseek_jax.moe.permute import (  # noqa: F401 - the local permutation, re-exported
    Dispatch,
    SlotSizes,
    gather_slots,
    permute,
    permute_sorted,
    sort_assignments,
    unpermute,
    unpermute_sorted,
    weighted_rows,
)
from deepseek_jax.moe.permute import blank_others as _blank_others
from deepseek_jax.moe.permute import send_slots as _slots
from deepseek_jax.sharding import RULES, Rules, expert_links

_DEFAULT_EP = EPOptions()
ExpertFn = Callable[[Array, Array, Array], Array]  # (x_RD, expert_RK, weight_RK) -> y_RD


@dataclasses.dataclass(frozen=True)
class Topology:
    """Where the experts live: N nodes x G GPUs, E experts in device order.

    max_nodes: nodes one token can reach (M): ``topk_group`` under node-limited routing
      (each group on one node), else N.
    """

    nodes: int
    gpus: int
    experts: int
    max_nodes: int
    inter: str  # the mesh axis between nodes (hop 1), from the rules table
    intra: str  # the mesh axis inside a node (hop 2)

    @property
    def axes(self) -> tuple[str, str]:
        """Both expert-parallel mesh axes, inter-node first (the flat exchange's group)."""
        return (self.inter, self.intra)

    @property
    def devices(self) -> int:
        return self.nodes * self.gpus

    @property
    def experts_per_device(self) -> int:
        return self.experts // self.devices

    @property
    def experts_per_node(self) -> int:
        return self.experts // self.nodes

    @classmethod
    def for_mesh(
        cls, cfg: ModelConfig, mesh, path: EPPath = "two_hop", rules: Rules = RULES
    ) -> Topology:
        """The layout of ``cfg``'s experts on ``mesh`` under ``rules``; ValueError when they
        do not fit."""
        inter, intra = expert_links(rules)
        N, G = mesh.shape[inter], mesh.shape[intra]
        E, ng, M = cfg.n_routed_experts, cfg.n_group, cfg.topk_group
        where = f"the mesh ({inter}={N}, {intra}={G})"
        if E % (N * G):
            raise ValueError(
                f"ModelConfig.n_routed_experts = {E} is not divisible by the {N * G} devices "
                f"of {where}: expert parallelism needs the same number of experts per device"
            )
        limited = cfg.topk_method != "greedy" and M < ng
        if limited and ng % N:
            if path == "two_hop":
                raise ValueError(
                    f"ModelConfig.n_group = {ng} is not a multiple of node = {N} in {where}: "
                    f"node-limited routing (topk_group = {M}) needs each routing group on "
                    f"one node. Choose a mesh whose node size divides n_group, or "
                    f"ep_dispatch=flat"
                )
            limited = False
        return cls(N, G, E, min(M, N) if limited else N, inter, intra)


@dataclasses.dataclass(frozen=True)
class Capacities:
    """Rows per peer in each send buffer: flat (per device), node (hop 1), gpu (hop 2)."""

    flat: int
    node: int
    gpu: int

    @classmethod
    def for_tokens(cls, tokens: int, k: int, topo: Topology, factor: float | None) -> Capacities:
        """factor x mean + 2 sqrt(mean) rows (mean: the balanced load; the square root is
        its spread, which dominates for small T), rounded up to 8, capped at the worst
        case; ``factor=None``: the worst case."""
        T, N, G, M = tokens, topo.nodes, topo.gpus, topo.max_nodes

        def size(mean: float, worst: int) -> int:
            if factor is None:
                return worst
            rows = math.ceil(factor * mean + 2 * math.sqrt(mean))
            return max(1, min(worst, -(-rows // 8) * 8))

        flat = size(T * k / topo.devices, T * min(k, topo.experts_per_device))
        node = size(T * M / N, T)
        gpu = size(T * min(k, M * G) / G, N * node)
        return cls(flat, node, gpu)


class ExchangeStats(NamedTuple):
    """Counts of one exchange: this device's from the ``*_dispatch`` functions, mesh totals
    from ``exchange``."""

    dropped: Int[Array, ""]  # (token, expert) assignments that found no room
    internode: Int[Array, ""]  # copies sent over ``node`` to another node
    intranode: Int[Array, ""]  # copies sent over ``gpu`` to another GPU of the same node


class FlatHandle(NamedTuple):
    row_TK: Int[Array, "T K"]  # each assignment's row in the return (R C: none)


class TwoHopHandle(NamedTuple):
    row1_TN: Int[Array, "T N"]  # each token's row per node in the hop-1 return
    row2_UG: Int[Array, "U G"]  # each hop-1 row's row per GPU in the hop-2 return


class Received(NamedTuple):
    """What a device's experts get: rows, their device-local expert ids (E/R: none) and
    gate weights (0 where none)."""

    x_RD: Float[Array, "R D"]
    expert_RK: Int[Array, "R K"]
    weight_RK: Float[Array, "R K"]


# ------------------------------------------------------------------------ the exchange


def exchange(
    x_TD: Float[Array, "T D"],
    idx_TK: Int[Array, "T K"],
    weight_TK: Float[Array, "T K"],
    expert_fn: ExpertFn,
    topo: Topology,
    opts: EPOptions = _DEFAULT_EP,
    caps: Capacities | None = None,
) -> tuple[Float[Array, "T D"], ExchangeStats]:
    """Routed experts across the mesh; call inside ``shard_map`` over (node, gpu).

    Args:
      x_TD: this device's tokens (compute dtype). idx_TK: their global expert ids;
        weight_TK: gate weights (float32).
      expert_fn: (x_RD, expert_RK, weight_RK) -> float32 [R, D], sum_k weight * FFN of
        the device-local expert (id ``experts_per_device`` = none) for each received row.
      caps: per-peer capacities; default ``Capacities.for_tokens`` with the options' factor.
    Returns:
      y_TD: float32 sum_k weight[t, k] FFN_{idx[t, k]}(x[t]) over the assignments that
        were not dropped; stats: mesh totals (psum over node and gpu).
    """
    T, K = idx_TK.shape
    caps = caps or Capacities.for_tokens(T, K, topo, opts.capacity_factor)
    dtype = jnp.dtype(opts.combine_dtype or x_TD.dtype)
    if opts.path == "flat":
        recv, handle, stats = flat_dispatch(x_TD, idx_TK, topo, caps, opts)
        with jax.named_scope("ep_experts"):
            y_RD = expert_fn(*recv)
        y_TD = flat_combine(y_RD, weight_TK, handle, topo, caps, opts, dtype)
    elif opts.path == "two_hop":
        recv, handle, stats = two_hop_dispatch(x_TD, idx_TK, weight_TK, topo, caps, opts)
        with jax.named_scope("ep_experts"):
            y_RD = expert_fn(*recv)
        y_TD = two_hop_combine(y_RD, handle, topo, caps, opts, dtype)
    else:
        raise ValueError(f"EPOptions.path: unknown {opts.path!r}; use 'two_hop' or 'flat'")
    return y_TD, ExchangeStats(*(jax.lax.psum(s, topo.axes) for s in stats))


@jax.named_scope("ep_flat_dispatch")
def flat_dispatch(
    x_TD, idx_TK, topo: Topology, caps: Capacities, opts: EPOptions
) -> tuple[Received, FlatHandle, ExchangeStats]:
    """One row per (token, expert) to the expert's device, one all_to_all over (node, gpu)."""
    T, K = idx_TK.shape
    R, El, C = topo.devices, topo.experts_per_device, caps.flat
    idx_A = idx_TK.reshape(T * K)
    dev_A = idx_A // El
    slot_AR, src_RC, ok_AR = _slots(dev_A[:, None] == jnp.arange(R)[None, :], C)
    expert_RC = jnp.take(idx_A % El, src_RC, mode="fill", fill_value=El)
    x_RCD, (expert_RC1,) = send(
        x_TD,
        src_RC // K,
        topo.axes,
        fp8=opts.fp8_dispatch,
        kernel=opts.kernel,
        logfmt_bits=opts.logfmt_bits,
        extras=(expert_RC[..., None],),
    )
    expert_RC = expert_RC1[..., 0]
    me_node, me_gpu = jax.lax.axis_index(topo.inter), jax.lax.axis_index(topo.intra)
    sent_A = jnp.any(ok_AR, axis=1)
    node_A, gpu_A = dev_A // topo.gpus, dev_A % topo.gpus
    stats = ExchangeStats(
        dropped=jnp.sum(~sent_A),
        internode=jnp.sum(sent_A & (node_A != me_node)),
        intranode=jnp.sum(sent_A & (node_A == me_node) & (gpu_A != me_gpu)),
    )
    row_TK = jnp.min(slot_AR, axis=1).reshape(T, K)
    recv = Received(
        x_RCD.reshape(R * C, -1),
        expert_RC.reshape(R * C, 1),
        (expert_RC < El).astype(jnp.float32).reshape(R * C, 1),
    )
    return recv, FlatHandle(row_TK), stats


@jax.named_scope("ep_flat_combine")
def flat_combine(
    y_RD, weight_TK, handle: FlatHandle, topo: Topology, caps: Capacities, opts: EPOptions, dtype
) -> Float[Array, "T D"]:
    """Results back over (node, gpu), then each token sums its experts' with the gates."""
    R, C, D = topo.devices, caps.flat, y_RD.shape[-1]
    back_RCD = all_to_all(y_RD.astype(dtype).reshape(R, C, D), topo.axes)
    return combine_rows(back_RCD.reshape(R * C, D), handle.row_TK, weight_TK, opts.kernel)


def two_hop_dispatch(
    x_TD, idx_TK, weight_TK, topo: Topology, caps: Capacities, opts: EPOptions
) -> tuple[Received, TwoHopHandle, ExchangeStats]:
    """Hop 1 over ``node`` once per (token, node), hop 2 over ``gpu`` once per (row, GPU)."""
    h1 = dispatch_hop1(x_TD, idx_TK, weight_TK, topo, caps, opts)
    recv, row2_UG, st2 = dispatch_hop2(h1, topo, caps, opts)
    stats = ExchangeStats(h1.stats.dropped + st2.dropped, h1.stats.internode, st2.intranode)
    return recv, TwoHopHandle(h1.row1_TN, row2_UG), stats


class Hop1(NamedTuple):
    """What hop 1 hands hop 2 (``overlap.py`` runs the hops in separate phases)."""

    x_UD: Float[Array, "U D"]  # U = N C1 received rows
    e_UK: Int[Array, "U K"]  # their node-local expert ids (E/N: none)
    w_UK: Float[Array, "U K"]
    row1_TN: Int[Array, "T N"]
    stats: ExchangeStats  # hop 1's drops and internode copies (intranode: 0)


@jax.named_scope("ep_hop1_inter_node")
def dispatch_hop1(x_TD, idx_TK, weight_TK, topo: Topology, caps: Capacities, opts) -> Hop1:
    """Rows to the same-gpu peer of each chosen node, with the ids as node-local."""
    N, En, K = topo.nodes, topo.experts_per_node, idx_TK.shape[1]
    to_TNK = (idx_TK // En)[:, None, :] == jnp.arange(N)[None, :, None]
    row1_TN, src1_NC, ok1_TN = _slots(jnp.any(to_TNK, axis=2), caps.node)
    e1_NCK, w1_NCK = _blank_others(idx_TK, weight_TK, src1_NC, En)
    kw = dict(fp8=opts.fp8_dispatch, kernel=opts.kernel, logfmt_bits=opts.logfmt_bits)
    x1_NCD, (e1_NCK, w1_NCK) = send(x_TD, src1_NC, topo.inter, extras=(e1_NCK, w1_NCK), **kw)
    me_node = jax.lax.axis_index(topo.inter)
    stats = ExchangeStats(
        dropped=jnp.sum(jnp.where(ok1_TN, 0, jnp.sum(to_TNK, axis=2))),
        internode=jnp.sum(ok1_TN & (jnp.arange(N) != me_node)[None, :]),
        intranode=jnp.zeros((), jnp.int32),
    )
    D = x_TD.shape[1]
    return Hop1(x1_NCD.reshape(-1, D), e1_NCK.reshape(-1, K), w1_NCK.reshape(-1, K), row1_TN, stats)


@jax.named_scope("ep_hop2_intra_node")
def dispatch_hop2(h1: Hop1, topo: Topology, caps: Capacities, opts: EPOptions):
    """Each hop-1 row to the GPUs of its experts on this node: (Received, row2_UG, stats)."""
    G, El, K = topo.gpus, topo.experts_per_device, h1.e_UK.shape[1]
    to_UGK = (h1.e_UK // El)[:, None, :] == jnp.arange(G)[None, :, None]
    row2_UG, src2_GC, ok2_UG = _slots(jnp.any(to_UGK, axis=2), caps.gpu)
    e2_GCK, w2_GCK = _blank_others(h1.e_UK, h1.w_UK, src2_GC, El)
    kw = dict(fp8=opts.fp8_dispatch, kernel=opts.kernel, logfmt_bits=opts.logfmt_bits)
    x2_GCD, (e2_GCK, w2_GCK) = send(h1.x_UD, src2_GC, topo.intra, extras=(e2_GCK, w2_GCK), **kw)
    me_gpu = jax.lax.axis_index(topo.intra)
    stats = ExchangeStats(
        dropped=jnp.sum(jnp.where(ok2_UG, 0, jnp.sum(to_UGK, axis=2))),
        internode=jnp.zeros((), jnp.int32),
        intranode=jnp.sum(ok2_UG & (jnp.arange(G) != me_gpu)[None, :]),
    )
    R = G * caps.gpu
    recv = Received(x2_GCD.reshape(R, -1), e2_GCK.reshape(R, K), w2_GCK.reshape(R, K))
    return recv, row2_UG, stats


def two_hop_combine(
    y_RD, handle: TwoHopHandle, topo: Topology, caps: Capacities, opts: EPOptions, dtype
) -> Float[Array, "T D"]:
    """Back over ``gpu``, sum per hop-1 row; back over ``node``, sum per token (float32)."""
    y1_UD = back_hop2(y_RD, handle, topo, caps, opts, dtype)
    return back_hop1(y1_UD, handle, topo, caps, opts, dtype)


@jax.named_scope("ep_back_hop2_intra_node")
def back_hop2(y_RD, handle: TwoHopHandle, topo, caps, opts, dtype) -> Float[Array, "U D"]:
    """Combine's first hop (``overlap.py`` runs the hops in separate phases)."""
    back2_GCD = all_to_all(y_RD.astype(dtype).reshape(topo.gpus, caps.gpu, -1), topo.intra)
    return combine_rows(back2_GCD.reshape(-1, y_RD.shape[-1]), handle.row2_UG, None, opts.kernel)


@jax.named_scope("ep_back_hop1_inter_node")
def back_hop1(y1_UD, handle: TwoHopHandle, topo, caps, opts, dtype) -> Float[Array, "T D"]:
    back1_NCD = all_to_all(y1_UD.astype(dtype).reshape(topo.nodes, caps.node, -1), topo.inter)
    return combine_rows(back1_NCD.reshape(-1, y1_UD.shape[-1]), handle.row1_TN, None, opts.kernel)
