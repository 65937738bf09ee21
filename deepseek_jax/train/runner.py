"""The training orchestrator behind ``python -m experiments.train``.

Impure by design and thin: parse, build the mesh, data and sharded state (or restore it),
then loop: next batch, the jitted ``train_step``, metrics one step late, progress bar,
periodic evaluation and checkpoints. All math lives in ``step.py`` and the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time
from typing import Any

import jax


class UserError(Exception):
    """A bad input: reported as one line and a non-zero exit."""


def exit_code(fn, *errors: type[Exception]) -> int:
    """Runs ``fn()`` for a command-line entry point: 0, or 2 after printing a ``UserError``
    (or one of ``errors``) as one line on stderr. ``DEEPSEEK_JAX_DEBUG=1`` re-raises it."""
    try:
        fn()
    except (UserError, *errors) as e:
        print(f"error: {e}", file=sys.stderr)
        if os.environ.get("DEEPSEEK_JAX_DEBUG"):
            raise
        return 2
    return 0


def _setup_runtime(args: argparse.Namespace) -> None:
    """Multi-host initialisation must precede any other JAX call."""
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    if args.coordinator or (args.num_processes or 0) > 1:
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()


@dataclasses.dataclass
class Setup:
    cfg: Any
    tcfg: Any
    mesh: Any
    corpus: Any


def _build(args: argparse.Namespace) -> Setup:
    import deepseek_jax.backends as backends
    from deepseek_jax.mesh import make_mesh, parse_mesh_spec
    from deepseek_jax.presets import get_preset
    from deepseek_jax.train.config import TrainConfig
    from deepseek_jax.train.data import DataConfig, load_corpus

    try:
        dtype = args.dtype or backends.default_dtype()
        overrides = list(args.overrides) + ([f"dtype={dtype}"] if dtype else [])
        resumed = _resumed_model(args)
        if resumed is not None:  # a converted or earlier run: its model, unless --preset says
            cfg = resumed.with_overrides(overrides) if overrides else resumed
        else:
            cfg = get_preset(args.preset or "small", overrides)
        tcfg = TrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            lr=args.lr,
            warmup_steps=args.warmup_steps,
            seed=args.seed,
            eval_every=args.eval_every,
            ckpt_every=args.ckpt_every,
            keep=args.keep,
            remat=args.remat,
            layer_loop=args.layer_loop,
            pipeline=getattr(args, "pipeline", "none"),
            microbatches=getattr(args, "microbatches", 1),
        )
        mesh = make_mesh(**parse_mesh_spec(args.mesh))
        from deepseek_jax.pipeline.placement import pipeline_for

        pipeline_for(cfg, tcfg, mesh)  # a bad schedule / mesh / batch fails here, in one line
    except ValueError as e:
        raise UserError(str(e)) from None
    from deepseek_jax.sharding import data_parallel_size

    dp = data_parallel_size(mesh)
    if tcfg.batch_size % dp:
        raise UserError(
            f"--batch-size {tcfg.batch_size} is not divisible by the data-parallel "
            f"size {dp} (mesh {dict(mesh.shape)})"
        )
    if tcfg.seq_len > cfg.max_position_embeddings:
        raise UserError(
            f"--seq-len {tcfg.seq_len} exceeds max_position_embeddings "
            f"{cfg.max_position_embeddings} of "
            + (
                f"preset {args.preset or 'small'!r}"
                if resumed is None
                else f"the model in {args.out}"
            )
        )
    try:
        corpus = load_corpus(
            DataConfig(path=args.data, vocab_size=cfg.vocab_size, byte_level=cfg.vocab_size <= 256)
        )
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    return Setup(cfg, tcfg, mesh, corpus)


def _resumed_model(args: argparse.Namespace):
    """The model config of the run being resumed, when no ``--preset`` is given."""
    from deepseek_jax.train.checkpoint import (
        CheckpointError,
        latest_meta,
        model_config_from_dict,
    )

    if args.preset is not None:
        return None
    try:
        meta = latest_meta(os.path.join(args.out, "checkpoints"))
        return None if meta is None else model_config_from_dict(meta["model_config"])
    except (CheckpointError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"cannot read the model config of {args.out}: {e}") from None


class _Stop:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, saves and exits."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def run(args: argparse.Namespace, on_record=None) -> dict[str, Any]:
    """Trains; the loop's domain errors (a corpus that does not fit the model, an
    incompatible or corrupt checkpoint, a diverged loss) become one-line ``UserError``s.
    on_record: called with each train / eval metrics record (e.g. a notebook's live plot)."""
    _setup_runtime(args)
    from deepseek_jax.train.checkpoint import CheckpointError
    from deepseek_jax.train.loop import Trainer, TrainingDiverged

    setup = _build(args)
    try:
        trainer = Trainer(
            setup.cfg,
            setup.tcfg,
            setup.mesh,
            setup.corpus,
            out_dir=args.out,
            progress=not args.no_progress,
            on_record=on_record,
            allow_config_change=args.allow_config_change,
        )
    except ValueError as e:  # CheckpointError included
        raise UserError(str(e)) from None
    t0 = time.time()
    with _Stop() as stop:
        try:
            summary = trainer.fit(stop)
        except (CheckpointError, TrainingDiverged) as e:
            raise UserError(str(e)) from None
    summary["wall_s"] = time.time() - t0
    trainer.report(summary, sample_tokens=args.sample_tokens)
    return summary
