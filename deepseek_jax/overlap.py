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
    | combine(A) hop 2 + experts(B) 1/2 | hop 1 + experts(B) 2/2 + shared(A) 3/3
    | combine(B) hop 2 + shared(B) 1/2 | hop 1 + shared(B) 2/2.
An ``optimization_barrier`` ends each phase, and each fill's inputs come out of the
previous one, so no op can leave its phase: XLA cannot serialise the halves again, nor move
a fill into another collective's window and leave a collective with nothing beside it
(in our compiles XLA:GPU ran one all-to-all at a time, so two hops sharing one fill left
one of them sync). The larger fills go beside the larger (gpu) hops; the shared expert runs on
position slices (per token: exact), experts(B) on two groups of the local experts, sized by
the two combine hops' wire times (each assignment in one group: exact up to the order in
which a row's experts are summed). Each hop is ONE all-to-all: the ids and gate weights
travel packed beside the payload (``moe/payload.exchange``). The barrier's transpose is a
barrier on the cotangents, so the backward pass keeps the same pairing in reverse. The MoE
is the layer of ``moe/layer.py`` cut at its collectives into ``shard_map`` stages
(``moe/stages.py``); flat has one hop each way. Prefill (``dual_moe``) runs the MoE phases
the same way.

*Deferred combine(B)* (``defer=True``; ``block.run_blocks`` under ``overlap=dual_deferred``): inside
one block combine(B) has only shared(B) beside it, and attention(A) nothing. So each block
of a stack leaves combine(B) undone (a ``Pending`` in the layer loop's carry) and the next
block runs it first, beside its attention(A):
    [combine(B) of the previous block, hop 2 + attention(A) | hop 1 + shared(A) 1/2]
    | dispatch(A) hop 1 + shared(A) (the rest) | hop 2 + attention(B)
    | dispatch(B) hop 1 + shared(B) 1/2 | hop 2 + experts(A)
    | combine(A) hop 2 + experts(B) 1/2 | hop 1 + experts(B) 2/2 + shared(B) 2/2.
The first block (which has none to take) runs before the loop; the last one's is finished
beside half A's final norm and head (``finish``, from ``Transformer.__call__``).

*Equality.* Routing is per token and the einsum experts are exact (slots plus spill), so the
block equals the unsplit one when no expert-parallel buffer overflows (capacities are sized
per half): forward values and gradients to float32 rounding. Statistics: loads, dropped and
sent counts are the sums over the halves; the balance loss is their mean (a mean over
sequences, as unsplit).

*What we simplify.* The MTP block does not defer (nothing follows it but its head); no
``_scheduling_group_id`` and no custom VJP over the block (only the packed exchange has
one): the barriers alone (checked on the compiled GPU schedule by
``experiments.gpu_compile``).

Shape letters: B batch (a half's), T positions, D hidden, E routed experts, K experts per
token, R received rows.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int

from deepseek_jax.moe.layer import MoE, MoEStats, expert_parallel_fits, mesh_of
from deepseek_jax.moe.stages import Stages
from deepseek_jax.sharding import logical_to_spec, mesh_axes_of

OVERLAPS = ("none", "dual", "dual_deferred")
_barrier = jax.lax.optimization_barrier


class Pending(NamedTuple):
    """Half B's combine, deferred out of its block: the experts' output rows (per device,
    stacked on a leading (node, gpu) axis) and what the combine needs to put them back."""

    rows_RD: Float[Array, "R D"]
    handle: Any  # FlatHandle | TwoHopHandle
    weight_TK: Float[Array, "T K"]


def can_split(moe: MoE, batch: int) -> bool:
    """Dual overlap applies under expert parallelism with halves that split over devices."""
    return batch % 2 == 0 and expert_parallel_fits(mesh_of(()), batch // 2)


def dual_block(
    block,
    x_BTD: Float[Array, "B T D"],
    positions_BT: Int[Array, "B T"],
    prev: Pending | None = None,
    defer: bool = False,
):
    """``block`` (a MoE ``Block``) in the dual micro-batch schedule: (x_BTD, MoEStats), and
    with ``defer`` half B's combine left undone: (x_BTD whose B rows lack it, MoEStats,
    Pending). ``prev``: the previous block's Pending, run beside this block's attention(A)
    (x_BTD's B rows then lack it)."""
    norm1, attn, norm2 = block.input_layernorm, block.self_attn, block.post_attention_layernorm
    xa, xb = split_halves(x_BTD)
    pa, pb = split_halves(positions_BT)

    def make(half):  # attention and the MoE's norm of one half
        x, p = half
        x = x + attn(norm1(x), p)
        return norm2(x), (x,)

    if defer:
        ya, yb, stats, (xa,), (xb,), pending = _deferred(block.mlp, (xa, pa), (xb, pb), make, prev)
        out = merge_halves(xa + ya.astype(xa.dtype), xb + yb.astype(xb.dtype))
        return out, stats, pending
    if prev is not None:
        raise ValueError("dual_block: a previous block's combine is taken only with defer=True")
    xa = xa + attn(norm1(xa), pa)
    ha = norm2(xa)
    (ya, yb), stats, (xb,) = _pipeline(block.mlp, ha, (xb, pb), make)
    out = merge_halves(xa + ya.astype(xa.dtype), xb + yb.astype(xb.dtype))
    return out, stats


def finish(moe: MoE, x_BTD: Float[Array, "B T D"], pending: Pending, fill=None):
    """The last block's deferred combine(B) at the end of a stack: (fill(x) merged over the
    halves; x itself without ``fill``). ``fill``: per-token work (the norm and head) that
    runs on half A beside the combine's hops (positions cut in two, one part per phase),
    then on half B."""
    fill = fill or (lambda x: x)
    xa, xb = split_halves(x_BTD)
    st = Stages(moe, xa.shape)
    T = xa.shape[1]
    cut = [lambda c, _d: fill(c[:, : T // 2]), lambda c, _d: fill(c[:, T // 2 :])]
    yb, done, _ = _hops_beside(st.combine_hops(pending), pending.rows_RD, cut, xa)
    out_a = jax.tree.map(lambda *p: jnp.concatenate(p, axis=1), *done)
    out_b = fill(xb + yb.astype(xb.dtype))
    return jax.tree.map(merge_halves, out_a, out_b)


def dual_moe(moe: MoE, h_BTD: Float[Array, "B T D"]):
    """The MoE layer alone in the dual schedule (prefill): (y_BTD, MoEStats)."""
    ha, hb = split_halves(h_BTD)
    (ya, yb), stats, _ = _pipeline(moe, ha, hb, lambda h: (h, ()))
    return merge_halves(ya, yb), stats


def _pipeline(moe: MoE, ha, b_in, make_b):
    """Each collective in a phase of its own, beside the other half's work (a fill), the
    larger fills beside the larger (gpu) hops: dispatch(A) beside shared(A) then
    make_b(b_in) | dispatch(B) beside shared(A) then experts(A) | combine(A) beside
    experts(B) then shared(A) | combine(B) beside shared(B). ``make_b`` returns (B's MoE
    input, extras to carry). The shared expert runs on position slices (per token: exact),
    one per phase it fills; experts(B) is cut likewise, by groups of experts, beside
    combine(A)'s hops."""
    st = Stages(moe, ha.shape)
    sh_a, sh_b = st.shared_parts(3), st.shared_parts(2)
    ew = st.expert_weights  # laid out per call, as before the deferred variant
    fills = [lambda c, _d: sh_a[0](c[0]), lambda c, _d: make_b(c[1])]
    da, (sa0, (hb, extra)), (ha, _) = _hops_beside(st.dispatch_hops(), ha, fills, (ha, b_in))
    fills = [lambda c, _d: sh_a[1](c[0]), lambda c, _d: st.experts(c[1].recv, ew())]
    db, (sa1, ea), (ha, da, hb) = _hops_beside(st.dispatch_hops(), hb, fills, (ha, da, hb))
    fills = _experts_beside_combine(st, lambda c: (c[1].recv, ew()), lambda c: sh_a[2](c[0]))
    ya, done, (_, db, hb) = _hops_beside(st.combine_hops(da), ea, fills, (ha, db, hb))
    eb, sa2 = done[-1]
    fills = [lambda c, _d: sh_b[0](c), lambda c, _d: sh_b[1](c)]
    yb, sb, _ = _hops_beside(st.combine_hops(db), eb, fills, hb)
    stats = _stats(da, db)
    cat = functools.partial(jnp.concatenate, axis=1)
    return (ya + cat([sa0, sa1, sa2]), yb + cat(sb)), stats, extra


def _deferred(moe: MoE, a_in, b_in, make, prev: Pending | None):
    """The schedule with combine(B) deferred out of the block (``make`` turns a half's
    input into (its MoE input, extras)): [combine(B) of ``prev`` beside attention(A), then
    shared(A) 1/2] | dispatch(A) beside shared(A) (the rest), then attention(B) |
    dispatch(B) beside shared(B) 1/2, then experts(A) | combine(A) beside experts(B), then
    shared(B) 2/2. Returns (y_A, shared(B), stats, A's extras, B's extras, Pending)."""
    st = Stages(moe, a_in[0].shape)
    ew = st.expert_weights()
    sh_a, sh_b = st.shared_parts(2 if prev is not None else 1), st.shared_parts(2)
    if prev is None:
        (ha, extra_a), sa = make(a_in), []
    else:
        fills = [lambda c, _d: make(c), lambda _c, d: sh_a[0](d[0][0])]
        yp, ((ha, extra_a), sa0), _ = _hops_beside(st.combine_hops(prev), prev.rows_RD, fills, a_in)
        xb, pb = b_in
        b_in, sa = (xb + yp.astype(xb.dtype), pb), [sa0]
    fills = [lambda c, _d: sh_a[-1](c[0]), lambda c, _d: make(c[1])]
    da, (sa1, (hb, extra_b)), (ha, _) = _hops_beside(st.dispatch_hops(), ha, fills, (ha, b_in))
    fills = [lambda c, _d: sh_b[0](c[2]), lambda c, _d: st.experts(c[1].recv, ew)]
    db, (sb0, ea), (ha, da, hb) = _hops_beside(st.dispatch_hops(), hb, fills, (ha, da, hb))
    fills = _experts_beside_combine(st, lambda c: (c[1].recv, ew), lambda c: sh_b[1](c[2]))
    ya, done, (_, db, _) = _hops_beside(st.combine_hops(da), ea, fills, (ha, db, hb))
    eb, sb1 = done[-1]
    cat = functools.partial(jnp.concatenate, axis=1)
    ya, yb = ya + cat([*sa, sa1]), cat([sb0, sb1])
    return ya, yb, _stats(da, db), extra_a, extra_b, Pending(eb, db.handle, db.weight_TK)


def _experts_beside_combine(st: Stages, experts_in, last):
    """The fills of combine(A)'s hops: experts(B) cut into groups of local experts in
    proportion to the hops' wire times (``Stages.combine_hop_times``), one group per hop,
    then ``last`` (a shared-expert slice) in the last hop. Results: (experts(B), last's).
    ``experts_in(carry)``: (B's received rows, the experts' weights)."""
    times = st.combine_hop_times()
    part = lambda c, i: st.experts_in_parts(*experts_in(c), times)[i]()  # noqa: E731
    if len(times) == 1:
        return [lambda c, _d: (part(c, 0), last(c))]
    # phase 1: experts(B)'s first group; phase 2: (the sum with the second group, last)
    return [lambda c, _d: part(c, 0), lambda c, d: (d[0] + part(c, 1), last(c))]


def _stats(da, db) -> MoEStats:
    """Loads, dropped and sent counts summed over the halves; the balance loss their mean."""
    return MoEStats(
        da.stats.load_E + db.stats.load_E,
        (da.stats.balance_loss + db.stats.balance_loss) / 2,
        *(a + b for a, b in zip(da.stats[2:], db.stats[2:], strict=True)),
    )


def _hops_beside(hops, y, fills, carry):
    """Runs ``hops`` (stages with one all-to-all each) one phase each, phase i also running
    ``fills[i]`` (the last phase: all those left) on ``carry``. An optimization_barrier ends
    each phase, and the fills' inputs come out of the previous one, so XLA can neither move a
    fill into another collective's window (XLA ran one all-to-all at a time) nor start the
    next phase early. A fill is called with (carry, the earlier fills' results). Returns (y,
    the fills' results, carry)."""
    done = []
    for i, hop in enumerate(hops):
        y = hop(y)
        todo = fills[i:] if i == len(hops) - 1 else fills[i : i + 1]
        for f in todo:  # a fill may take an earlier one's result
            done.append(f(carry, done))
        y, done, carry = _barrier((y, done, carry))
    return y, done, carry


# ------------------------------------------------------------------------ halves


def _batch_spec():
    mesh = mesh_of(())
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
