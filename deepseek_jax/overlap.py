"""Dual micro-batch overlap of a MoE block (``overlap="dual"``).

Design note.
*What DeepSeek-V3 does* (V3TR 3.2.1, ISCA 2025 "dual micro-batch overlap"): each device
splits its batch into two micro-batches and runs them offset by a phase, so that one
micro-batch's dispatch and combine all-to-alls travel while the other computes attention or
experts; the shared expert fills the gaps; the backward pass interleaves the same way.

*What we do.* ``dual_block`` splits the local batch into halves A and B (each device keeps
its own rows: no communication) and issues attention(A), then eight phases, one per
all-to-all (``+``: in the same phase; hop 1 over node, hop 2 over gpu):
    dispatch(A) hop 1 + shared(A) 1/3 | hop 2 + attention(B)
    | dispatch(B) hop 1 + shared(A) 2/3 | hop 2 + experts(A)
    | combine(A) hop 2 + experts(B) | hop 1 + shared(A) 3/3
    | combine(B) hop 2 + shared(B) 1/2 | hop 1 + shared(B) 2/2.
An ``optimization_barrier`` ends each phase, and each fill's inputs come out of the
previous one, so no op can leave its phase: XLA cannot serialise the halves again, nor move
a fill into another collective's window and leave a collective with nothing beside it
(in our compiles XLA:GPU ran one all-to-all at a time, so two hops sharing one fill left
one of them sync). The larger fills go beside the larger (gpu) hops; the shared expert runs on
position slices (per token: exact). Each hop is ONE all-to-all: the ids and gate weights
travel packed beside the payload (``moe/payload.exchange``). The barrier's transpose is a
barrier on the cotangents, so the backward pass keeps the same pairing in reverse. The MoE
is the layer of ``moe/layer.py`` cut at its collectives into ``shard_map`` stages (router
+ dispatch hop 1, hop 2, experts, combine hop by hop), each a call of the same
``moe/dispatch.py`` functions; flat has one hop each way. Prefill (``dual_moe``) runs the
MoE phases the same way.

*Equality.* Routing is per token and the einsum experts are exact (slots plus spill), so the
block equals the unsplit one when no expert-parallel buffer overflows (capacities are sized
per half): forward values and gradients to float32 rounding. Statistics: loads, dropped and
sent counts are the sums over the halves; the balance loss is their mean (a mean over
sequences, as unsplit).

*What we simplify.* No deferral of combine(B) into the next block (a scan over layers ends
each block at the loop boundary; the fills above leave no all-to-all sync without it); no
``_scheduling_group_id`` and no custom VJP over the block (only the packed exchange has
one): the barriers alone (checked on the compiled GPU schedule by
``experiments.gpu_compile``).

Shape letters: B batch (a half's), T positions, D hidden, E routed experts, K experts per
token, R received rows.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int

import deepseek_jax.moe.dispatch as dsp
from deepseek_jax.fp8 import fp8_mode
from deepseek_jax.moe.experts import routed_ffn
from deepseek_jax.moe.layer import (
    MoE,
    MoEStats,
    _expert_parallel_fits,
    _expert_shard_map,
    _expert_weights,
    _laid_out,
    _mesh_of,
    _router,
    _router_inputs,
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


class Midway(NamedTuple):
    """One half after hop 1 of a two-hop dispatch (``dispatch.Hop1``, stacked likewise)."""

    x_UD: Float[Array, "U D"]
    e_UK: Int[Array, "U K"]
    w_UK: Float[Array, "U K"]
    row1_TN: Int[Array, "T N"]
    weight_TK: Float[Array, "T K"]
    stats: MoEStats  # the router's, hop 1's drops and internode copies


def can_split(moe: MoE, batch: int) -> bool:
    """Dual overlap applies under expert parallelism with halves that split over devices."""
    return batch % 2 == 0 and _expert_parallel_fits(_mesh_of(()), batch // 2)


def dual_block(block, x_BTD: Float[Array, "B T D"], positions_BT: Int[Array, "B T"]):
    """``block`` (a MoE ``Block``) in the dual micro-batch schedule: (x_BTD, MoEStats)."""
    norm1, attn, norm2 = block.input_layernorm, block.self_attn, block.post_attention_layernorm
    xa, xb = split_halves(x_BTD)
    pa, pb = split_halves(positions_BT)
    xa = xa + attn(norm1(xa), pa)
    ha = norm2(xa)

    def make_b(b):
        (xb, pb), mods = b
        norm1, attn, norm2 = _merged(mods)
        xb = xb + attn(norm1(xb), pb)
        return norm2(xb), (xb,)

    b_in = ((xb, pb), _pinned(norm1, attn, norm2))
    (ya, yb), stats, (xb,) = _pipeline(block.mlp, ha, b_in, make_b)
    out = merge_halves(xa + ya.astype(xa.dtype), xb + yb.astype(xb.dtype))
    return out, stats


def dual_moe(moe: MoE, h_BTD: Float[Array, "B T D"]):
    """The MoE layer alone in the dual schedule (prefill): (y_BTD, MoEStats)."""
    ha, hb = split_halves(h_BTD)
    (ya, yb), stats, _ = _pipeline(moe, ha, hb, lambda h: (h, ()))
    return merge_halves(ya, yb), stats


def _pinned(*modules) -> tuple:
    """Modules as (graphdef, state) pairs for a fill's carry: a fill that rebuilds its modules
    from weights that came out of the previous barrier has, in the backward pass, its weight
    gradients pinned to its phase too (the barrier's transpose holds them), not only its
    activations' (XLA otherwise moved attention(B)'s weight GEMMs out of the window)."""
    return tuple(nnx.split(m) for m in modules)


def _merged(pinned: tuple) -> list:
    return [nnx.merge(graphdef, state) for graphdef, state in pinned]


def _pipeline(moe: MoE, ha, b_in, make_b):
    """Each collective in a phase of its own, beside the other half's work (a fill), the
    larger fills beside the larger (gpu) hops: dispatch(A) beside shared(A) then
    make_b(b_in) | dispatch(B) beside shared(A) then experts(A) | combine(A) beside
    experts(B) then shared(A) | combine(B) beside shared(B). ``make_b`` returns (B's MoE
    input, extras to carry). The shared expert runs on position slices (per token: exact),
    one per phase it fills."""
    st = _Stages(moe, ha.shape)
    sh_a, sh_b = st.shared_parts(3), st.shared_parts(2)
    sw, ew = st.shared_weights(), st.expert_weights()  # out of the barriers with the carry
    fills = [lambda c: sh_a[0](c[0], c[2]), lambda c: make_b(c[1])]
    da, (sa0, (hb, extra)), (ha, _, sw) = _hops_beside(
        st.dispatch_hops(), ha, fills, (ha, b_in, sw)
    )
    fills = [lambda c: sh_a[1](c[0], c[3]), lambda c: st.experts(c[1].recv, c[4])]
    db, (sa1, ea), (ha, da, hb, sw, ew) = _hops_beside(
        st.dispatch_hops(), hb, fills, (ha, da, hb, sw, ew)
    )
    fills = [lambda c: st.experts(c[1].recv, c[4]), lambda c: sh_a[2](c[0], c[3])]
    ya, (eb, sa2), (_, db, hb, sw, _) = _hops_beside(
        st.combine_hops(da), ea, fills, (ha, db, hb, sw, ew)
    )
    fills = [lambda c: sh_b[0](*c), lambda c: sh_b[1](*c)]
    yb, sb, _ = _hops_beside(st.combine_hops(db), eb, fills, (hb, sw))
    stats = MoEStats(
        da.stats.load_E + db.stats.load_E,
        (da.stats.balance_loss + db.stats.balance_loss) / 2,
        *(a + b for a, b in zip(da.stats[2:], db.stats[2:], strict=True)),
    )
    cat = functools.partial(jnp.concatenate, axis=1)
    return (ya + cat([sa0, sa1, sa2]), yb + cat(sb)), stats, extra


def _hops_beside(hops, y, fills, carry):
    """Runs ``hops`` (stages with one all-to-all each) one phase each, phase i also running
    ``fills[i]`` (the last phase: all those left) on ``carry``. An optimization_barrier ends
    each phase, and the fills' inputs come out of the previous one, so XLA can neither move a
    fill into another collective's window (XLA ran one all-to-all at a time) nor start the
    next phase early. Returns (y, the fills' results, carry)."""
    done = []
    for i, hop in enumerate(hops):
        y = hop(y)
        todo = fills[i:] if i == len(hops) - 1 else fills[i : i + 1]
        done += [f(carry) for f in todo]
        y, done, carry = _barrier((y, done, carry))
    return y, done, carry


class _Stages:
    """The MoE layer's shard_map stages (one all-to-all each, and the experts) for halves of
    ``shape_BTD``."""

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
        return _expert_shard_map(fn, self.mesh, self.topo, self.opts, in_specs, out_specs)

    def dispatch(self, h_BTD) -> Dispatched | Midway:
        moe, rep, dev = self.moe, P(), P(self.topo.axes)
        bias = moe.e_score_correction_bias
        has_bias = bias is not None
        x_BTD = h_BTD.astype(self.dtype)
        bias = bias[...] if has_bias else None
        args = _router_inputs(x_BTD, moe.gate[...], bias, self.cfg, self.mesh, self.data)
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
        idx_TK, weight_TK, load_E, loss = _router(
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
        """The routed experts' weights laid out for ``experts`` (a fill's pinned weights)."""
        moe, ex = self.moe, self.experts_spec
        return [_laid_out(w[...], ex, self.mesh) for w in (moe.w_gate, moe.w_up, moe.w_down)]

    def experts(self, recv: dsp.Received, ws: list) -> Float[Array, "R D"]:
        dev, ex = P(self.topo.axes), self.experts_spec
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

    def shared_weights(self) -> tuple:
        """The shared expert as ``_pinned`` (empty without one)."""
        mlp = self.moe.shared_experts
        return () if mlp is None else _pinned(mlp)

    def shared(self, h_BTD, weights: tuple):
        if not weights:
            return jnp.zeros(h_BTD.shape, self.dtype)
        with jax.named_scope("shared_experts"):
            return _merged(weights)[0](h_BTD)

    def shared_parts(self, n: int) -> list:
        """The shared expert on n slices of a half's positions (per token: exact), to fill n
        phases; a slice with no position passes through empty. Each takes (h, weights)."""
        cuts = [self.seq * i // n for i in range(n + 1)]

        def part(a, b):
            if b == a:
                return lambda h, _w: h[:, a:b].astype(self.dtype)
            return lambda h, w: self.shared(h[:, a:b], w)

        return [part(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


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
