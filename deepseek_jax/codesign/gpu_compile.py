"""Deviceless compile of our real programs for a GPU cluster (JAX_NOTES.md, "Checking overlap
without a GPU").

With the CUDA plugin wheels installed and ``JAX_PLATFORMS=cpu``, ``topologies`` describes a
cluster of abstract H100/H200 devices from a ``GpuTargetConfigProto`` (``gpu_specs/``, the
hardware facts of one GPU model); programs traced on ShapeDtypeStructs with our shardings
over that mesh compile with XLA:GPU, and ``compiled.as_text()`` is the schedule after the
latency-hiding scheduler. Nothing is materialised and no GPU is needed.

The GPU choices are forced (what ``auto`` picks on a GPU): the layer stacks in a scan, the
MoE experts on capacity slots (``einsum``), the XLA attention core, bfloat16 compute.

Shape letters: B batch, T positions.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
import time
from importlib import resources
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import deepseek_jax.backends as backends
from deepseek_jax.codesign.latency_profile import costs_us, profile_text
from deepseek_jax.codesign.schedule import CostModel, Schedule
from deepseek_jax.config import ModelConfig
from deepseek_jax.mesh import make_mesh
from deepseek_jax.sharding import logical_to_spec, state_shardings
from deepseek_jax.train.config import TrainConfig

TARGETS = {"h100": "h100_sxm.txtpb", "h200": "h200.txtpb"}
PROGRAMS = ("train", "prefill", "decode")
# What a GPU run uses (DESIGN.md "Backends"); forced here, as this process runs on CPU.
GPU_CHOICES = {"dtype": "bfloat16", "moe_backend": "einsum", "attention_backend": "xla"}
# XLA:GPU options a GPU launch sets (JAX_NOTES.md section 6): the latency-hiding scheduler is
# off by default in XLA.
GPU_XLA_OPTIONS: dict[str, Any] = {"xla_gpu_enable_latency_hiding_scheduler": True}
# Deviceless only: the sort-to-CUB pass queries a device ("invalid device ordinal").
DEVICELESS_XLA_OPTIONS: dict[str, Any] = {"xla_gpu_enable_cub_radix_sort": False}
PGLE_OPTION = "xla_gpu_pgle_profile_file_or_directory_path"


def target_spec(target: str) -> str:
    """The ``GpuTargetConfigProto`` text of ``target`` (shipped as package data)."""
    if target not in TARGETS:
        raise ValueError(f"--target {target!r}: choose one of {sorted(TARGETS)}")
    return (
        resources.files("deepseek_jax.codesign").joinpath("gpu_specs", TARGETS[target]).read_text()
    )


def gpu_mesh(target: str, node: int = 1, gpu: int = 8, stage: int = 1) -> jax.sharding.Mesh:
    """Our (stage, node, gpu) mesh over abstract devices of ``target``: one host per
    (stage, node), ``gpu`` devices each."""
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(
            platform="cuda", target_config=target_spec(target), topology=f"1x{stage * node}x{gpu}"
        )
    except Exception as e:  # the plugin raises plain RuntimeErrors
        raise RuntimeError(
            f"no CUDA topology ({e}); run in the venv of `make gpu-compile` (the jax-cuda12 "
            "plugin wheels) with JAX_PLATFORMS=cpu"
        ) from None
    return make_mesh(node, gpu, stage, devices=topo.devices)


def gpu_config(cfg: ModelConfig, overrides: dict[str, str] | None = None) -> ModelConfig:
    """``cfg`` with the GPU choices forced, then ``overrides`` on top."""
    return cfg.with_overrides({**GPU_CHOICES, **(overrides or {})})


@dataclasses.dataclass
class Compiled:
    hlo: str
    memory: Any  # CompiledMemoryStats
    compile_s: float
    profile_us: dict[str, float] | None = None  # latency_profile: what the scheduler was told


def compile_program(
    program: str,
    cfg: ModelConfig,
    mesh: jax.sharding.Mesh,
    batch: int,
    seq_len: int,
    *,
    options: dict[str, Any] | None = None,
    remat: str = "none",
    pipeline: str = "none",
    microbatches: int = 1,
    pairing: bool = True,
    latency_profile: bool = False,
) -> Compiled:
    """Traces ``program`` on abstract state over ``mesh`` and compiles it for the GPU;
    ``pipeline`` (train only) runs the step pipelined over the mesh's stages (``pairing``
    False: F&B ticks through the switches, the control of ``pipeline/pairing.py``).
    ``latency_profile``: compile twice, the second time with the scheduler reading the
    first schedule's costs under ``CostModel`` (``latency_profile.py``: what PGLE gives it
    on a pod); ``compile_s`` is then both compiles."""
    if program not in PROGRAMS:
        raise ValueError(f"--program {program!r}: choose one of {PROGRAMS}")
    dp = mesh.size
    if batch % dp:
        raise ValueError(f"--batch {batch} is not divisible by the {dp} devices of the mesh")
    build = {"train": _train, "prefill": _prefill, "decode": _decode}[program]
    if pipeline != "none":
        if program != "train":
            raise ValueError(f"--pipeline {pipeline}: only --program train is pipelined")
        build = functools.partial(
            _train, pipeline=pipeline, microbatches=microbatches, pairing=pairing
        )
    # Choices by platform (Pallas kernels compiled, not interpreted) are made for the GPU.
    with jax.set_mesh(mesh), backends.targeting("gpu"):
        traced = build(cfg, mesh, batch, seq_len, remat)
        lowered = traced.lower()
    options = {**GPU_XLA_OPTIONS, **DEVICELESS_XLA_OPTIONS, **(options or {})}
    t0 = time.perf_counter()
    compiled = lowered.compile(compiler_options=options)
    costs = None
    if latency_profile:
        costs = costs_us(Schedule(compiled.as_text(), dict(mesh.shape), CostModel()))
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "cost_model.pbtxt")
            with open(path, "w") as f:
                f.write(profile_text(costs))
            compiled = lowered.compile(compiler_options={**options, PGLE_OPTION: path})
    return Compiled(compiled.as_text(), compiled.memory_analysis(), time.perf_counter() - t0, costs)


def _ids(mesh, batch: int, length: int) -> jax.ShapeDtypeStruct:
    spec = logical_to_spec(("batch", None), mesh_axes=mesh.axis_names)
    return jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=NamedSharding(mesh, spec))


def _train(cfg, mesh, batch, seq_len, remat, pipeline="none", microbatches=1, pairing=True):
    import deepseek_jax.train.state as st
    import deepseek_jax.train.step as sp
    from deepseek_jax.pipeline.placement import pipeline_for

    tcfg = TrainConfig(
        batch_size=batch,
        seq_len=seq_len,
        layer_loop="scan",
        remat=remat,
        pipeline=pipeline,
        microbatches=microbatches,
    )
    graphdef, abs_state, layout, tx = st.plan(cfg, tcfg, mesh)
    pipe = pipeline_for(cfg, tcfg, mesh)
    if pipe is not None and not pairing:
        pipe = dataclasses.replace(pipe, paired=False)
    fn = lambda s, ids: sp.train_step(graphdef, tx, tcfg, layout, s, ids, pipe)  # noqa: E731
    jitted = jax.jit(
        fn,
        in_shardings=(layout.state, sp.batch_sharding(mesh)),
        out_shardings=(layout.state, None),
        donate_argnums=0,
    )
    return jitted.trace(st.abstract_state(abs_state, layout), _ids(mesh, batch, seq_len + 1))


def _model_state(cfg, mesh):
    from deepseek_jax.build import abstract_model

    graphdef, abs_state = nnx.split(abstract_model(cfg, layer_loop="scan"))

    def one(s, a):  # a: an abstract nnx Variable
        return a.replace(jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s))

    return graphdef, jax.tree.map(one, state_shardings(abs_state, mesh), abs_state)


def _cache(graphdef, state, batch, max_len):
    return jax.eval_shape(lambda s: nnx.merge(graphdef, s).init_cache(batch, max_len), state)


def _prefill(cfg, mesh, batch, seq_len, remat):
    """A prompt of ``seq_len`` tokens into an empty latent cache: (logits, cache)."""
    graphdef, state = _model_state(cfg, mesh)

    def fn(s, ids_BT):
        model = nnx.merge(graphdef, s)
        cache = model.init_cache(ids_BT.shape[0], ids_BT.shape[1])
        return model.decode(ids_BT, cache, jnp.int32(0))

    return jax.jit(backends.forward_only(fn)).trace(state, _ids(mesh, batch, seq_len))


def _decode(cfg, mesh, batch, seq_len, remat):
    """One new token per sequence over a cache of ``seq_len`` positions."""
    graphdef, state = _model_state(cfg, mesh)
    cache = _cache(graphdef, state, batch, seq_len)
    batch_spec = logical_to_spec(("batch",), mesh_axes=mesh.axis_names)[0]

    def shard(a):  # cache leaves: [L, B, S, ...], batch-sharded like the tokens
        spec = P(None, batch_spec) if a.ndim > 1 else P()
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, spec))

    cache = jax.tree.map(shard, cache)
    index = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))

    def fn(s, ids_BT, c, i):
        return nnx.merge(graphdef, s).decode(ids_BT, c, i)

    return jax.jit(backends.forward_only(fn), donate_argnums=2).trace(
        state, _ids(mesh, batch, 1), cache, index
    )
