"""Pipeline bubbles and per-device memory: 1F1B, ZB1P, DualPipe (V3TR section 3.2.1, Table 2).

Times are per chunk: F forward, B full backward (input + weights), W backward for weights
only, F&B a forward and a backward chunk run overlapped (DualPipe's unit). With PP stages
the paper gives:

    1F1B      bubble (PP - 1)(F + B)          params 1x   activations PP
    ZB1P      bubble (PP - 1)(F + B - 2W)     params 1x   activations PP
    DualPipe  bubble (PP/2 - 1)(F&B + B - 3W) params 2x   activations PP + 1

Our figures are counted from the schedule tables of ``deepseek_jax.pipeline.schedule``
(2 PP micro-batches): the idle time of the most idle stage on the costed timeline, the
layer chunks a stage holds, and the most chunk activations a stage holds (F to W). They
equal the formulas whenever B - W = W = F (ZB-H1's assumption); 1F1B's for any costs.
Ignored: communication, optimizer state (scales like params), the embedding / head stages.
"""

from __future__ import annotations

import dataclasses

from deepseek_jax.pipeline.schedule import Costs, counts, make_schedule

SCHEDULES = ("1F1B", "ZB1P", "DualPipe")


@dataclasses.dataclass(frozen=True)
class Schedule:
    name: str
    bubble: float  # idle time per device per step from the table, in the units of F, B, W
    formula_bubble: float  # the paper's formula at the same costs
    param_copies: int  # model parameters held per device, in units of one stage's
    activation_microbatches: int  # micro-batch activations held at peak
    formula: str


def _formula(name: str, pp: int, f: float, b: float, w: float, fb: float) -> float:
    if name == "1F1B":
        return (pp - 1) * (f + b)
    if name == "ZB1P":
        return (pp - 1) * (f + b - 2 * w)
    return (pp / 2 - 1) * (fb + b - 3 * w)


def pipeline_schedule(
    name: str, pp: int, f: float, b: float, w: float, fb: float | None = None
) -> Schedule:
    """One row of V3TR Table 2, counted from the schedule's table.

    Args:
      pp: pipeline stages (DualPipe needs it even).
      f, b, w: forward, full-backward and weight-backward chunk times.
      fb: overlapped forward-and-backward time; None means no overlap gain (f + b).
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {SCHEDULES}")
    if name == "DualPipe" and pp % 2:
        raise ValueError(f"DualPipe needs an even number of stages, got PP={pp}")
    c = counts(make_schedule(name.lower(), pp, 2 * pp), Costs(f, b, w, fb))
    formula = {"1F1B": "(PP-1)(F+B)", "ZB1P": "(PP-1)(F+B-2W)", "DualPipe": "(PP/2-1)(F&B+B-3W)"}
    return Schedule(
        name,
        c.bubble,
        _formula(name, pp, f, b, w, f + b if fb is None else fb),
        c.param_chunks,
        c.peak_activations,
        formula[name],
    )


def pipeline_memory_bytes(
    schedule: Schedule, stage_param_bytes: float, microbatch_activation_bytes: float
) -> float:
    """Per-device bytes: parameter copies x a stage's params + held activations."""
    return (
        schedule.param_copies * stage_param_bytes
        + schedule.activation_microbatches * microbatch_activation_bytes
    )
