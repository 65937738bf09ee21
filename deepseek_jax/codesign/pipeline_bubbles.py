"""Pipeline bubbles and per-device memory: 1F1B, ZB1P, DualPipe (V3TR section 3.2.1, Table 2).

Times are per chunk: F forward, B full backward (input + weights), W backward for weights
only, F&B a forward and a backward chunk run overlapped (DualPipe's unit). With PP stages:

    1F1B      bubble (PP - 1)(F + B)          params 1x   activations PP
    ZB1P      bubble (PP - 1)(F + B - 2W)     params 1x   activations PP
    DualPipe  bubble (PP/2 - 1)(F&B + B - 3W) params 2x   activations PP + 1

"activations" counts the micro-batches' activations the first stage holds at peak.
Counted: the schedules' idle time and what each device holds. Ignored: communication,
optimizer state (scales like params), non-uniform stages, the embedding / head stages.
"""

from __future__ import annotations

import dataclasses

SCHEDULES = ("1F1B", "ZB1P", "DualPipe")


@dataclasses.dataclass(frozen=True)
class Schedule:
    name: str
    bubble: float  # idle time per device per step, in the units of F, B, W
    param_copies: int  # model parameters held per device, in units of one stage's
    activation_microbatches: int  # micro-batch activations held at peak
    formula: str


def pipeline_schedule(
    name: str, pp: int, f: float, b: float, w: float, fb: float | None = None
) -> Schedule:
    """One row of V3TR Table 2.

    Args:
      pp: pipeline stages (DualPipe needs it even).
      f, b, w: forward, full-backward and weight-backward chunk times.
      fb: overlapped forward-and-backward time; None means no overlap gain (f + b).
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {SCHEDULES}")
    if name == "1F1B":
        return Schedule(name, (pp - 1) * (f + b), 1, pp, "(PP-1)(F+B)")
    if name == "ZB1P":
        return Schedule(name, (pp - 1) * (f + b - 2 * w), 1, pp, "(PP-1)(F+B-2W)")
    if pp % 2:
        raise ValueError(f"DualPipe needs an even number of stages, got PP={pp}")
    fb = f + b if fb is None else fb
    return Schedule(name, (pp / 2 - 1) * (fb + b - 3 * w), 2, pp + 1, "(PP/2-1)(F&B+B-3W)")


def pipeline_memory_bytes(
    schedule: Schedule, stage_param_bytes: float, microbatch_activation_bytes: float
) -> float:
    """Per-device bytes: parameter copies x a stage's params + held activations."""
    return (
        schedule.param_copies * stage_param_bytes
        + schedule.activation_microbatches * microbatch_activation_bytes
    )
