"""Our CPU path against XLA alone and against PyTorch, on this CPU and as an AVX2 machine.

    python -m experiments.bench_cpu [--rounds 1] [--torch /tmp/hfvenv/bin/python]

A kernel tuned on one CPU ran 10-30x slower than XLA on another, so every claim is made
per machine class, in one run, with the configurations interleaved:

- ``native``: kernels built for this CPU (``-march=native``), XLA unrestricted;
- ``avx2``: the AVX2 build of our kernels (``DEEPSEEK_JAX_KERNEL_VARIANT=avx2``,
  ``-march=x86-64-v3``), XLA limited to AVX2 (``--xla_cpu_max_isa=AVX2``) and, for
  PyTorch, ``ATEN_CPU_CAPABILITY=avx2`` with ``MKL_ENABLE_INSTRUCTIONS=AVX2``: what an
  AVX2 machine (AMD Zen 2/3, older Intel) runs, emulated on an AVX-512 one. The clock,
  caches and core count stay this machine's, so the ratios carry over, not the figures.

For each class: ``bench_train`` and ``bench_generate`` with the defaults (``auto``
backends: our kernels wherever they were measured faster) and XLA only
(``moe_backend=einsum attention_backend=xla``), and ``bench_torch`` when ``--torch`` names
the torch virtualenv's Python. Each run is a fresh process (its own compile and its own
``auto`` decisions). Prints a table; last line JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CLASSES = {
    "native": {},
    "avx2": {
        "DEEPSEEK_JAX_KERNEL_VARIANT": "avx2",
        "XLA_FLAGS": "--xla_cpu_max_isa=AVX2",
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    },
}
PATHS = {"default": [], "xla_only": ["moe_backend=einsum", "attention_backend=xla"]}


def run_json(cmd: list[str], env: dict[str, str]) -> dict:
    """Runs a benchmark script and returns its last stdout line, parsed."""
    proc = subprocess.run(
        cmd, env={**os.environ, **env}, capture_output=True, text=True, check=False
    )
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(cls: str, path: str, steps: int) -> dict:
    env = CLASSES[cls]
    py = [sys.executable, "-m"]
    train = run_json([*py, "experiments.bench_train", "--steps", str(steps), *PATHS[path]], env)
    gen = run_json([*py, "experiments.bench_generate", "--repeats", "3", *PATHS[path]], env)
    return {
        "train_tokens_per_s": train["tokens_per_s"],
        "prefill_tokens_per_s": gen["prefill_tokens_per_s"],
        "decode_tokens_per_s": gen["decode_tokens_per_s"],
        "backends": {**train["machine"]["backends"], **gen["machine"]["backends"]},
        "kernel_tiles": train["machine"]["kernel_tiles"],
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds (median)")
    ap.add_argument("--steps", type=int, default=8, help="timed train steps per run")
    ap.add_argument("--torch", default=None, help="Python of the torch virtualenv")
    ap.add_argument("--classes", default="native,avx2")
    args = ap.parse_args(argv)
    classes = args.classes.split(",")
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for cls in classes:
            for path in PATHS:
                runs.setdefault((cls, path), []).append(measure(cls, path, args.steps))
            if args.torch:
                cmd = [args.torch, "-m", "experiments.bench_torch"]
                env = {**CLASSES[cls], "PYTHONPATH": os.getcwd()}
                runs.setdefault((cls, "pytorch"), []).append(run_json(cmd, env))
    keys = ("train_tokens_per_s", "prefill_tokens_per_s", "decode_tokens_per_s")
    table = {
        f"{cls}/{path}": {k: statistics.median(r[k] for r in rs) for k in keys}
        for (cls, path), rs in runs.items()
    }
    print(f"{'class/path':<20} {'train tok/s':>12} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for name, row in table.items():
        cells = (f"{row[k]:>{w},.0f}" for k, w in zip(keys, (12, 14, 13), strict=True))
        print(f"{name:<20} " + " ".join(cells))
    for (cls, path), rs in runs.items():
        if path == "default":
            print(
                f"{cls} default ran: {rs[-1]['kernel_tiles']} tiles; "
                + "; ".join(f"{op} -> {why}" for op, why in rs[-1]["backends"].items())
            )

    every = {f"{c}/{p}": {k: [r[k] for r in rs] for k in keys} for (c, p), rs in runs.items()}
    if args.rounds > 1:
        for name, row in every.items():
            print(f"{name:<20} every round: " + "; ".join(f"{k} {v}" for k, v in row.items()))
    from deepseek_jax import host

    out = {"machine": host.machine(), "table": table, "runs": every}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
