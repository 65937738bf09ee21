"""Compile a real program for a GPU cluster on this CPU machine and read XLA's schedule.

    make gpu-compile ARGS="--target h100 --mesh node=2,gpu=8 --preset bench-small \\
        --program train --batch 32 --seq-len 512 overlap=dual"

Needs the CUDA plugin wheels (``make gpu-compile`` builds ``.venv-gpu``). Prints every
collective (kind, mesh axes, bytes, async with compute between start and done, or sync),
the compute ops in each window, ``memory_analysis()`` per device, the compile time, the
cost model, a table per loop body, and a last JSON line (``custom_calls``: the kernels in
the program, by custom-call target) (``--json``: only that line). What it proves is XLA's
intended schedule, not measured runtime (README, "Deviceless GPU compile").
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the plugin must not try to open a GPU

import argparse
import collections
import json
import re
import sys

_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--target", default="h100", help="h100 | h200")
    p.add_argument("--mesh", default="node=2,gpu=8", help="stage=S,node=N,gpu=G")
    p.add_argument("--preset", default="bench-small")
    p.add_argument("--program", default="train", help="train | prefill | decode")
    p.add_argument("--batch", type=int, default=32, help="global batch (sequences)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--remat", default="none", help="none | full | dots (train)")
    p.add_argument("--pipeline", default="none", help="schedule over the stage axis (train)")
    p.add_argument("--microbatches", type=int, default=1, help="pipelined micro-batches per step")
    p.add_argument(
        "--no-pairing", action="store_true", help="pipeline F&B ticks through switches (control)"
    )
    p.add_argument("--no-lhs", action="store_true", help="latency-hiding scheduler off (control)")
    p.add_argument(
        "--latency-profile",
        action="store_true",
        help="compile twice: the scheduler reads the cost model's figures of the first\n"
        "schedule as a PGLE profile (codesign/latency_profile.py)",
    )
    p.add_argument(
        "--xla", action="append", default=[], help="extra XLA:GPU option key=value (repeatable)"
    )
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    p.add_argument("--hlo-out", help="also write the scheduled HLO text to this file")
    p.add_argument("--window-ops", type=int, default=4, help="compute ops listed per window")
    p.add_argument("overrides", nargs="*", help="model config key=value")
    return p.parse_intermixed_args(argv)


def _mesh(text: str) -> dict[str, int]:
    out = {}
    for part in text.split(","):
        key, _, val = part.partition("=")
        if key.strip() not in ("stage", "node", "gpu") or not val.strip().isdigit():
            raise ValueError(f"--mesh {text!r}: expected stage=S,node=N,gpu=G")
        out[key.strip()] = int(val)
    return out


def _option(text: str) -> tuple[str, object]:
    key, sep, val = text.partition("=")
    if not sep:
        raise ValueError(f"--xla {text!r}: expected key=value")
    low = val.lower()
    if low in ("true", "false"):
        return key.strip().lstrip("-"), low == "true"
    return key.strip().lstrip("-"), int(val) if val.lstrip("-").isdigit() else val


def _table(sched, n_ops: int) -> list[str]:
    rows = [
        f"{'kind':<18} {'axes':<10} {'MB':>8} {'trips':>5} {'phase':<8} {'schedule':<9} "
        f"{'xfer us':>8} {'comp us':>8} {'hidden':>6}  window ops / op"
    ]
    for c in sched.collectives:
        how = "sync" if not c.is_async else ("async" if c.overlapped else "async-0")
        ops = ", ".join(c.window[:n_ops]) + (
            f" (+{len(c.window) - n_ops})" if len(c.window) > n_ops else ""
        )
        where = c.op_name.split("/", 1)[-1][-60:]
        rows.append(
            f"{c.kind:<18} {','.join(c.axes):<10} {c.nbytes / 1e6:8.3f} {c.trips:5d} "
            f"{c.phase:<8} {how:<9} {c.transfer_s * 1e6:8.1f} {c.compute_s * 1e6:8.1f} "
            f"{c.hidden:6.2f}  {ops or '-'} / {where}"
        )
    return rows


def _coverage(profile_us: dict[str, float] | None, sched) -> float | None:
    """The profile is keyed by instruction name: the share of the final schedule's priced
    kernels it named (None without a profile)."""
    if profile_us is None:
        return None
    from deepseek_jax.codesign.latency_profile import costs_us

    final = costs_us(sched)
    return len(final.keys() & profile_us.keys()) / max(1, len(final))


def run(args: argparse.Namespace) -> dict:
    from deepseek_jax.codesign import gpu_compile as gc
    from deepseek_jax.codesign.overlap_report import body_table, phase_bound, summary
    from deepseek_jax.codesign.schedule import CostModel, Schedule
    from deepseek_jax.presets import get_preset

    shape = _mesh(args.mesh)
    mesh = gc.gpu_mesh(args.target, **shape)
    cfg = gc.gpu_config(get_preset(args.preset), dict(o.split("=", 1) for o in args.overrides))
    options = dict(_option(o) for o in args.xla)
    if args.no_lhs:
        options["xla_gpu_enable_latency_hiding_scheduler"] = False
    out = gc.compile_program(
        args.program,
        cfg,
        mesh,
        args.batch,
        args.seq_len,
        options=options,
        remat=args.remat,
        pipeline=args.pipeline,
        microbatches=args.microbatches,
        pairing=not args.no_pairing,
        latency_profile=args.latency_profile,
    )
    if args.hlo_out:
        with open(args.hlo_out, "w") as f:
            f.write(out.hlo)
    model = CostModel()
    sched = Schedule(out.hlo, dict(mesh.shape), model)
    mem = out.memory
    result = summary(sched) | {
        "temp_bytes_per_device": int(mem.temp_size_in_bytes),
        "argument_bytes_per_device": int(mem.argument_size_in_bytes),
        "output_bytes_per_device": int(mem.output_size_in_bytes),
        "alias_bytes_per_device": int(mem.alias_size_in_bytes),
        "compile_s": round(out.compile_s, 1),
        "latency_profile_coverage": _coverage(out.profile_us, sched),
        # kernels in the program (our Pallas ones: Triton and Mosaic GPU calls)
        "custom_calls": dict(collections.Counter(_CUSTOM_CALL.findall(out.hlo))),
    }
    if args.program == "train" and cfg.num_moe_layers and shape.get("stage", 1) == 1:
        # what pairing the halves with GEMMs could hide at best (overlap_report.phase_bound)
        nodes, gpus = shape.get("node", 1), shape.get("gpu", 8)
        tokens = args.batch * args.seq_len // (nodes * gpus)
        b = phase_bound(cfg, tokens, args.seq_len, nodes, gpus, model)
        result |= {"gemm_bound_forward": b.forward, "gemm_bound_backward": b.backward}
        result["gemm_ceiling_forward"] = b.ceiling  # any pairing: all GEMMs / all transfers
    if not args.json:
        print(
            f"{args.program} of {args.preset} {' '.join(args.overrides)} on {args.target} "
            f"mesh {dict(mesh.shape)}, batch {args.batch} x {args.seq_len}"
        )
        print("\n".join(_table(sched, args.window_ops)))
        print("per loop body (one trip; us under the cost model):")
        for row in body_table(sched):
            print(f"  {json.dumps(row)}")
        print(f"memory per device: {mem}")
        print(f"compile: {out.compile_s:.1f} s")
        print(model.describe())
    print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> int:
    from deepseek_jax.train.runner import exit_code

    args = parse_args(argv)
    return exit_code(lambda: run(args), ValueError, RuntimeError)


if __name__ == "__main__":
    sys.exit(main())
