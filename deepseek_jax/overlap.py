"""Dual micro-batch overlap of a MoE block (``overlap="dual"``).

Design note.
*What DeepSeek-V3 does* (V3TR 3.2.1, ISCA 2025 "dual micro-batch overlap"): each device
splits its batch into two micro-batches and runs them offset by a phase, so that one
micro-batch's dispatch and combine all-to-alls travel while the other computes attention or
experts; the shared expert fills the gaps; the backward pass interleaves the same way.

*What we do.* ``dual_block`` splits the local batch into halves A and B (each device keeps
its own rows: no communication) and issues, in program order,
    attention(A) | dispatch(A) + attention(B) | experts(A) + dispatch(B)
    | combine(A) hop 2 + experts(B) | combine(A) hop 1 + shared(A)
    | combine(B) hop 2 + shared(B) first positions | combine(B) hop 1 + shared(B) the rest,
where ``+`` means "in the same phase". An ``optimization_barrier`` joins each phase's
results, so no op of a later phase can start before both are done and XLA cannot serialise
the halves again; inside a phase the latency-hiding scheduler runs the collective of one
half beside the compute of the other. XLA keeps one all-to-all in flight at a time, so each
combine hop gets a phase and a fill of its own, whose inputs come out of the previous
barrier (else XLA moves the fill into another window and leaves the hop sync); each
dispatch hop is ONE all-to-all, the ids and gate weights packed beside the payload
(``moe/payload.exchange``). The barrier's transpose is a barrier on the cotangents, so the
backward pass keeps the same pairing in reverse. The MoE is the layer of ``moe/layer.py``
cut at its collectives into ``shard_map`` stages (dispatch with the router, experts,
combine hop by hop), each a call of the same ``moe/dispatch.py`` functions; prefill
(``dual_moe``) runs the MoE phases the same way.

*Equality.* Routing is per token and the einsum experts are exact (slots plus spill), so the
block equals the unsplit one when no expert-parallel buffer overflows (capacities are sized
per half): forward values and gradients to float32 rounding. Statistics: loads, dropped and
sent counts are the sums over the halves; the balance loss is their mean (a mean over
sequences, as unsplit).

*What we simplify.* No deferral of combine(B) into the next block (a scan over layers ends
each block at the loop boundary; the fills above leave no all-to-all sync without it); no
``_scheduling_group_id`` pinning: the barriers alone (checked on the compiled GPU schedule
by ``experiments.gpu_compile``).

Shape letters: B batch (a half's), T positions, D hidden, E routed experts, K experts per
token, R received rows.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int

import deepseek_jax.moe.dispatch as dsp
from deepseek_jax.fp8 import fp8_mode
from deepseek_jax.moe.experts import routed_ffn
from deepseek_jax.moe.layer import (
    MoE,
    MoEStats,
    _expert_parallel_fits,
    _expert_weights,
    _laid_out,
    _mesh_of,
    _router,
)
from deepseek_jax.sharding import logical_to_spec, mesh_axes_of

OVERLAPS = ("none", "dual")
_barrier = jax.lax.optimization_barrier


class Dispatched(NamedTuple):
    """One half after dispatch: per-device pieces stacked on a leading (node, gpu) axis."""

    recv: dsp.Received
    handle: Any  # FlatHandle | TwoHopHandle
    weight_TK: Float[Array, "T K"]  # the gate weights (flat combine applies them)
    stats: MoEStats


def can_split(moe: MoE, batch: int) -> bool:
    """Dual overlap applies under expert parallelism with halves that split over devices."""
    return batch % 2 == 0 and _expert_parallel_fits(_mesh_of(()), batch // 2)


def dual_block(block, x_BTD: Float[Array, "B T D"], positions_BT: Int[Array, "B T"]):
    """``block`` (a MoE ``Block``) in the dual micro-batch schedule: (x_BTD, MoEStats)."""

    def attention(x, p):
        return x + block.self_attn(block.input_layernorm(x), p)

    xa, xb = split_halves(x_BTD)
    pa, pb = split_halves(positions_BT)
    xa = attention(xa, pa)
    ha = block.post_attention_layernorm(xa)
    (ya, yb), stats, (xb,) = _pipeline(
        block.mlp, ha, lambda: (block.post_attention_layernorm(xb2 := attention(xb, pb)), (xb2,))
    )
    out = merge_halves(xa + ya.astype(xa.dtype), xb + yb.astype(xb.dtype))
    return out, stats


def dual_moe(moe: MoE, h_BTD: Float[Array, "B T D"]):
    """The MoE layer alone in the dual schedule (prefill): (y_BTD, MoEStats)."""
    ha, hb = split_halves(h_BTD)
    (ya, yb), stats, _ = _pipeline(moe, ha, lambda: (hb, ()))
    return merge_halves(ya, yb), stats


def _pipeline(moe: MoE, ha, make_b):
    """dispatch(A) + make_b() | experts(A) + dispatch(B) | combine(A), a phase per hop, beside
    experts(B) then shared(A) | combine(B), a phase per hop, beside the two halves of
    shared(B). ``make_b`` returns (B's MoE input, extras to carry)."""
    st = _Stages(moe, ha.shape)
    da = st.dispatch(ha)
    hb, extra = make_b()
    da, hb, extra = _barrier((da, hb, extra))
    ea = st.experts(da.recv)
    db = st.dispatch(hb)
    ea, db, ha, hb = _barrier((ea, db, ha, hb))
    fills_a = [lambda c: st.experts(c[2].recv), lambda c: st.shared(c[0])]
    ya, (eb, sa), (ha, hb, db) = _combine_beside(st, ea, da, fills_a, (ha, hb, db))
    yb, sb = _combine_beside(st, eb, db, st.shared_parts(), hb)[:2]
    stats = MoEStats(
        da.stats.load_E + db.stats.load_E,
        (da.stats.balance_loss + db.stats.balance_loss) / 2,
        *(a + b for a, b in zip(da.stats[2:], db.stats[2:], strict=True)),
    )
    return (ya + sa, yb + jnp.concatenate(sb, axis=1)), stats, extra


def _combine_beside(st: _Stages, y_RD, d: Dispatched, fills, carry):
    """One half's combine, one phase per hop (an all-to-all each), phase i also running
    ``fills[i]`` (the last phase: all those left) on ``carry``: the inputs come out of the
    previous phase's barrier, so XLA cannot move a fill into another collective's window and
    leave this one with nothing beside it. Returns (y, the fills' results, carry)."""
    hops, done = st.combine_hops(), []
    for i, hop in enumerate(hops):
        y_RD = hop(y_RD, d)
        todo = fills[i:] if i == len(hops) - 1 else fills[i : i + 1]
        done += [f(carry) for f in todo]
        y_RD, done, carry = _barrier((y_RD, done, carry))
    return y_RD, done, carry


class _Stages:
    """The MoE layer's three shard_map stages for halves of ``tokens`` global tokens."""

    def __init__(self, moe: MoE, shape_BTD: tuple[int, ...]):
        cfg = moe.cfg
        self.moe, self.cfg, self.opts = moe, cfg, moe.ep
        self.mesh = _mesh_of(())
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
        return jax.shard_map(
            fn,
            mesh=self.mesh,
            in_specs=in_specs,
            out_specs=out_specs,
            axis_names=set(self.topo.axes),
            check_vma=self.opts.kernel != "pallas",
        )

    def dispatch(self, h_BTD) -> Dispatched:
        moe, cfg, rep, dev = self.moe, self.cfg, P(), P(self.topo.axes)
        bias = moe.e_score_correction_bias
        has_bias = bias is not None
        bias = bias[...] if has_bias else jnp.zeros((cfg.n_routed_experts,), jnp.float32)
        args = (
            _laid_out(h_BTD.astype(self.dtype), self.data, self.mesh),
            _laid_out(moe.gate[...], rep, self.mesh),
            _laid_out(bias, rep, self.mesh),
        )
        flat = self.opts.path == "flat"
        handle = dsp.FlatHandle(dev) if flat else dsp.TwoHopHandle(dev, dev)
        stats = MoEStats(rep, rep, rep, rep, rep)
        out_specs = Dispatched(dsp.Received(dev, dev, dev), handle, dev, stats)
        local = functools.partial(self._dispatch_local, has_bias=has_bias)
        return self._smap(local, (self.data, rep, rep), out_specs)(*args)

    def _dispatch_local(self, x_BTD, gate_DE, bias_E, *, has_bias: bool) -> Dispatched:
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        idx_TK, weight_TK, load_E, loss = _router(
            x_TD, gate_DE, bias_E if has_bias else None, self.cfg, B
        )
        if self.opts.path == "flat":
            recv, handle, st = dsp.flat_dispatch(x_TD, idx_TK, self.topo, self.caps, self.opts)
        else:
            recv, handle, st = dsp.two_hop_dispatch(
                x_TD, idx_TK, weight_TK, self.topo, self.caps, self.opts
            )
        stats = MoEStats(
            jax.lax.psum(load_E, self.topo.axes),
            jax.lax.pmean(loss, self.topo.axes),
            *(jax.lax.psum(s, self.topo.axes) for s in st),
        )
        return Dispatched(recv, handle, weight_TK, stats)

    def experts(self, recv: dsp.Received) -> Float[Array, "R D"]:
        moe, dev, ex = self.moe, P(self.topo.axes), self.experts_spec
        ws = [_laid_out(w[...], ex, self.mesh) for w in (moe.w_gate, moe.w_up, moe.w_down)]
        return self._smap(self._experts_local, (dsp.Received(dev, dev, dev), ex, ex, ex), dev)(
            recv, *ws
        )

    def _experts_local(self, recv: dsp.Received, *ws) -> Float[Array, "R D"]:
        cfg, El = self.cfg, self.topo.experts_per_device
        assert ws[0].shape[0] == El, (ws[0].shape, self.topo)
        sizes = dsp.SlotSizes.for_shapes(
            self.T, cfg.num_experts_per_tok, El, max_capacity=recv.x_RD.shape[0]
        )
        ws = _expert_weights(cfg, recv.x_RD.dtype, *ws)
        return routed_ffn(*recv, *ws, backend=self.moe.backend, sizes=sizes, fp8=fp8_mode(cfg))

    def combine_hops(self) -> list:
        """Combine as a list of (y, Dispatched) -> y stages, one all-to-all each: two-hop
        back over gpu then node (the last returns [B, T, D]); flat in one."""
        if self.opts.path == "flat":
            return [functools.partial(self._combine_stage, self._flat_local)]
        return [
            functools.partial(self._combine_stage, self._hop2_local),
            functools.partial(self._combine_stage, self._hop1_local),
        ]

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

    def shared_parts(self) -> list:
        """The shared expert on the first and last positions of a half (per token: exact),
        to run beside combine's two hops; one part when T < 2."""
        cut = self.seq // 2
        if cut == 0:
            return [self.shared]
        return [lambda h: self.shared(h[:, :cut]), lambda h: self.shared(h[:, cut:])]


# ------------------------------------------------------------------------ halves


def _batch_spec():
    mesh = _mesh_of(())
    return mesh, logical_to_spec(("batch",), mesh_axes=mesh.axis_names)[0], mesh_axes_of("batch")


def split_halves(x: Array) -> tuple[Array, Array]:
    """Each device's rows (batch axis 0) cut in two: halves A and B, still batch-sharded."""
    mesh, spec, axes = _batch_spec()
    s = P(spec)
    fn = lambda x: (x[: x.shape[0] // 2], x[x.shape[0] // 2 :])  # noqa: E731
    return jax.shard_map(fn, mesh=mesh, in_specs=s, out_specs=(s, s), axis_names=set(axes))(x)


def merge_halves(a: Array, b: Array) -> Array:
    """The inverse of ``split_halves``."""
    mesh, spec, axes = _batch_spec()
    s = P(spec)
    fn = lambda a, b: jnp.concatenate([a, b])  # noqa: E731
    return jax.shard_map(fn, mesh=mesh, in_specs=(s, s), out_specs=s, axis_names=set(axes))(a, b)
