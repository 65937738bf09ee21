"""A latency profile for XLA:GPU's latency-hiding scheduler, written from our cost model.

Why: without a profile, XLA:GPU prices every async collective at one fixed latency and
most kernels at a nominal cost (its approximate estimator), whatever their bytes and
FLOPs. The scheduler then stops filling a collective's window once that fixed latency is
covered, and leaves the rest of a phase's work outside it: an all-to-all of 4 MB and one of
400 MB get the same window. On a pod, profile-guided latency estimation (PGLE: a profiling
run, then a recompile that reads the measured costs) gives the scheduler real figures. Here
the figures come from ``schedule.CostModel`` (the harness's stated model), read off a first
compile's schedule: each kernel's compute seconds and each collective's transfer seconds,
by the instruction name the scheduler saw (``scheduling_name``). The result is what XLA
would schedule given those costs; it is a model's figure, never a measurement.

Format: ``tensorflow.profiler.ProfiledInstructionsProto`` as text (``costs { name cost_us
}``); XLA takes a start instruction's cost as the latency of its start/done pair
(``--xla_gpu_pgle_profile_file_or_directory_path=FILE.pbtxt``).
"""

from __future__ import annotations

import re

from deepseek_jax.codesign.schedule import Instr, Schedule

_SCHEDULING_NAME = re.compile(r'scheduling_name="([^"]+)"')


def scheduling_name(ins: Instr) -> str:
    """The name XLA's scheduler knew the instruction by (later passes may rename it)."""
    m = _SCHEDULING_NAME.search(ins.attrs)
    return m.group(1) if m else ins.name


def costs_us(sched: Schedule) -> dict[str, float]:
    """Microseconds per instruction of ``sched`` under its cost model, one execution: compute
    kernels by their compute-stream cost, collectives by their transfer time (a sync one too:
    XLA made it sync after scheduling, and its scheduling name is its start's)."""
    transfer = {c.name: c.transfer_s for c in sched.collectives}
    fused = {c for instrs in sched.comps.values() for i in instrs if i.opcode == "fusion"
             for c in i.calls()}  # fmt: skip
    out: dict[str, float] = {}
    for comp, instrs in sched.comps.items():
        if comp in fused:  # a kernel's insides: the scheduler never sees them
            continue
        for ins in instrs:
            if ins.name in transfer:
                seconds = transfer[ins.name]
            elif ins.opcode.endswith(("-start", "-done")):
                continue  # other async ops keep XLA's own estimate
            else:
                seconds = sched.cost(comp, ins)
            if seconds > 0:
                out[scheduling_name(ins)] = seconds * 1e6
    return out


def profile_text(costs: dict[str, float]) -> str:
    """``costs`` as a ProfiledInstructionsProto text file."""
    lines = [f'costs {{ name: "{name}" cost_us: {us:.6g} }}' for name, us in sorted(costs.items())]
    return "\n".join(lines) + "\n"
