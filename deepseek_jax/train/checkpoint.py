"""Orbax checkpoints of the train state: async, keep-N, atomic, restorable onto any mesh.

Orbax writes each step into a temporary directory and renames it only once every shard is
on disk, so an interrupted or failed save never touches the previous checkpoint. A
checkpoint also stores its model and training configs; resuming with a different model
config is refused with the field that differs.
"""

from __future__ import annotations

import dataclasses
import os
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

    def restore(self, step: int, target: TrainState, expect: dict[str, Any]) -> TrainState:
        """Restores step ``step`` onto the shardings of ``target`` (any mesh).

        ``expect`` holds the meta entries that must match (the model config).
        """
        where = os.path.join(self.directory, str(step))
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
                "meta"
            ]
        except Exception as e:
            raise CheckpointError(f"corrupt checkpoint at {where}: {_first_line(e)}") from e
        for key, want in expect.items():
            _check_same(key, meta.get(key), want, where)
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


def _check_same(key: str, saved: Any, want: Any, where: str) -> None:
    if saved == want:
        return
    if isinstance(saved, dict) and isinstance(want, dict):
        diff = sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))
        detail = ", ".join(f"{k}: saved {saved.get(k)!r}, now {want.get(k)!r}" for k in diff[:3])
    else:
        detail = f"saved {saved!r}, now {want!r}"
    raise CheckpointError(
        f"incompatible checkpoint at {where}: {key} differs ({detail}); "
        f"use another --out directory or the same settings"
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
      cfg: the ``ModelConfig``; stored as ``model_config`` (``config_dict``), the entry
        ``Checkpointer.restore`` requires to match.
      tcfg: the ``TrainConfig``; its ``seed``, ``batch_size`` and ``seq_len`` fix the
        batches of each step (informational: not checked on restore).
      extra: further JSON-able entries (``converted_from``...).
    Returns:
      A JSON-able dict for ``Checkpointer.save``.
    """
    return {
        "model_config": config_dict(cfg),
        "seed": tcfg.seed,
        "batch_size": tcfg.batch_size,
        "seq_len": tcfg.seq_len,
        **extra,
    }


def model_config_from_dict(d: dict[str, Any]):
    """The ``ModelConfig`` of a checkpoint's ``model_config`` (``config_dict`` inverted)."""
    from deepseek_jax.config import ModelConfig, RopeScaling

    d = dict(d)
    if d.get("rope_scaling") is not None:
        d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    return ModelConfig(**d)


def config_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-able dict of a (nested) frozen config dataclass."""
    return json_safe(dataclasses.asdict(cfg))


def json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x
