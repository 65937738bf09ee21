"""Pipeline schedules from their tables: ``python -m experiments.bench_pipeline [--out DIR]``.

For 1F1B, ZB1P, DualPipe and DualPipeV at PP = 4, 8, 16 with 2 PP micro-batches, prints the
bubble (idle time of the most idle stage in units of a whole stage's F, and idle / stage
time over all stages) and the
peak activations a stage holds, all counted from the schedule tables of
``deepseek_jax.pipeline.schedule`` at the chunk costs given (default F = 1, B = 2, W = 1,
F&B = F + B: no overlap gain). Activations are in units of one stage's layers for one
micro-batch (DualPipeV's chunks are half a stage). Draws each schedule as a PNG in --out,
one row per stage, coloured by phase. The last line is one JSON object at PP = 8 with 16
micro-batches.
"""

from __future__ import annotations

import argparse
import json
import os

from deepseek_jax.pipeline.schedule import (
    DISPLAY,
    SCHEDULES,
    Costs,
    counts,
    make_schedule,
    timeline,
)

COLOURS = {"F": "#4c72b0", "B": "#55a868", "W": "#c44e52", "BW": "#8172b2", "FB": "#dd8452"}


def _kind(slot) -> str:
    phases = "".join(sorted({op.phase for op in slot}))
    return {"F": "F", "B": "B", "W": "W", "BW": "BW"}.get(phases, "FB")


def draw(sched, costs: Costs, path: str) -> None:
    """One row per stage; each slot a box coloured by phase and labelled by micro-batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    times = timeline(sched, costs)
    span = max(e for row in times for _, e in row)
    fig, ax = plt.subplots(figsize=(min(40, 2 + span * 0.18), 0.45 * sched.pp + 1.2))
    for s, (order, row) in enumerate(zip(sched.orders, times, strict=True)):
        for slot, (b, e) in zip(order, row, strict=True):
            ax.barh(s, e - b, left=b, color=COLOURS[_kind(slot)], edgecolor="white", height=0.9)
            label = "/".join(str(op.mb) for op in slot if op.phase != "W" or len(slot) == 1)
            ax.text((b + e) / 2, s, label, ha="center", va="center", fontsize=5, color="white")
    ax.set_yticks(range(sched.pp), [f"stage {s}" for s in range(sched.pp)])
    ax.invert_yaxis()
    ax.set_xlabel("time (F = 1)")
    ax.set_title(f"{DISPLAY[sched.name]}: PP={sched.pp}, {sched.microbatches} micro-batches")
    names = {"F": "F", "B": "B (input)", "W": "W (weights)", "BW": "B+W", "FB": "F&B"}
    ax.legend(
        handles=[Patch(color=c, label=names[k]) for k, c in COLOURS.items()],
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=7,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="runs/bench_pipeline", help="folder for the PNGs")
    ap.add_argument("--f", type=float, default=1.0, help="forward chunk time")
    ap.add_argument("--b", type=float, default=2.0, help="full backward chunk time")
    ap.add_argument("--w", type=float, default=1.0, help="weight-gradient chunk time")
    ap.add_argument("--fb", type=float, default=None, help="overlapped F&B time (default F+B)")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    args = ap.parse_args(argv)
    costs = Costs(args.f, args.b, args.w, args.fb)
    if not args.no_plots:
        os.makedirs(args.out, exist_ok=True)
    print(f"costs: {costs}")
    print("| schedule | PP | micro-batches | bubble | bubble fraction | peak activations |")
    print("|---|---:|---:|---:|---:|---:|")
    for pp in (4, 8, 16):
        for name in SCHEDULES:
            sched = make_schedule(name, pp, 2 * pp)
            c = counts(sched, costs)
            per_stage = 2 if name == "dualpipev" else 1  # DualPipeV's chunks: half a stage
            acts = c.peak_activations / per_stage
            print(
                f"| {DISPLAY[name]} | {pp} | {2 * pp} | {c.bubble / per_stage:.1f} | "
                f"{c.bubble_fraction:.3f} | {acts:g} |"
            )
            if not args.no_plots:
                draw(sched, costs, os.path.join(args.out, f"{name}_pp{pp}.png"))
    if not args.no_plots:
        print(f"figures written to {args.out}")
    out = {
        f"bubble_fraction_{name}": round(
            counts(make_schedule(name, 8, 16), costs).bubble_fraction, 4
        )
        for name in SCHEDULES
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
