"""Training throughput and model FLOP utilisation on this machine.

    python -m experiments.bench_train [--preset bench-small] [--batch-size 4] [--seq-len 512]

tokens/s of the jitted train step (float32, random tokens), model FLOPs per token by
REFERENCE.md's formula (6 x activated matmul parameters incl. head, input embedding
excluded, + causal attention; the MTP module and routing are extra work not counted), and
MFU against the float32 matmul throughput measured in the same run; also the MTP
modules' FLOPs and the utilisation counting them. Last line: JSON.

What bounds MFU on the 2-core CPU (bench-small, measured): the MTP module's FLOPs are
outside the formula but inside the step, 34 of every 156 MFLOP per token, so MFU cannot
exceed 122.5 / 156.4 = 78 % even if every FLOP ran at the measured peak and nothing else
took time (printed as "MFU ceiling"). Beyond that: AdamW with clipping over 52 M
parameters (~63 ms a step, memory-bound), the output heads' [2048, 4096] logits (the
forward GEMM runs at ~300 GFLOP/s, bound by writing them), routing and permutation, and
elementwise work. In a step of ~1.15 s the GEMMs run at 300-480 GFLOP/s; our attention
kernel takes ~18 ms per block forward and backward (~280 GFLOP/s).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.codesign.flops import mtp_training_flops_per_token, training_flops_per_token
from deepseek_jax.codesign.params import abstract_report
from deepseek_jax.mesh import make_mesh
from deepseek_jax.presets import PRESETS, get_preset
from deepseek_jax.train.config import LAYER_LOOPS, REMATS, TrainConfig
from deepseek_jax.train.state import init_state
from deepseek_jax.train.step import jit_train_step
from experiments.machine_info import describe, log_backend_choices, print_description


def matmul_peak_flops(n: int = 2048, repeats: int = 15) -> float:
    """Measured float32 GEMM rate (FLOP/s) of an n^3 jitted matmul, best of ``repeats``.

    n = 2048 is the fastest size here (4096 runs ~20 % slower), so MFU is against the best
    rate XLA reaches on this machine."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    best = min(_time(lambda: f(a, b).block_until_ready()) for _ in range(repeats))
    return 2 * n**3 / best


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _spread(seconds) -> tuple[float, float, float]:
    return float(np.min(seconds)), float(np.median(seconds)), float(np.max(seconds))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", default="bench-small", choices=sorted(PRESETS))
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=6, help="timed steps (after 2 warm-up)")
    ap.add_argument("--remat", default="none", choices=REMATS)
    ap.add_argument("--layer-loop", default="auto", choices=LAYER_LOOPS)
    ap.add_argument("overrides", nargs="*", help="model config overrides key=value")
    args = ap.parse_args(argv)
    log_backend_choices()

    cfg = get_preset(args.preset, ["dtype=float32", *args.overrides])
    tcfg = TrainConfig(
        steps=1000,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        remat=args.remat,
        layer_loop=args.layer_loop,
    )
    mesh = make_mesh()
    graphdef, state, layout, tx = init_state(cfg, tcfg, mesh)
    step = jit_train_step(graphdef, tx, tcfg, layout, mesh)
    rng = np.random.default_rng(0)
    batches = [
        rng.integers(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1), np.int32)
        for _ in range(args.steps + 2)
    ]
    for ids in batches[:2]:
        state, m = step(state, ids)
    jax.block_until_ready(m)
    peak_before = matmul_peak_flops()  # after the first step: it may restart the process
    t0 = time.perf_counter()
    ends = []  # each step's end: a bimodal step (fast, slow, fast, ...) shows in the spread
    for ids in batches[2:]:
        state, m = step(state, ids)
        jax.block_until_ready(m)
        ends.append(time.perf_counter())
    jax.block_until_ready((state, m))
    dt = (time.perf_counter() - t0) / args.steps
    step_s = np.diff([t0, *ends])
    tokens_per_s = args.batch_size * args.seq_len / dt
    flops_per_token = training_flops_per_token(cfg, seq_len=args.seq_len, causal=True)
    peak = max(peak_before, matmul_peak_flops())  # the machine's best, before and after
    mfu = flops_per_token * tokens_per_s / peak
    mtp_flops = mtp_training_flops_per_token(
        cfg, args.seq_len, abstract_report(cfg).mtp_activated_params
    )
    mfu_with_mtp = (flops_per_token + mtp_flops) * tokens_per_s / peak
    ceiling = flops_per_token / (flops_per_token + mtp_flops)  # every FLOP at peak
    rows = [
        ("step time", f"{dt * 1e3:.0f} ms"),
        ("step time min / median / max", " / ".join(f"{t * 1e3:.0f}" for t in _spread(step_s))),
        ("tokens/s", f"{tokens_per_s:,.0f}"),
        ("model GFLOPs/token", f"{flops_per_token / 1e9:.3f}"),
        ("achieved GFLOP/s", f"{flops_per_token * tokens_per_s / 1e9:.1f}"),
        ("f32 matmul peak GFLOP/s (measured)", f"{peak / 1e9:.1f}"),
        ("MFU", f"{mfu:.1%}"),
        ("MTP GFLOPs/token (not in MFU)", f"{mtp_flops / 1e9:.3f}"),
        ("utilisation incl. MTP", f"{mfu_with_mtp:.1%}"),
        ("MFU ceiling (all FLOPs at peak)", f"{ceiling:.1%}"),
    ]
    print(
        f"{args.preset}, batch {args.batch_size} x {args.seq_len}, float32, "
        f"{jax.device_count()} {jax.default_backend()} device(s)"
    )
    for k, v in rows:
        print(f"  {k:<36} {v:>12}")
    machine = describe()
    print_description(machine)
    out = {
        "preset": args.preset,
        "tokens_per_s": tokens_per_s,
        "step_s": [round(float(t), 4) for t in step_s],
        "model_flops_per_token": flops_per_token,
        "peak_flops": peak,
        "mfu": mfu,
        "mtp_flops_per_token": mtp_flops,
        "mfu_with_mtp": mfu_with_mtp,
        "mfu_ceiling": ceiling,
        "overrides": args.overrides,
        "machine": machine,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    from experiments.runtime import start

    start(trains=True)
    main()
