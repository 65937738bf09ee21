"""Convert between a Hugging Face DeepseekV3/V2 directory and our Orbax training run.

    python -m experiments.convert hf-to-run HF_DIR RUN_DIR
    python -m experiments.train --out RUN_DIR --steps 100      # fine-tune (resumes step 0)
    python -m experiments.convert run-to-hf RUN_DIR OUT_HF_DIR [--step N] [--dtype bfloat16]

``hf-to-run`` streams the safetensors (official FP8 weights are dequantised) straight onto
the mesh and writes step 0 of a run: parameters, routing biases, fresh optimizer state,
and the model config that ``experiments.train`` resumes with. ``run-to-hf`` writes any
step back as safetensors that transformers loads.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m experiments.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("hf-to-run", help="HF directory -> Orbax training run (step 0)")
    a.add_argument("hf_dir")
    a.add_argument("run_dir")
    b = sub.add_parser("run-to-hf", help="Orbax training run -> HF directory")
    b.add_argument("run_dir")
    b.add_argument("hf_dir")
    b.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    b.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="storage dtype of the exported weights",
    )
    for p in (a, b):
        p.add_argument(
            "--mesh", default=None, help="device mesh as node=N,gpu=G (default: all local devices)"
        )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from deepseek_jax.interop.train_checkpoint import hf_to_run, run_to_hf
    from deepseek_jax.mesh import make_mesh, parse_mesh_spec
    from deepseek_jax.train.runner import exit_code

    def convert():
        mesh = make_mesh(**parse_mesh_spec(args.mesh))
        if args.direction == "hf-to-run":
            n = hf_to_run(args.hf_dir, args.run_dir, mesh=mesh)
            print(f"{args.hf_dir} -> {args.run_dir}/checkpoints/0 ({n / 1e6:.2f} M parameters)")
            print(f"fine-tune: python -m experiments.train --out {args.run_dir}")
        else:
            step = run_to_hf(args.run_dir, args.hf_dir, step=args.step, dtype=args.dtype, mesh=mesh)
            print(f"{args.run_dir} step {step} -> {args.hf_dir}")

    return exit_code(convert, ValueError, FileNotFoundError)


if __name__ == "__main__":
    sys.exit(main())
