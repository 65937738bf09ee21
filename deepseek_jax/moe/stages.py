"""The MoE layer of ``moe/layer.py`` cut at its collectives into ``shard_map`` stages (router
+ dispatch hop 1, hop 2, experts, combine hop by hop), each a call of the same
``moe/dispatch.py`` functions, for the dual micro-batch schedule of ``overlap.py``.

Shape letters: B batch (a half's), T positions, D hidden, E routed experts, K experts per
token, R received rows, U hop-1 rows.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int

import deepseek_jax.moe.dispatch as dsp
from deepseek_jax.codesign.schedule import CostModel
from deepseek_jax.fp8 import fp8_mode
from deepseek_jax.moe.experts import routed_ffn
from deepseek_jax.moe.layer import (
    MoE,
    MoEStats,
    expert_shard_map,
    expert_weights,
    laid_out,
    mesh_of,
    router,
    router_inputs,
)
from deepseek_jax.sharding import logical_to_spec


class Dispatched(NamedTuple):
    """One half after dispatch: per-device pieces stacked on a leading (node, gpu) axis."""

    recv: dsp.Received
    handle: Any  # FlatHandle | TwoHopHandle
    weight_TK: Float[Array, "T K"]  # the gate weights (flat combine applies them)
    stats: MoEStats


class Midway(NamedTuple):
    """One half after hop 1 of a two-hop dispatch (``dispatch.Hop1``, stacked likewise)."""

    x_UD: Float[Array, "U D"]
    e_UK: Int[Array, "U K"]
    w_UK: Float[Array, "U K"]
    row1_TN: Int[Array, "T N"]
    weight_TK: Float[Array, "T K"]
    stats: MoEStats  # the router's, hop 1's drops and internode copies


class Stages:
    """The MoE layer's shard_map stages (one all-to-all each, and the experts) for halves of
    ``shape_BTD``."""

    def __init__(self, moe: MoE, shape_BTD: tuple[int, ...]):
        cfg = moe.cfg
        self.moe, self.cfg, self.opts = moe, cfg, moe.ep
        self.mesh = mesh_of(())
        self.topo = dsp.Topology.for_mesh(cfg, self.mesh, self.opts.path, moe.rules)
        self.T = math.prod(shape_BTD[:2]) // self.topo.devices  # local tokens of a half
        self.seq = shape_BTD[1]
        self.caps = dsp.Capacities.for_tokens(
            self.T, cfg.num_experts_per_tok, self.topo, self.opts.capacity_factor
        )
        names = self.mesh.axis_names
        self.data = logical_to_spec(("batch", None, None), mesh_axes=names)
        self.experts_spec = logical_to_spec(("expert", None, None), mesh_axes=names)
        self.dtype = jnp.dtype(cfg.run.dtype)

    def _smap(self, fn, in_specs, out_specs):
        return expert_shard_map(fn, self.mesh, self.topo, self.opts, in_specs, out_specs)

    def dispatch(self, h_BTD) -> Dispatched | Midway:
        moe, rep, dev = self.moe, P(), P(self.topo.axes)
        bias = moe.e_score_correction_bias
        has_bias = bias is not None
        x_BTD = h_BTD.astype(self.dtype)
        bias = bias[...] if has_bias else None
        args = router_inputs(x_BTD, moe.gate[...], bias, self.cfg, self.mesh, self.data)
        stats = MoEStats(rep, rep, rep, rep, rep)
        if self.opts.path == "flat":  # the whole dispatch; two-hop: the router and hop 1
            out_specs = Dispatched(dsp.Received(dev, dev, dev), dsp.FlatHandle(dev), dev, stats)
        else:
            out_specs = Midway(dev, dev, dev, dev, dev, stats)
        local = functools.partial(self._dispatch_local, has_bias=has_bias)
        return self._smap(local, (self.data, rep, rep), out_specs)(*args)

    def dispatch_hops(self) -> list:
        """Dispatch as a list of stages with one all-to-all each: two-hop over node (with the
        router) then gpu; flat in one."""
        if self.opts.path == "flat":
            return [self.dispatch]
        return [self.dispatch, self._dispatch_hop2]

    def _dispatch_hop2(self, mid: Midway) -> Dispatched:
        rep, dev = P(), P(self.topo.axes)
        ex = dsp.ExchangeStats(rep, rep, rep)
        out_specs = (dsp.Received(dev, dev, dev), dev, ex)
        fn = self._smap(self._hop2_dispatch_local, (dev, dev, dev), out_specs)
        recv, row2_UG, st2 = fn(mid.x_UD, mid.e_UK, mid.w_UK)
        s = mid.stats
        stats = MoEStats(s.load_E, s.balance_loss, s.dropped + st2.dropped, s.internode, st2[2])
        return Dispatched(recv, dsp.TwoHopHandle(mid.row1_TN, row2_UG), mid.weight_TK, stats)

    def _hop2_dispatch_local(self, x_UD, e_UK, w_UK):
        zero = jnp.zeros((), jnp.int32)
        h1 = dsp.Hop1(x_UD, e_UK, w_UK, None, dsp.ExchangeStats(zero, zero, zero))
        recv, row2_UG, st = dsp.dispatch_hop2(h1, self.topo, self.caps, self.opts)
        return recv, row2_UG, dsp.ExchangeStats(*(jax.lax.psum(a, self.topo.axes) for a in st))

    def _dispatch_local(self, x_BTD, gate_DE, bias_E, *, has_bias: bool) -> Dispatched:
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        idx_TK, weight_TK, load_E, loss = router(
            x_TD, gate_DE, bias_E if has_bias else None, self.cfg, B
        )
        load_E, loss = jax.lax.psum(load_E, self.topo.axes), jax.lax.pmean(loss, self.topo.axes)
        total = lambda st: (jax.lax.psum(a, self.topo.axes) for a in st)  # noqa: E731
        if self.opts.path == "flat":
            recv, handle, st = dsp.flat_dispatch(x_TD, idx_TK, self.topo, self.caps, self.opts)
            return Dispatched(recv, handle, weight_TK, MoEStats(load_E, loss, *total(st)))
        h1 = dsp.dispatch_hop1(x_TD, idx_TK, weight_TK, self.topo, self.caps, self.opts)
        stats = MoEStats(load_E, loss, *total(h1.stats))
        return Midway(h1.x_UD, h1.e_UK, h1.w_UK, h1.row1_TN, weight_TK, stats)

    def expert_weights(self) -> list:
        """The routed experts' weights laid out for ``experts``."""
        moe, ex = self.moe, self.experts_spec
        return [laid_out(w[...], ex, self.mesh) for w in (moe.w_gate, moe.w_up, moe.w_down)]

    def experts(self, recv: dsp.Received, ws: list) -> Float[Array, "R D"]:
        """The routed experts' output rows (all the device's experts in one stage)."""
        return self.experts_in_parts(recv, ws, [1.0])[0]()

    def experts_in_parts(self, recv: dsp.Received, ws: list, shares: list[float]) -> list:
        """``experts`` as len(shares) stages over consecutive groups of the device's local
        experts (group sizes in proportion to ``shares``, the phases they fill): each part
        drops the other groups' assignments, and the parts sum to ``experts`` (each
        assignment in one part; rows with several experts add their parts in another
        order)."""
        El = self.topo.experts_per_device
        cuts = [0]
        for share in itertools.accumulate(shares):
            cuts.append(min(El, max(cuts[-1], round(El * share / sum(shares)))))
        cuts[-1] = El
        dev, ex = P(self.topo.axes), self.experts_spec
        specs = (dsp.Received(dev, dev, dev), ex, ex, ex)
        parts = []
        for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
            local = functools.partial(self._experts_local, lo=lo, hi=hi)
            parts.append(functools.partial(self._smap(local, specs, dev), recv, *ws))
        return parts

    def _experts_local(
        self, recv: dsp.Received, *ws, lo: int = 0, hi: int | None = None
    ) -> Float[Array, "R D"]:
        """The FFN of the local experts [lo, hi) (all by default) on their assignments."""
        cfg, El = self.cfg, self.topo.experts_per_device
        assert ws[0].shape[0] == El, (ws[0].shape, self.topo)
        sizes = dsp.SlotSizes.for_shapes(
            self.T, cfg.num_experts_per_tok, El, max_capacity=recv.x_RD.shape[0]
        )
        hi = El if hi is None else hi
        if hi == lo:  # an empty group
            return jnp.zeros(recv.x_RD.shape, jnp.float32)
        if (lo, hi) != (0, El):  # the group's experts renumbered from 0; the rest: none
            mine = (recv.expert_RK >= lo) & (recv.expert_RK < hi)
            ids = jnp.where(mine, recv.expert_RK - lo, hi - lo)
            recv = dsp.Received(recv.x_RD, ids, jnp.where(mine, recv.weight_RK, 0.0))
            ws = [w[lo:hi] for w in ws]
        ws = expert_weights(cfg, recv.x_RD.dtype, *ws)
        return routed_ffn(*recv, *ws, backend=self.moe.backend, sizes=sizes, fp8=fp8_mode(cfg))

    def combine_hop_times(self) -> list[float]:
        """Relative wire times of the combine hops, in their order (gpu then node; flat: one),
        under the harness's link model (``codesign.schedule.CostModel``); both hops carry
        rows of the same width."""
        flat = self.opts.path == "flat"
        return CostModel().exchange_s(self.topo, self.caps, 1.0, flat)[::-1]

    def combine_hops(self, d: Dispatched) -> list:
        """Combine of ``d`` as a list of stages y -> y with one all-to-all each: two-hop back
        over gpu then node (the last returns [B, T, D]); flat in one."""
        flat = self.opts.path == "flat"
        hops = [self._flat_local] if flat else [self._hop2_local, self._hop1_local]
        return [functools.partial(self._combine_stage, local, d=d) for local in hops]

    def _combine_stage(self, local, y, d: Dispatched):
        dev = P(self.topo.axes)
        handle = jax.tree.map(lambda _: dev, d.handle)
        out = self.data if local != self._hop2_local else dev
        return self._smap(local, (dev, handle, dev), out)(y, d.handle, d.weight_TK)

    def _combine_dtype(self):
        return jnp.dtype(self.opts.combine_dtype or self.dtype)

    def _flat_local(self, y_RD, handle, weight_TK) -> Float[Array, "B T D"]:
        o, c = self.opts, self.caps
        y_TD = dsp.flat_combine(y_RD, weight_TK, handle, self.topo, c, o, self._combine_dtype())
        return self._to_batch(y_TD)

    def _hop2_local(self, y_RD, handle, _weight_TK) -> Float[Array, "U D"]:
        return dsp.back_hop2(y_RD, handle, self.topo, self.caps, self.opts, self._combine_dtype())

    def _hop1_local(self, y1_UD, handle, _weight_TK) -> Float[Array, "B T D"]:
        o, c = self.opts, self.caps
        return self._to_batch(dsp.back_hop1(y1_UD, handle, self.topo, c, o, self._combine_dtype()))

    def _to_batch(self, y_TD):
        return y_TD.astype(self.dtype).reshape(self.T // self.seq, self.seq, -1)

    def shared(self, h_BTD):
        if self.moe.shared_experts is None:
            return jnp.zeros(h_BTD.shape, self.dtype)
        with jax.named_scope("shared_experts"):
            return self.moe.shared_experts(h_BTD)

    def shared_parts(self, n: int) -> list:
        """The shared expert on n slices of a half's positions (per token: exact), to fill n
        phases; a slice with no position passes through empty."""
        cuts = [self.seq * i // n for i in range(n + 1)]

        def part(a, b):
            if b == a:
                return lambda h: h[:, a:b].astype(self.dtype)
            return lambda h: self.shared(h[:, a:b])

        return [part(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
