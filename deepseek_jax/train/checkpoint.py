"""Orbax checkpoints of the train state: async, keep-N, atomic, restorable onto any mesh.

Orbax writes each step into a temporary directory and renames it only once every shard is
on disk, so an interrupted or failed save never touches the previous checkpoint. A
checkpoint also stores its model config, the fields of its training config that fix the
math of each step and the identity of its data; resuming with another architecture, or
(once trained) other data or schedule, is refused with the field that differs
(``resume_differences``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import orbax.checkpoint as ocp

from deepseek_jax.train.state import TrainState


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be resumed from (corrupt or incompatible)."""


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, *, keep: int = 2, async_save: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=opts)
        except Exception as e:  # unreadable metadata, a file where the directory should be
            raise CheckpointError(f"cannot open checkpoint directory {self.directory}: {e}") from e

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, meta: dict[str, Any]) -> None:
        """Starts an async save of ``state`` (returns before the write ends)."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def restore(
        self, step: int, target: TrainState, check: Callable[[dict[str, Any]], None] | None = None
    ) -> TrainState:
        """Restores step ``step`` onto the shardings of ``target`` (any mesh).

        ``check`` is called with the checkpoint's meta first and raises to refuse it.
        """
        where = os.path.join(self.directory, str(step))
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
                "meta"
            ]
        except Exception as e:
            raise CheckpointError(f"corrupt checkpoint at {where}: {_first_line(e)}") from e
        if check is not None:
            check(meta)
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
            )["state"]
        except Exception as e:
            raise CheckpointError(
                f"corrupt or incompatible checkpoint at {where}: {_first_line(e)}"
            ) from e
        return restored

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


# TrainConfig fields that fix the batches and the math of each step (the LR schedule, the
# optimizer, the loss); the rest (eval, checkpoint cadence, remat, layer loop) may change.
SCHEDULE_FIELDS = (
    "seed",
    "batch_size",
    "seq_len",
    "steps",
    "lr",
    "warmup_steps",
    "min_lr_ratio",
    "weight_decay",
    "b1",
    "b2",
    "eps",
    "clip_norm",
    "mtp_weight",
    "balance_alpha",
    "bias_gamma",
)
# Architecture fields a resumed model may change: they act only at initialisation.
_INIT_ONLY = ("initializer_range",)


def resume_differences(saved: dict[str, Any], now: dict[str, Any], step: int) -> list[str]:
    """What resuming a checkpoint (meta ``saved``, step ``step``) as this run (``now``) changes.

    The architecture (``model_config`` less ``config.RUN_OPTION_FIELDS``: dtype, backends,
    FP8 and expert-parallel options may change) must match: the weights mean nothing in
    another model. Once a run has trained (``step`` > 0), the data and schedule
    (``SCHEDULE_FIELDS``, the corpus) must match exactly too, or the resumed run would see
    other batches or another learning rate than an uninterrupted one; a step-0 checkpoint
    (a conversion) starts any schedule. Fields missing on one side (older checkpoints) are
    not compared.

    Returns:
      One ``field: saved X, now Y`` entry per difference, in a stable order.
    """
    from deepseek_jax.config import RUN_OPTION_FIELDS

    skip = set(RUN_OPTION_FIELDS) | set(_INIT_ONLY)
    pairs = [
        (f"model_config.{k}", saved.get("model_config", {}), now["model_config"], k)
        for k in sorted(now["model_config"])
        if k not in skip
    ]
    if step > 0:
        pairs += [
            (f"train.{k}", saved.get("train", {}), now.get("train", {}), k) for k in SCHEDULE_FIELDS
        ]
        pairs.append(("data", saved, now, "data"))
    return [
        f"{name}: saved {a[k]!r}, now {b[k]!r}"
        for name, a, b, k in pairs
        if k in a and k in b and a[k] != b[k]
    ]


def check_resumable(saved: dict[str, Any], now: dict[str, Any], step: int, where: str) -> None:
    """Raises a one-line ``CheckpointError`` naming the first field ``resume_differences``
    finds."""
    diffs = resume_differences(saved, now, step)
    if diffs:
        more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
        raise CheckpointError(
            f"incompatible checkpoint at {where}: {diffs[0]}{more}; use the same settings, "
            f"another --out directory, or --allow-config-change"
        )


def latest_meta(directory: str | os.PathLike, step: int | None = None) -> dict[str, Any] | None:
    """The meta of checkpoint ``step`` (default: the latest) in ``directory``; None if none."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return None
    ckpt = Checkpointer(directory, async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            return None
        return ckpt.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]
    except Exception as e:
        raise CheckpointError(f"corrupt checkpoint meta in {directory}: {_first_line(e)}") from e
    finally:
        ckpt.close()


def run_meta(cfg: Any, tcfg: Any, **extra: Any) -> dict[str, Any]:
    """The meta every checkpoint of a run stores, written by training and by conversion.

    Args:
      cfg: the ``ModelConfig``; stored as ``model_config`` (``config_dict``).
      tcfg: the ``TrainConfig``; its ``SCHEDULE_FIELDS`` are stored as ``train``.
      extra: further JSON-able entries (``data``: the corpus's identity,
        ``converted_from``...).
    Returns:
      A JSON-able dict for ``Checkpointer.save``; ``resume_differences`` compares two.
    """
    return {
        "model_config": config_dict(cfg),
        "train": json_safe({k: getattr(tcfg, k) for k in SCHEDULE_FIELDS}),
        **extra,
    }


def model_config_from_dict(d: dict[str, Any]):
    """The ``ModelConfig`` of a checkpoint's ``model_config`` (``config_dict`` inverted)."""
    from deepseek_jax.config import ModelConfig

    return ModelConfig.from_dict(d)


def config_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-able dict of a (nested) frozen config dataclass."""
    return json_safe(dataclasses.asdict(cfg))


def json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x
