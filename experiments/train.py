"""Train a DeepSeek-V3-style model: ``python -m experiments.train`` (``make train``).

With no arguments it trains the ``small`` preset on CPU on the standard-library sources of
the running Python (a real corpus every machine has), prints the first and last training
loss, the held-out loss and the corpus's unigram-entropy baseline, and writes a sample
generated through the MLA latent-cache decode path. Re-running with the same ``--out``
resumes from the latest checkpoint; SIGINT/SIGTERM finish the step, save and exit.

Multi-host: launch one process per host (SLURM is detected; or pass --coordinator,
--num-processes, --process-id); the mesh's ``node`` axis is the process.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from deepseek_jax.presets import PRESETS
    from deepseek_jax.train.config import LAYER_LOOPS, PIPELINES, REMATS, TrainConfig

    d = TrainConfig()
    ap = argparse.ArgumentParser(
        prog="python -m experiments.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="model config overrides (Hugging Face field names), e.g. n_group=2",
    )
    ap.add_argument(
        "--preset",
        default=None,
        choices=sorted(PRESETS),
        help="model size (default: the model of the run in --out when resuming, "
        "e.g. one made by experiments.convert; else small, ~10 M parameters)",
    )
    ap.add_argument("--steps", type=int, default=d.steps, help="optimizer steps in total")
    ap.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help="global batch in sequences (divisible by node x gpu)",
    )
    ap.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sequence")
    ap.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW)")
    ap.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warm-up")
    ap.add_argument(
        "--mesh",
        default=None,
        help="device mesh as [stage=S,]node=N,gpu=G (default: one node per process)",
    )
    ap.add_argument(
        "--out",
        default="runs/default",
        help="output directory: checkpoints, metrics, plot (resumes if present)",
    )
    ap.add_argument(
        "--data",
        default=None,
        help="text file, folder, or JSON lines with a 'text' field "
        "(default: this Python's standard library sources)",
    )
    ap.add_argument("--seed", type=int, default=d.seed, help="init and data seed")
    ap.add_argument(
        "--eval-every", type=int, default=d.eval_every, help="steps between held-out evaluations"
    )
    ap.add_argument(
        "--ckpt-every",
        type=int,
        default=d.ckpt_every,
        help="steps between checkpoints (one is always written at the end)",
    )
    ap.add_argument("--keep", type=int, default=d.keep, help="checkpoints to keep")
    ap.add_argument(
        "--remat", default=d.remat, choices=REMATS, help="rematerialisation policy of each block"
    )
    ap.add_argument(
        "--layer-loop",
        default=d.layer_loop,
        choices=LAYER_LOOPS,
        help="run the layer stacks in a scan (compile time flat in depth) or unrolled "
        "(faster on CPU); auto: unrolled on CPU",
    )
    ap.add_argument(
        "--pipeline",
        default=d.pipeline,
        choices=PIPELINES,
        help="pipeline schedule over the mesh's stage axis (needs --mesh stage=N,...)",
    )
    ap.add_argument(
        "--microbatches",
        type=int,
        default=d.microbatches,
        help="pipelined micro-batches per step, each from every device's local batch",
    )
    ap.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "bfloat16"),
        help="compute dtype (default: bfloat16 on GPU, float32 on CPU)",
    )
    ap.add_argument(
        "--sample-tokens", type=int, default=64, help="tokens generated at the end (0: none)"
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even if the architecture, data or schedule differ from the checkpoint's "
        "(listed as warnings); by default that is refused",
    )
    ap.add_argument("--coordinator", default=None, help="multi-host: coordinator host:port")
    ap.add_argument("--num-processes", type=int, default=None, help="multi-host: processes")
    ap.add_argument("--process-id", type=int, default=None, help="multi-host: this process")
    ap.add_argument(
        "--cpu-devices",
        type=int,
        default=None,
        help="simulate this many CPU devices per process (testing)",
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None, on_record=None) -> int:
    """on_record: called with each train / eval metrics record (a notebook's live plot)."""
    args = parse_args(argv)
    from deepseek_jax.train.runner import exit_code, run
    from experiments.machine_info import log_backend_choices

    log_backend_choices()  # one line per backend choice, with its reason

    return exit_code(lambda: run(args, on_record))


if __name__ == "__main__":
    from experiments.runtime import start

    start(trains=True)
    sys.exit(main())
