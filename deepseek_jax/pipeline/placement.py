"""Where layers and data go in a pipeline: the layer placement per (stage, chunk), the
per-tick tables the executor reads, the micro-batch split, and the run's ``Pipeline``."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

import deepseek_jax.sharding as sharding
from deepseek_jax.config import ModelConfig
from deepseek_jax.pipeline.schedule import B, F, Schedule, W, make_schedule, ticks


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """Which global layers each (stage, chunk) runs, padded to K per stack."""

    part_of: np.ndarray  # [PP, C] hop (= part) index of each chunk
    dense_idx: np.ndarray  # [PP, C, Kd] index into the dense stack (0 where padded)
    dense_valid: np.ndarray  # [PP, C, Kd] bool
    moe_idx: np.ndarray  # [PP, C, Km]
    moe_valid: np.ndarray  # [PP, C, Km]


def layer_plan(cfg: ModelConfig, sched: Schedule) -> LayerPlan:
    """Cuts the layers into as many contiguous parts as a micro-batch makes hops, as evenly
    as possible (the first parts one longer), and places part v where hop v runs."""
    n = len(sched.paths[0])
    total, k_dense = cfg.num_hidden_layers, cfg.first_k_dense_replace
    if total < n:
        raise ValueError(
            f"pipeline {sched.name}: {total} layers cannot fill {n} chunks "
            f"({sched.pp} stages x {sched.chunks}); use fewer stages"
        )
    sizes = [total // n + (i < total % n) for i in range(n)]
    starts = np.cumsum([0, *sizes])
    part_of = np.full((sched.pp, sched.chunks), -1)
    for path in sched.paths:
        for v, (s, c) in enumerate(path):
            assert part_of[s, c] in (-1, v), (s, c, v)
            part_of[s, c] = v
    parts = [range(starts[v], starts[v + 1]) for v in range(n)]
    dense = [[i for i in p if i < k_dense] for p in parts]
    moe = [[i - k_dense for i in p if i >= k_dense] for p in parts]

    def table(lists):
        k = max(len(x) for x in lists)
        idx = np.zeros((sched.pp, sched.chunks, k), np.int32)
        valid = np.zeros((sched.pp, sched.chunks, k), bool)
        for s in range(sched.pp):
            for c in range(sched.chunks):
                ids = lists[part_of[s, c]]
                idx[s, c, : len(ids)], valid[s, c, : len(ids)] = ids, True
        return idx, valid

    return LayerPlan(part_of, *table(dense), *table(moe))


def tick_tables(sched: Schedule, plan: LayerPlan) -> dict[str, np.ndarray]:
    """Per (tick, stage) integers: the slot's kind, its F and B ops, and what arrives."""
    grid = ticks(sched)
    nt, pp = len(grid[0]), sched.pp
    z = lambda: np.zeros((nt, pp), np.int32)  # noqa: E731
    t = {k: z() for k in ("kind", "f_mb", "f_c", "b_mb", "b_c")}
    chans = ("act_down", "act_up", "act_self", "grad_down", "grad_up", "grad_self")
    for ch in chans:
        t |= {f"{ch}_on": z(), f"{ch}_mb": z(), f"{ch}_c": z()}
    n = len(sched.paths[0])

    def route(kind, tick, s, mb, hop):
        s2, c2 = sched.paths[mb][hop]
        ch = f"{kind}_{'self' if s2 == s else 'down' if s2 == s + 1 else 'up'}"
        assert s2 in (s - 1, s, s + 1), (s, s2)
        t[f"{ch}_on"][tick, s2], t[f"{ch}_mb"][tick, s2], t[f"{ch}_c"][tick, s2] = 1, mb, c2

    for s in range(pp):
        for tick, slot in enumerate(grid[s]):
            if slot is None:
                continue
            phases = "".join(sorted(op.phase for op in slot))
            t["kind"][tick, s] = {"F": 1, "B": 2, "W": 3, "BW": 4, "BF": 5, "BFW": 6}[phases]
            for op in slot:
                hop = plan.part_of[s, op.chunk]
                if op.phase == F:
                    t["f_mb"][tick, s], t["f_c"][tick, s] = op.mb, op.chunk
                    if hop + 1 < n:
                        route("act", tick, s, op.mb, hop + 1)
                elif op.phase == B or (op.phase == W and len(slot) == 1):
                    t["b_mb"][tick, s], t["b_c"][tick, s] = op.mb, op.chunk
                    if op.phase == B and hop > 0:
                        route("grad", tick, s, op.mb, hop - 1)
    return t


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """A schedule and the layer placement for one model."""

    sched: Schedule
    plan: LayerPlan
    hidden: int
    dtype: str  # the residual stream's
    paired: bool = True  # F&B ticks as one computation (pairing.py); False: the control

    @classmethod
    def build(cls, cfg: ModelConfig, name: str, pp: int, microbatches: int) -> Pipeline:
        sched = make_schedule(name, pp, microbatches)
        return cls(sched, layer_plan(cfg, sched), cfg.hidden_size, cfg.run.dtype)


LAYER_KEYS = ("dense_layers", "moe_layers")


def split_layers(state: nnx.State) -> tuple[dict, dict]:
    """(the layer stacks, everything else) of a model state."""
    d = dict(state)
    return {k: d.pop(k) for k in LAYER_KEYS if k in d}, d


def to_stages(layers: dict, plan: LayerPlan) -> dict:
    """[L, ...] stacks -> [PP, C, K, ...] laid out over the ``layers`` mesh axis."""
    idx = {"dense_layers": plan.dense_idx, "moe_layers": plan.moe_idx}

    def one(key):
        def gather(a):
            a = sharding.relayout_dim(a, 0, None)
            return sharding.relayout_dim(a[idx[key]], 0, "layers")

        return jax.tree.map(gather, layers[key])

    return {k: one(k) for k in layers}


def microbatches(ids_BT1: jax.Array, m: int) -> jax.Array:
    """[B, T+1] -> [M, B/M, T+1], micro-batch j taking rows j of every device's local batch
    (no data moves between devices)."""
    mesh = jax.sharding.get_abstract_mesh()
    data = tuple(a for a in sharding.mesh_axes_of("batch") if a in mesh.axis_names)
    local = ids_BT1.shape[0] // max(1, sharding.data_parallel_size(mesh))
    if local % m:
        raise ValueError(
            f"pipeline: the local batch of {local} sequences does not split into {m} "
            f"micro-batches; make --batch-size a multiple of {m} x the data-parallel size"
        )
    split = lambda x: x.reshape(m, x.shape[0] // m, *x.shape[1:])  # noqa: E731
    if not data:
        return split(ids_BT1)
    spec = sharding.logical_to_spec(("batch",), mesh_axes=mesh.axis_names)
    return jax.shard_map(
        split, mesh=mesh, in_specs=spec, out_specs=P(None, *spec), axis_names=set(data)
    )(ids_BT1)


def pipeline_for(cfg: ModelConfig, tcfg, mesh: jax.sharding.Mesh) -> Pipeline | None:
    """The run's pipeline (``tcfg.pipeline`` over the mesh's stages), or None. Raises
    ValueError naming the fix for a bad combination."""
    if tcfg.pipeline == "none":
        return None
    stages = 1
    for a in sharding.mesh_axes_of("layers"):
        stages *= dict(mesh.shape).get(a, 1)
    if stages < 2:
        raise ValueError(f"--pipeline {tcfg.pipeline}: the mesh has no stages; add stage=N")
    pipe = Pipeline.build(cfg, tcfg.pipeline, stages, tcfg.microbatches)
    local = tcfg.batch_size // sharding.data_parallel_size(mesh)
    if local % tcfg.microbatches:
        raise ValueError(
            f"--pipeline: the local batch of {local} sequences does not split into "
            f"{tcfg.microbatches} micro-batches; make --batch-size a multiple of "
            f"{tcfg.microbatches} x the data-parallel size"
        )
    return pipe
