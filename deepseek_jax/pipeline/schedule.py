"""Pipeline schedules as data: 1F1B, ZB1P, DualPipe, DualPipeV (V3TR 3.2.1, Table 2).

A schedule is, per stage, the ordered list of *slots* that stage runs. A slot is one op, a
full backward (B and W of one chunk together), or DualPipe's overlapped pair (a forward and
a backward chunk of two different micro-batches). An op names (micro-batch, direction,
chunk, phase): phase F is the forward, B the input gradient, W the weight gradient (the
zero-bubble split). A micro-batch walks a *path* of (stage, chunk) pairs: stages 0..PP-1
for 1F1B/ZB1P; for DualPipe half the micro-batches go 0..PP-1 on chunk 0 and half go
PP-1..0 on chunk 1 (each stage holds two copies' worth of layers); for DualPipeV every
micro-batch goes down on chunk 0 and back up on chunk 1 (the layers cut into 2 PP chunks,
stage i holding chunks i and 2 PP - 1 - i).

Two timelines come from the same orders: ``timeline`` with per-phase costs (F, B, W, F&B)
gives the bubble and activation counts of Table 2; ``ticks`` with every slot one tick gives
the lockstep table the executor runs (transfers between ticks). Pure Python, no JAX.

DualPipe's and DualPipeV's per-stage orders transcribe deepseek-ai/DualPipe's eight steps;
ZB1P is ZB-H1 (Qi et al. 2023): 1F1B's order with each W deferred as long as the in-flight
micro-batches stay at 1F1B's count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import NamedTuple

F, B, W = "F", "B", "W"
SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")
DISPLAY = {"1f1b": "1F1B", "zb1p": "ZB1P", "dualpipe": "DualPipe", "dualpipev": "DualPipeV"}


class Op(NamedTuple):
    mb: int  # micro-batch, 0..M-1
    direction: int  # 0: fed at stage 0; 1: fed at stage PP-1 (DualPipe only)
    chunk: int  # which of the stage's layer chunks (0 or 1)
    phase: str  # F, B or W


Slot = tuple[Op, ...]  # what one stage does in one tick: 1 op, (B, W), or an (F, B[, W]) pair


@dataclasses.dataclass(frozen=True)
class Costs:
    """Chunk times: forward, full backward (input + weights), weight-only backward, and an
    overlapped forward + full backward pair (None: no overlap gain, F + B)."""

    f: float = 1.0
    b: float = 2.0
    w: float = 1.0
    fb: float | None = None

    def slot(self, slot: Slot) -> float:
        phases = [op.phase for op in slot]
        if F in phases and B in phases:
            pair = self.f + self.b if self.fb is None else self.fb
            return pair if W in phases else pair - self.w
        return (
            phases.count(F) * self.f
            + phases.count(B) * (self.b - self.w)
            + (phases.count(W) * self.w)
        )


@dataclasses.dataclass(frozen=True)
class Schedule:
    name: str
    pp: int  # stages
    microbatches: int
    chunks: int  # layer chunks per stage
    orders: tuple[tuple[Slot, ...], ...]  # per stage, its slots in program order
    paths: tuple[tuple[tuple[int, int], ...], ...]  # per micro-batch, its (stage, chunk) walk

    def ops(self) -> list[tuple[int, Op]]:
        return [(s, op) for s, order in enumerate(self.orders) for slot in order for op in slot]


# ----------------------------------------------------------------------------- generators
def _line_paths(pp: int, m: int) -> tuple:
    return tuple(tuple((s, 0) for s in range(pp)) for _ in range(m))


def one_f_one_b(pp: int, m: int) -> Schedule:
    """1F1B: PP - s - 1 warm-up forwards on stage s, then alternate F and full backward."""
    orders = []
    for s in range(pp):
        warm = min(pp - s - 1, m)
        order: list[Slot] = [(Op(i, 0, 0, F),) for i in range(warm)]
        for i in range(m):
            if warm + i < m:
                order.append((Op(warm + i, 0, 0, F),))
            order.append((Op(i, 0, 0, B), Op(i, 0, 0, W)))
        orders.append(tuple(order))
    return Schedule("1f1b", pp, m, 1, tuple(orders), _line_paths(pp, m))


def zb1p(pp: int, m: int) -> Schedule:
    """ZB-H1: 1F1B's F/B order; each W is deferred until the stage would otherwise idle or
    hold more micro-batches than 1F1B's peak (PP), so the W's fill the warm-up/tail bubbles.

    Greedy in lockstep ticks; with F = B_input = W (the paper's assumption) the bubble is
    exactly (PP-1)(F+B-2W).
    """
    base = one_f_one_b(pp, m)
    todo = [[slot[0] for slot in order] for order in base.orders]  # F and B in 1F1B order
    done: dict[tuple[int, Op], int] = {}
    pending: list[list[Op]] = [[] for _ in range(pp)]
    orders: list[list[Slot]] = [[] for _ in range(pp)]
    tick = 0
    while any(todo) or any(pending):
        for s in range(pp):
            nxt = todo[s][0] if todo[s] else None
            ops = [op for slot in orders[s] for op in slot]
            held = sum(op.phase == F for op in ops) - sum(op.phase == W for op in ops)
            ready = nxt is not None and _ready(base, s, nxt, done, tick)
            if ready and not (nxt.phase == F and held >= pp and pending[s]):
                todo[s].pop(0)
                orders[s].append((nxt,))
                done[(s, nxt)] = tick
                if nxt.phase == B:
                    pending[s].append(Op(nxt.mb, 0, 0, W))
            elif pending[s]:
                w = pending[s].pop(0)
                orders[s].append((w,))
                done[(s, w)] = tick
        tick += 1
        if tick > 10 * (pp + 3 * m):
            raise RuntimeError("zb1p: the greedy schedule did not terminate")
    return Schedule("zb1p", pp, m, 1, tuple(map(tuple, orders)), base.paths)


def _ready(sched: Schedule, stage: int, op: Op, done: dict, tick: int) -> bool:
    """Whether ``op``'s producer on another stage finished before ``tick``."""
    dep = _dependency(sched.paths[op.mb], stage, op)
    return dep is None or dep[0] == stage or done.get(dep, tick) < tick


def _dual_order(
    n_ranks: int, rank: int, n_mb: int, phase_to_chunk: Callable[[int], int], mb_of
) -> list[Slot]:
    """One rank's slots in deepseek-ai/DualPipe's eight steps (its ``step`` method).

    ``n_ranks``, ``rank`` and ``n_mb`` are DualPipeV's (DualPipe passes its half sizes);
    ``phase_to_chunk`` maps the code's phase to the local chunk, ``mb_of(chunk, j)`` gives
    the j-th micro-batch that chunk sees and its direction.
    """
    nf, nb = [0, 0], [0, 0]
    wq: list[Op] = []
    out: list[Slot] = []

    def fwd(p):
        c = phase_to_chunk(p)
        mb, d = mb_of(c, nf[c])
        nf[c] += 1
        return Op(mb, d, c, F)

    def bwd(p, zb):
        c = phase_to_chunk(p)
        mb, d = mb_of(c, nb[c])
        nb[c] += 1
        if zb:
            wq.append(Op(mb, d, c, W))
            return (Op(mb, d, c, B),)
        return (Op(mb, d, c, B), Op(mb, d, c, W))

    last = rank == n_ranks - 1
    out += [(fwd(0),) for _ in range((n_ranks - rank - 1) * 2)]  # 1: nF0
    for _ in range(rank + 1):  # 2: nF0F1
        out += [(fwd(0),), (fwd(1),)]
    for _ in range(n_ranks - rank - 1):  # 3: nB1W1F1 (zero bubble)
        out.append(bwd(1, True))
        out.append((wq.pop(0),))
        out.append((fwd(1),))
    for i in range(n_mb - 2 * n_ranks + rank + 1):  # 4: nF0B1F1B0 (main)
        if i == 0 and last:  # not overlapped, to shorten the bubble
            out += [(fwd(0),), bwd(1, False)]
        else:
            out.append((fwd(0), *bwd(1, False)))
        out.append((fwd(1), *bwd(0, False)))
    for _ in range(n_ranks - rank - 1):  # 5: nB1F1B0
        out.append(bwd(1, False))
        out.append((fwd(1), *bwd(0, False)))
    zb = False
    for i in range(rank + 1):  # 6: nB1B0, the second half zero bubble
        zb = zb or (i == (rank + 1) // 2 and rank % 2 == 1)
        out.append(bwd(1, zb))
        zb = zb or (i == (rank + 1) // 2 and rank % 2 == 0)
        out.append(bwd(0, zb))
    for _ in range(n_ranks - rank - 1):  # 7: nWB0
        out.append((wq.pop(0),))
        out.append(bwd(0, True))
    out += [(wq.pop(0),) for _ in range(rank + 1)]  # 8: nW
    return out


def dualpipe(pp: int, m: int) -> Schedule:
    """DualPipe (V3TR Figure 5): micro-batches fed from both ends, M/2 each way."""
    if pp % 2 or m % 2:
        raise ValueError(f"dualpipe: needs an even PP and micro-batch count, got {pp}, {m}")
    half, hm = pp // 2, m // 2
    orders = []
    for s in range(pp):
        second = s >= half
        # The code's phase 0 is the direction fed at the stage's nearer end.
        order = _dual_order(
            half,
            min(s, pp - 1 - s),
            hm,
            lambda p, second=second: p ^ second,
            lambda c, j: (c * hm + j, c),
        )
        orders.append(tuple(order))
    paths = tuple(
        tuple((s, 0) for s in range(pp)) if mb < hm else tuple((pp - 1 - s, 1) for s in range(pp))
        for mb in range(m)
    )
    return Schedule("dualpipe", pp, m, 2, tuple(orders), paths)


def dualpipev(pp: int, m: int) -> Schedule:
    """DualPipeV: every micro-batch goes down chunk 0 of stages 0..PP-1 and back up chunk 1."""
    orders = tuple(
        tuple(_dual_order(pp, s, m, lambda p: p, lambda c, j: (j, 0))) for s in range(pp)
    )
    path = tuple((s, 0) for s in range(pp)) + tuple((pp - 1 - s, 1) for s in range(pp))
    return Schedule("dualpipev", pp, m, 2, orders, (path,) * m)


GENERATORS: dict[str, Callable[[int, int], Schedule]] = {
    "1f1b": one_f_one_b,
    "zb1p": zb1p,
    "dualpipe": dualpipe,
    "dualpipev": dualpipev,
}


def check_args(name: str, pp: int, m: int) -> None:
    """One-line errors naming the fix for combinations no table exists for."""
    if name not in GENERATORS:
        raise ValueError(f"pipeline: unknown schedule {name!r}; choose one of {SCHEDULES}")
    if pp < 2:
        raise ValueError(f"pipeline {name}: needs at least 2 stages, got {pp}")
    if name == "dualpipe" and pp % 2:
        raise ValueError(f"pipeline dualpipe: needs an even stage count, got {pp}; use dualpipev")
    need = 2 * pp if name.startswith("dualpipe") else pp
    if m < need or (name == "dualpipe" and m % 2):
        raise ValueError(
            f"pipeline {name}: needs at least {need} micro-batches"
            + (" (an even number)" if name == "dualpipe" else "")
            + f" for {pp} stages, got {m}; raise --microbatches"
        )


def make_schedule(name: str, pp: int, m: int) -> Schedule:
    check_args(name, pp, m)
    sched = GENERATORS[name](pp, m)
    check(sched)
    return sched


# ----------------------------------------------------------------------- dependencies
def _dependency(path: Sequence[tuple[int, int]], stage: int, op: Op) -> tuple[int, Op] | None:
    """The (stage, op) that must finish before ``op``: the previous hop's F, the next hop's
    B (the last hop's B follows its own F: the loss), the same chunk's B for a W."""
    i = path.index((stage, op.chunk))
    if op.phase == F:
        if i == 0:
            return None
        s, c = path[i - 1]
        return s, Op(op.mb, op.direction, c, F)
    if op.phase == B:
        if i == len(path) - 1:
            return stage, Op(op.mb, op.direction, op.chunk, F)
        s, c = path[i + 1]
        return s, Op(op.mb, op.direction, c, B)
    return stage, Op(op.mb, op.direction, op.chunk, B)


def timeline(sched: Schedule, costs: Costs | None) -> list[list[tuple[float, float]]]:
    """(start, end) of every slot, stage by stage; ``costs=None``: one tick per slot, and a
    cross-stage dependency must finish in an earlier tick (the transfer sits between).

    Each stage runs its slots in order, each as soon as its producers are done. Raises
    ValueError on a deadlock (a slot waits on one that can never run).
    """
    pp = sched.pp
    finish: dict[tuple[int, Op], float] = {}
    times: list[list[tuple[float, float]]] = [[] for _ in range(pp)]
    nxt, free = [0] * pp, [0.0] * pp
    remaining = sum(len(o) for o in sched.orders)
    while remaining:
        progressed = False
        for s in range(pp):
            while nxt[s] < len(sched.orders[s]):
                slot = sched.orders[s][nxt[s]]
                start = free[s]
                blocked = False
                for op in slot:
                    dep = _dependency(sched.paths[op.mb], s, op)
                    if dep is None or (dep[0] == s and dep[1] in slot):
                        continue
                    if dep not in finish:
                        blocked = True
                        break
                    start = max(start, finish[dep])
                if blocked:
                    break
                end = start + (1.0 if costs is None else costs.slot(slot))
                for op in slot:
                    finish[(s, op)] = end
                times[s].append((start, end))
                free[s] = end
                nxt[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {s: sched.orders[s][nxt[s]] for s in range(pp) if nxt[s] < len(sched.orders[s])}
            raise ValueError(f"{sched.name}: deadlock; stages wait on {stuck}")
    return times


def check(sched: Schedule) -> None:
    """Legality: every (micro-batch, hop)'s F, B and W exactly once on the hop's stage;
    slots well formed; the order runs without deadlock, each op after its producer."""
    want = {
        (s, Op(mb, int(sched.name == "dualpipe" and 2 * mb >= sched.microbatches), c, ph))
        for mb, path in enumerate(sched.paths)
        for s, c in path
        for ph in (F, B, W)
    }
    got = sched.ops()
    if len(got) != len(set(got)) or set(got) != want:
        dup = len(got) - len(set(got))
        missing, extra = want - set(got), set(got) - want
        raise ValueError(
            f"{sched.name}: {dup} repeated ops, missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(extra)[:3]}"
        )
    for s, order in enumerate(sched.orders):
        for slot in order:
            phases = sorted(op.phase for op in slot)
            if phases not in ([F], [B], [W], [B, W], [B, F], [B, F, W]):
                raise ValueError(f"{sched.name}: stage {s} slot {slot} mixes {phases}")
            ws = [op for op in slot if op.phase == W]
            bs = [op for op in slot if op.phase == B]
            if ws and bs and ws[0][:3] != bs[0][:3]:
                raise ValueError(f"{sched.name}: stage {s} slot {slot}: W not of its B")
    table = ticks(sched)  # raises on a deadlock
    when = {
        (s, op): t
        for s, row in enumerate(table)
        for t, slot in enumerate(row)
        if slot
        for op in slot
    }
    for (s, op), t in when.items():
        dep = _dependency(sched.paths[op.mb], s, op)
        if dep is not None and not (when[dep] < t or (dep[0] == s and when[dep] == t)):
            raise ValueError(f"{sched.name}: {op} on stage {s} at tick {t} before {dep}")


def ticks(sched: Schedule) -> list[list[Slot | None]]:
    """The lockstep table: ``table[stage][tick]`` is a slot or None (idle)."""
    times = timeline(sched, None)
    n = int(max(end for row in times for _, end in row))
    table: list[list[Slot | None]] = [[None] * n for _ in range(sched.pp)]
    for s, row in enumerate(times):
        for slot, (start, _) in zip(sched.orders[s], row, strict=True):
            table[s][int(start)] = slot
    return table


# --------------------------------------------------------------------------- counts
@dataclasses.dataclass(frozen=True)
class Counts:
    makespan: float
    bubble: float  # idle time of the busiest-idle stage, in cost units
    bubble_fraction: float  # idle time / (stages x makespan)
    peak_activations: int  # chunk activations held at peak on the fullest stage
    param_chunks: int  # layer chunks each stage holds


def counts(sched: Schedule, costs: Costs = Costs()) -> Counts:
    """Bubble and memory, counted from the schedule's costed timeline.

    A chunk's activations are held from its F to its W (the weight gradient still reads
    them); ``peak_activations`` is the most a stage holds at once.
    """
    times = timeline(sched, costs)
    makespan = max(end for row in times for _, end in row)
    idle = [makespan - sum(e - b for b, e in row) for row in times]
    peak = 0
    for order in sched.orders:
        held = 0
        for slot in order:
            held += sum(op.phase == F for op in slot)
            peak = max(peak, held)
            held -= sum(op.phase == W for op in slot)
    return Counts(makespan, max(idle), sum(idle) / (sched.pp * makespan), peak, sched.chunks)
