"""Hugging Face directory <-> our Orbax training checkpoint (``experiments.convert``).

A run directory written by ``hf_to_run`` is what ``experiments.train --out RUN`` resumes
from: ``RUN/checkpoints/0`` holds a ``TrainState`` (step 0, the imported parameters and
routing biases, fresh AdamW moments in the ZeRO-1 layout) and the meta the trainer checks
(``checkpoint.run_meta``; its ``model_config`` must match). ``run_to_hf`` exports any
step of a run.
"""

from __future__ import annotations

import contextlib
import os

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.interop.pretrained import from_pretrained, save_pretrained
from deepseek_jax.mesh import make_mesh
from deepseek_jax.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    latest_meta,
    model_config_from_dict,
    run_meta,
)
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.state import TrainState, abstract_state, plan


def hf_to_run(
    hf_dir: str,
    run_dir: str,
    *,
    mesh: jax.sharding.Mesh | None = None,
    tcfg: TrainConfig | None = None,
) -> int:
    """Writes step 0 of a training run from a HF checkpoint; returns the parameter count.

    Refuses a run directory that already holds checkpoints.
    """
    mesh = mesh or make_mesh()
    tcfg = tcfg or TrainConfig()
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if latest_meta(ckpt_dir) is not None:
        raise CheckpointError(f"{ckpt_dir} already holds checkpoints; choose a new run directory")
    model = from_pretrained(hf_dir, mesh=mesh)
    cfg = model.cfg
    _, _, layout, tx = plan(cfg, tcfg, mesh)
    _, params, rest = nnx.split(model, nnx.Param, ...)

    def fresh(params, rest):
        opt_state = tx.init(jax.reshard(params, layout.params_zero))
        return TrainState(jnp.zeros((), jnp.int32), params, rest, opt_state)

    with jax.set_mesh(mesh):
        state = jax.jit(
            fresh, in_shardings=(layout.state.params, layout.state.rest), out_shardings=layout.state
        )(params, rest)
    meta = run_meta(cfg, tcfg, converted_from=os.path.abspath(hf_dir))
    ckpt = Checkpointer(ckpt_dir, keep=tcfg.keep)
    ckpt.save(0, state, meta)
    ckpt.close()
    return sum(x.size for x in jax.tree.leaves(params))


def load_run(run_dir: str, *, step: int | None = None, mesh: jax.sharding.Mesh | None = None):
    """(``Transformer`` of step ``step`` (default: the latest) of a run, that step).

    On ``mesh`` the state is restored with the training layout; without one, as plain
    arrays on the default device.
    """
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{ckpt.directory}: no checkpoint")
        meta = latest_meta(ckpt.directory, step=step)
        cfg = model_config_from_dict(meta["model_config"])
        graphdef, abs_state, layout, _ = plan(cfg, TrainConfig(), mesh or make_mesh())
        if mesh is None:
            one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            layout = layout.replace(state=jax.tree.map(lambda _: one, layout.state))
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            state = ckpt.restore(step, abstract_state(abs_state, layout))
    finally:
        ckpt.close()
    return nnx.merge(graphdef, state.params, state.rest), step


def run_to_hf(
    run_dir: str,
    hf_dir: str,
    *,
    step: int | None = None,
    dtype: str = "float32",
    mesh: jax.sharding.Mesh | None = None,
) -> int:
    """Exports step ``step`` (default: the latest) of a run as a HF directory; returns it."""
    model, step = load_run(run_dir, step=step, mesh=mesh or make_mesh())
    save_pretrained(model, hf_dir, dtype=dtype)
    return step
