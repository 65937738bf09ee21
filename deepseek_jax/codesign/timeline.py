"""A compiled GPU program's schedule as a timeline: when each kernel and each collective runs.

XLA:GPU issues a computation's instructions in schedule order (``compiled.as_text()``) on one
compute stream; an async collective moves data on its own stream from its ``*-start`` until
its ``*-done``, where the compute stream waits for it if it has not arrived; a sync
collective stalls the compute stream while it moves. ``timeline`` replays that order under
``schedule.CostModel``: each compute op lasts its modelled cost, each collective its transfer
time; loops that hold collectives are unrolled trip by trip, other loops are one op. The
result is what XLA intends, priced by the model (no latency, no contention, no measured
kernel times): enough to see which transfers sit beside compute and which stall it.
"""

from __future__ import annotations

import dataclasses
import re

from deepseek_jax.codesign.schedule import CostModel, Instr, Schedule

# Compute ops by the named scopes (and einsums) in their op_name; first match wins.
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("attention", r"mla_|attention"),
    ("router", r"/router/"),
    ("shared expert", r"shared_experts"),
    # the expert FFN einsums (capacity slots) and the spill loop over overflow blocks
    ("routed experts", r"routed_experts|ecd,edf|ecf,efd|efd,ecd|shard_map/while$"),
)
OTHER = "other (permute, gather, casts)"


@dataclasses.dataclass(frozen=True)
class Bar:
    """One row of the timeline; times in seconds from the program's start.

    Compute: ``start_s`` to ``end_s`` is the kernel. Collective: ``start_s`` is its start
    (or the sync op), ``end_s`` where the compute stream passes its done, and the link is
    busy from ``start_s`` for ``transfer_s``; ``stall_s`` is how long compute waited for it.
    """

    lane: str  # "compute" | "collective"
    name: str  # the HLO instruction (the start, for an async collective)
    category: str  # compute: a CATEGORIES label or OTHER; collective: its kind
    start_s: float
    end_s: float
    transfer_s: float = 0.0
    stall_s: float = 0.0
    is_async: bool = False
    axes: tuple[str, ...] = ()
    op_name: str = ""


def category(op_name: str, categories=CATEGORIES) -> str:
    """The first label of ``categories`` whose pattern occurs in ``op_name``, else OTHER."""
    return next((label for label, pat in categories if re.search(pat, op_name)), OTHER)


def timeline(
    hlo: str,
    axis_sizes: dict[str, int],
    model: CostModel | None = None,
    categories: tuple[tuple[str, str], ...] = CATEGORIES,
) -> list[Bar]:
    """The bars of the entry computation of scheduled HLO ``hlo`` (``compiled.as_text()``)
    over a mesh of ``axis_sizes`` (e.g. ``{"node": 2, "gpu": 4}``), in issue order, priced
    by ``model`` (default: ``CostModel()``, H100 figures).

    Raises ValueError when the text is not a scheduled module, or a done has no start.
    """
    sched = Schedule(hlo, axis_sizes, model or CostModel())
    colls = {c.name: c for c in sched.collectives}
    bars: list[Bar] = []
    t, open_ = 0.0, {}  # open_: start name -> (its start time, its Collective)
    for comp, ins in _issue_order(sched, sched.entry):
        c = colls.get(ins.name)
        if c is not None and c.is_async:
            open_[ins.name] = (t, c)
        elif c is not None:  # sync: the compute stream waits while it moves
            bars.append(_coll(c, t, t + c.transfer_s, c.transfer_s))
            t += c.transfer_s
        elif ins.opcode.endswith("-done") and ins.operands and ins.operands[0] in colls:
            start = ins.operands[0]
            if start not in open_:
                if colls[start].is_async:
                    raise ValueError(f"HLO: {ins.name} is done before {start} started")
                continue  # a sync start/done pair: priced at its start
            s, c = open_.pop(start)
            arrives = s + c.transfer_s
            bars.append(_coll(c, s, max(t, arrives), max(0.0, arrives - t)))
            t = max(t, arrives)
        else:
            cost = sched.cost(comp, ins)
            if cost > 0:
                cat = category(ins.op_name, categories)
                bars.append(Bar("compute", ins.name, cat, t, t + cost, op_name=ins.op_name))
                t += cost
    if open_:
        raise ValueError(f"HLO: collectives never done: {sorted(open_)}")
    return bars


def _coll(c, start: float, end: float, stall: float) -> Bar:
    return Bar(
        "collective", c.name, c.kind, start, end, c.transfer_s, stall, c.is_async, c.axes,
        c.op_name,
    )  # fmt: skip


def _issue_order(sched: Schedule, comp: str, holders: set[str] | None = None):
    """(computation, instruction) in execution order; calls inlined, and loops whose body
    holds a collective unrolled over their trips (other loops stay one op)."""
    holders = _holders(sched) if holders is None else holders
    for ins in sched.comps[comp]:
        if ins.opcode == "while":
            body = re.search(r"body=%([\w.\-]+)", ins.attrs).group(1)
            if body in holders:
                for _ in range(sched.trip_count(ins)):
                    yield from _issue_order(sched, body, holders)
                continue
        elif ins.opcode == "call" and any(c in holders for c in ins.calls()):
            for c in ins.calls():
                yield from _issue_order(sched, c, holders)
            continue
        yield comp, ins


def _holders(sched: Schedule) -> set[str]:
    """The computations that run a collective, directly or through what they call."""
    names = {c.name for c in sched.collectives}
    memo: dict[str, bool] = {}

    def holds(comp: str) -> bool:
        if comp not in memo:
            memo[comp] = False  # a cycle (none in HLO) ends here
            instrs = sched.comps.get(comp, [])
            memo[comp] = any(i.name in names for i in instrs) or any(
                holds(c) for i in instrs for c in _called(i)
            )
        return memo[comp]

    return {c for c in sched.comps if holds(c)}


def _called(ins: Instr) -> list[str]:
    body = re.search(r"body=%([\w.\-]+)", ins.attrs) if ins.opcode == "while" else None
    return ins.calls() + ([body.group(1)] if body else [])


@dataclasses.dataclass(frozen=True)
class Totals:
    """What a timeline adds up to (seconds under the cost model)."""

    makespan_s: float  # the compute stream's end: compute plus every stall
    compute_s: float
    stall_s: float  # compute waiting on collectives (sync ones whole, async ones' tails)
    transfer_s: float  # every collective's link time
    # link time compute did not wait for (transfer minus stall): beside compute, or beside
    # another collective's stall
    overlapped_s: float


def totals(bars: list[Bar]) -> Totals:
    comp = sum(b.end_s - b.start_s for b in bars if b.lane == "compute")
    coll = [b for b in bars if b.lane == "collective"]
    transfer = sum(b.transfer_s for b in coll)
    stall = sum(b.stall_s for b in coll)
    end = max((b.end_s for b in bars), default=0.0)
    return Totals(end, comp, stall, transfer, transfer - stall)
