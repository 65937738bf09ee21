"""One executor for every schedule table: a lockstep loop under ``shard_map`` over stages.

Design note. DeepSeek-V3 pipelines 16 ways with DualPipe (V3TR 3.2.1). Here a schedule is
data (``schedule.py``); this file runs any table. The layer stacks are re-stacked per
(stage, chunk) by a gather, ``[PP, C, K, ...]`` over the ``layers`` mesh axis: K is the
largest number of layers a chunk holds, shorter chunks are padded and their padded layers
skipped by a mask, so stages may hold unequal counts (61 layers over 16 stages) and the
dense first layers are simply stage 0's first layers. DualPipe's second copy of the
parameters is the same gather taking each layer twice; the gather's transpose sums the two
copies' gradients, and drops the padding's. Embedding, final norm, head and MTP modules
are passed to every stage whole; the first hop embeds, the last hop runs the head and MTP
(which reuse the embedding and head): each stage's share of those shared gradients is
summed over stages explicitly (``psum``), which is the tied-weights all-reduce. The head
runs forward and backward right after the last hop's F (its weight gradient then, its
output gradient stored as the seed of that chunk's B), so no B or W recomputes it and the
head is compiled once per tick body, not once per slot kind.

Each tick every stage runs its slot of the table in two halves (each a ``lax.switch`` on the
slot's kind: F, B, W, full backward, or DualPipe's F&B pair): the forward half, then the
backward half. Activations move one stage forward and gradients one stage back by
``ppermute`` (both ways for DualPipe; DualPipeV's turn at the last stage is a local copy),
double-buffered so that XLA may overlap each transfer: this tick's activations travel
during its backward half, and last tick's input gradients during this tick's forward half
(``tick``). That is XLA's schedule; a switch is one op to XLA, so a window holds the other
half's whole switch, which is empty on a stage whose slot has no such half (every slot of
1F1B and ZB1P holds one phase). A tick with DualPipe's F&B pair on some stage runs without
the switches (``pairing.py``): the pair's forward and backward, two micro-batches, are one
computation (the head and MTP masked, not a ``cond``), so each one's all-to-alls can sit
beside the other's compute. One scan runs every tick, switching on the tick's mode, so
each tick body is compiled once. With 2 stages, down and up go as one swap permute. A
forward stores its input; B and W recompute the chunk under ``jax.vjp`` (B: input gradient
only, W: weight gradient only, as the zero-bubble split needs), so nothing but the stored
inputs and output gradients crosses ticks. Simplified: every micro-batch's input and output
gradient are kept for the whole step (the table's activation count is what a freeing runtime
would hold), the F&B pair is not pinned layer by layer (XLA orders it), and the embedding
is computed on every hop and kept only on the first. Placement of layers and micro-batches
is in ``placement.py``.

Shape letters: B batch, T positions (``ids_BT1``: T + 1), D hidden, L layers, E routed
experts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

import deepseek_jax.sharding as sharding
from deepseek_jax.pipeline.buffers import add_at, keep_where, like, per_layer, take, write
from deepseek_jax.pipeline.pairing import KINDS, paired_kind, phase_masks
from deepseek_jax.pipeline.placement import (
    Pipeline,
    microbatches,
    split_layers,
    tick_tables,
    to_stages,
)


def _layer(stack: nnx.Module, k: int) -> nnx.Module:
    graphdef, state = nnx.split(stack)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[k], state))


HeadLoss = Callable  # (model, h_BTD, ids_BT1) -> (loss, terms: dict, mtp_stats | None)


def value_and_grad(
    pipe: Pipeline,
    graphdef: nnx.GraphDef,
    params: nnx.State,
    rest: nnx.State,
    ids_BT1: jax.Array,
    head_loss: HeadLoss,
    balance_alpha: float,
):
    """The mean loss over the micro-batches, its gradient and the MoE statistics.

    Args:
      graphdef, params, rest: the Transformer as ``nnx.split(model, nnx.Param, ...)``.
      ids_BT1: [B, T+1] tokens laid out over ``batch``.
      head_loss: the last hop's loss from the final hidden state (it runs the head and MTP).
      balance_alpha: weight of each main-stack MoE layer's balance loss in the objective.
    Returns:
      (loss terms averaged over micro-batches, ``terms["loss"]`` the objective; grads like
      ``params``; (load_LE, balance_L, dropped_L) per layer of the main MoE stack or None;
      the MTP modules' ``StackStats`` or None). Loads are summed over micro-batches.
    """
    sched, plan = pipe.sched, pipe.plan
    m = sched.microbatches
    mesh = jax.sharding.get_abstract_mesh()
    stage_axes = tuple(a for a in sharding.mesh_axes_of("layers") if a in mesh.axis_names)
    layers_p, shared_p = split_layers(params)
    layers_r, shared_r = split_layers(rest)
    stage_p, gather_vjp = jax.vjp(lambda lp: to_stages(lp, plan), layers_p)
    stage_r = to_stages(layers_r, plan)
    ids = microbatches(ids_BT1, m)
    tables_np = tick_tables(sched, plan)
    for ch in ("grad_down", "grad_up", "grad_self"):  # gradients land one tick later
        for k in ("on", "c", "mb"):
            a = tables_np[f"{ch}_{k}"]
            tables_np[f"prev_{ch}_{k}"] = np.concatenate([np.zeros_like(a[:1]), a[:-1]])
    tables = {k: jnp.asarray(v) for k, v in tables_np.items()}
    channels = ("act_down", "act_up", "act_self", "grad_down", "grad_up", "grad_self")
    used = [k for k in channels if tables_np[f"{k}_on"].any()]  # ppermute only these
    T, D = ids.shape[-1] - 1, pipe.hidden
    buf_spec = sharding.spec((None, None, "batch", None, None))
    act_dtype = jnp.dtype(pipe.dtype)
    zeros_buf = jnp.zeros((sched.chunks, m, ids.shape[1], T, D), act_dtype, out_sharding=buf_spec)
    n = len(sched.paths[0])
    first_c = jnp.asarray(plan.part_of == 0)
    last_c = jnp.asarray(plan.part_of == n - 1)
    dense_valid, moe_valid = jnp.asarray(plan.dense_valid), jnp.asarray(plan.moe_valid)

    def body(sp, sr, shp, shr, ids, xin, dys):
        stage = jax.lax.axis_index(stage_axes)
        sp, sr = jax.tree.map(lambda a: a[0], (sp, sr))
        dvalid, mvalid = dense_valid[stage], moe_valid[stage]

        zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t)  # noqa: E731

        def merged(p_c, sh_p, c):
            r_c = take(sr, c)
            return nnx.merge(graphdef, nnx.State({**sh_p, **p_c}), nnx.State({**shr, **r_c}))

        def chunk(p_c, sh_p, x_in, ids_BT1, c):
            """The chunk's layers: (output, weighted balance loss), (balance, MoE stats)."""
            model = merged(p_c, sh_p, c)
            ids_BT = ids_BT1[:, :-1]
            pos_BT = jnp.broadcast_to(jnp.arange(ids_BT.shape[1]), ids_BT.shape)
            emb = model.embed_tokens(ids_BT).astype(x_in.dtype)
            x = jnp.where(first_c[stage, c], emb, x_in)
            if "dense_layers" in p_c:
                for k in range(dvalid.shape[-1]):
                    y, _ = _layer(model.dense_layers, k)(x, pos_BT)
                    x = jnp.where(dvalid[c, k], y.astype(x.dtype), x)
            loads, bals, drops = [], [], []
            if "moe_layers" in p_c:
                for k in range(mvalid.shape[-1]):
                    y, st = _layer(model.moe_layers, k)(x, pos_BT)
                    v = mvalid[c, k]
                    x = jnp.where(v, y.astype(x.dtype), x)
                    loads.append(jnp.where(v, st.load_E, 0.0))
                    bals.append(jnp.where(v, st.balance_loss, 0.0))
                    drops.append(jnp.where(v, st.dropped, 0))
            moe_bal = sum(bals, jnp.zeros((), jnp.float32))
            stats = tuple(jnp.stack(a) for a in (loads, bals, drops)) if loads else ()
            return (x, balance_alpha * moe_bal), (moe_bal, stats)

        def head(h, ids_BT1, c, masked):
            """The last hop's head and MTP, forward and backward at once: (loss terms, MTP
            stats, shared-weight gradient, the output gradient that seeds the chunk's B),
            zeros where chunk ``c`` is not the last hop (masked in a paired tick, beside the
            other micro-batch's work; else a cond)."""
            p_c = take(sp, c)

            def seeded(h):
                def f(sh, h):
                    loss, terms, mtp = head_loss(merged(p_c, sh, c), h, ids_BT1)
                    return loss, ({**terms, "loss": loss}, mtp)

                _, vjp, (terms, mtp) = jax.vjp(f, shp, h, has_aux=True)
                gsh, dh = vjp(inv_m)
                return terms, mtp, gsh, dh.astype(h.dtype)

            last = last_c[stage, c]
            if masked:
                return jax.tree.map(lambda a: jnp.where(last, a, 0), seeded(h))

            def none(h):  # gradients typed (sharded) like what they differentiate
                terms, mtp, _, _ = jax.eval_shape(seeded, h)
                gsh = jax.tree.map(jnp.zeros_like, shp)
                return zeros(terms), zeros(mtp), gsh, jnp.zeros_like(h)

            return jax.lax.cond(last, seeded, none, h)

        carry0 = {
            "xin": xin,
            "dys": dys,
            "g_p": jax.tree.map(jnp.zeros_like, sp),
            "g_sh": jax.tree.map(jnp.zeros_like, shp),
            "g_head": jax.tree.map(jnp.zeros_like, shp),  # the head's share, made in F
        }
        inv_m = jnp.asarray(1.0 / m, jnp.float32)
        (_, _), (_, stats0) = jax.eval_shape(lambda: chunk(take(sp, 0), shp, xin[0, 0], ids[0], 0))
        terms0, mtp0, _, _ = jax.eval_shape(lambda: head(xin[0, 0], ids[0], 0, True))
        zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t)  # noqa: E731
        carry0["terms"] = zeros(terms0)
        carry0["stats"] = zeros(
            jax.tree.map(lambda s: jax.ShapeDtypeStruct((sched.chunks, *s.shape), s.dtype), stats0)
        )
        carry0["mtp"] = zeros(mtp0)
        blank = jnp.zeros_like(xin[0, 0])
        carry0["pend_dx"] = blank  # the input gradient made last tick, delivered this tick

        def run_f(carry, xin, row, masked=False):
            c, mb = row["f_c"], row["f_mb"]
            (y, _), (moe_bal, stats) = chunk(take(sp, c), shp, xin[c, mb], ids[mb], c)
            terms, mtp, gsh, dy = head(y, ids[mb], c, masked)
            terms = {**terms, "balance": terms["balance"] + moe_bal}
            terms["loss"] = terms["loss"] + balance_alpha * moe_bal
            carry = dict(carry)
            add = lambda a, b: a + b  # noqa: E731
            carry["terms"] = jax.tree.map(add, carry["terms"], terms)
            carry["stats"] = add_at(carry["stats"], c, stats)
            carry["mtp"] = jax.tree.map(add, carry["mtp"], mtp)
            carry["g_head"] = jax.tree.map(add, carry["g_head"], gsh)
            return carry, y, dy  # dy: the seed of this chunk's B, stored after the tick's B

        def run_b(carry, xin, dys, row, *, grad_x: bool, grad_w: bool):
            c, mb = row["b_c"], row["b_mb"]
            x_in, dy, p_c = xin[c, mb], dys[c, mb], take(sp, c)
            f = lambda p, sh, x: chunk(p, sh, x, ids[mb], c)[0]  # noqa: E731
            cot = (dy, inv_m)
            carry = dict(carry)
            dx = blank
            if grad_w:
                _, vjp = jax.vjp(f, p_c, shp, x_in)
                gp, gsh, dx_ = vjp(cot)
                carry["g_p"] = add_at(carry["g_p"], c, gp)
                carry["g_sh"] = jax.tree.map(lambda a, b: a + b, carry["g_sh"], gsh)
                dx = dx_ if grad_x else blank
            elif grad_x:
                _, vjp = jax.vjp(lambda x: f(p_c, shp, x), x_in)
                (dx,) = vjp(cot)
            return carry, dx

        # A slot runs as two halves, each a switch over the slot kinds present: its forward
        # (kinds F, FB, FBW) and its backward (B, W, BW, FB, FBW). A tick holding an F&B pair
        # runs without the switch instead (``paired_tick``, see pairing.py).
        def f_half(kind, masked=False):
            def run(acc, xin, row):
                return run_f(acc, xin, row, masked) if "F" in KINDS[kind] else (acc, blank, blank)

            return run

        def b_half(kind):
            phases = KINDS[kind].replace("F", "")

            def run(acc, xin, dys, row):
                if not phases or not kind:
                    return acc, blank
                grads = {"grad_x": "B" in phases, "grad_w": "W" in phases}
                return run_b(acc, xin, dys, row, **grads)

            return run

        def halves(make, keep, present):
            ks = sorted({k for k in present if keep(KINDS[k])} | {0})
            index = jnp.asarray(
                [ks.index(k) if k in ks and keep(KINDS[k]) else 0 for k in range(len(KINDS))],
                jnp.int32,
            )
            return [make(k) for k in ks], index

        acc_f = ("terms", "stats", "mtp", "g_head")  # apart from B's inputs and outputs
        acc_b = ("g_p", "g_sh")

        perms = {
            "down": [(s, s + 1) for s in range(sched.pp - 1)],
            "up": [(s, s - 1) for s in range(1, sched.pp)],
        }

        def send(prefix, val):
            """``val`` over every used channel of ``prefix`` (act, grad): received values by
            channel. Down and up go as one permute where together they are a permutation
            (2 stages: a swap), so that a switched tick's window holds one transfer."""
            chans = [ch for ch in used if ch.startswith(prefix)]
            out = {ch: val for ch in chans if ch.endswith("self")}
            ways = [ch for ch in chans if not ch.endswith("self")]
            pairs = [pr for ch in ways for pr in perms[ch.split("_")[1]]]
            if len(ways) > 1 and len(set(pairs)) == len({a for a, _ in pairs}) == len(
                {b for _, b in pairs}
            ):
                got = jax.lax.ppermute(val, stage_axes, pairs)  # each receiver has one source
                return out | dict.fromkeys(ways, got)
            ppermute = lambda ch: jax.lax.ppermute(val, stage_axes, perms[ch.split("_")[1]])  # noqa: E731
            return out | {ch: ppermute(ch) for ch in ways}

        def deliver(buf, row, ch, val, prefix=""):
            on, c, mb = (row[f"{prefix}{ch}_{k}"] for k in ("on", "c", "mb"))
            return write(buf, on > 0, c, mb, val)

        def switched_tick(present):
            f_branches, f_index = halves(f_half, lambda k: "F" in k, present)
            b_branches, b_index = halves(
                b_half, lambda k: bool(k.replace("F", "").replace("idle", "")), present
            )
            f_run = lambda acc, xin, row: jax.lax.switch(  # noqa: E731
                f_index[row["kind"]], f_branches, acc, xin, row
            )
            b_run = lambda acc, xin, dys, row: jax.lax.switch(  # noqa: E731
                b_index[row["kind"]], b_branches, acc, xin, dys, row
            )
            return functools.partial(tick, f_run, b_run, None)

        def paired_tick(kind):
            """One computation for every stage: the pair's phases, masked per slot."""
            return functools.partial(tick, f_half(kind, True), b_half(kind), masks)

        def tick(f_run, b_run, on, carry, tab):
            """Double-buffered transfers: the last tick's input gradients travel beside this
            tick's forward half (which reads only activations), this tick's activations
            beside its backward half (which reads only stored ones), so no stage-to-stage
            ppermute waits on the compute it could overlap, and every value still arrives
            before the tick after the one that made it, as the table assumes. ``on``: the
            per-kind phase masks of a paired tick (None: switched, nothing to mask)."""
            row = {k: v[stage] for k, v in tab.items()}
            has = {ph: True if on is None else on[ph][row["kind"]] for ph in "FBW"}
            carry = dict(carry)
            got_dx = send("grad", carry["pend_dx"])
            acc, y, seed = f_run({k: carry[k] for k in acc_f}, carry["xin"], row)
            carry |= keep_where(has["F"], acc, carry)
            for ch, val in got_dx.items():
                carry["dys"] = deliver(carry["dys"], row, ch, val, prefix="prev_")
            # The activations' transfer starts after the gradients' completes: else XLA
            # combines two permutes of the same pairs into one, which waits for y, and the
            # forward half leaves the gradients' window (seen in the GPU compile). Nothing
            # the backward half reads depends on the forward half.
            y, _ = jax.lax.optimization_barrier((y, got_dx))
            got_y = send("act", y)
            acc, dx = b_run({k: carry[k] for k in acc_b}, carry["xin"], carry["dys"], row)
            carry |= keep_where(has["W"], acc, carry)
            f_c, f_mb = row["f_c"], row["f_mb"]
            seeded = masks["F"][row["kind"]] & last_c[stage, f_c]
            carry["dys"] = write(carry["dys"], seeded, f_c, f_mb, seed)
            for ch, val in got_y.items():
                carry["xin"] = deliver(carry["xin"], row, ch, val)
            carry["pend_dx"] = jnp.where(has["B"], dx, blank)
            return carry, None

        # One scan over every tick; a tick's mode (switched, or the paired kind) picks its
        # body, so each body is compiled once however often the modes alternate.
        masks = {ph: jnp.asarray(v) for ph, v in phase_masks().items()}
        kind_TS = tables_np["kind"]
        modes = [paired_kind(row) if pipe.paired else 0 for row in kind_TS]
        distinct = sorted(set(modes))
        bodies = []
        for mode in distinct:
            present = {int(k) for t, row in enumerate(kind_TS) if modes[t] == mode for k in row}
            bodies.append(paired_tick(mode) if mode else switched_tick(present))
        xs = tables
        if len(bodies) == 1:
            loop_body = bodies[0]
        else:
            mode_T = jnp.asarray([distinct.index(mode) for mode in modes], jnp.int32)
            xs = {**tables, "mode": mode_T}

            def loop_body(carry, tab):
                tab = dict(tab)
                mode = tab.pop("mode")  # the same on every stage: all take one branch
                return jax.lax.switch(mode, bodies, carry, tab)

        carry, _ = jax.lax.scan(loop_body, carry0, xs)
        total = lambda t: jax.lax.psum(t, stage_axes)  # noqa: E731
        out_terms = jax.tree.map(lambda a: total(a) / m, carry["terms"])
        expand = lambda t: jax.tree.map(lambda a: a[None], t)  # noqa: E731
        return (
            out_terms,
            expand(carry["g_p"]),
            total(jax.tree.map(lambda a, b: a + b, carry["g_sh"], carry["g_head"])),
            expand(carry["stats"]),
            total(carry["mtp"]),
        )

    st = P(stage_axes)
    fn = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(st, st, P(), P(), P(), P(), P()),
        out_specs=(P(), st, P(), st, P()),
        axis_names=set(stage_axes),
        check_vma=False,
    )
    terms, g_stage, g_shared, stats, mtp = fn(
        stage_p, stage_r, shared_p, shared_r, ids, zeros_buf, zeros_buf
    )
    (g_layers,) = gather_vjp(g_stage)
    grads = like(params, {**g_shared, **g_layers})
    return terms, grads, per_layer(stats, plan, m), mtp
