"""The device mesh: axes named after the hardware (``stage``), ``node``, ``gpu``.

``node`` crosses the slow links between hosts (InfiniBand), ``gpu`` the fast links inside
one (NVLink). Devices of one process always share a ``node`` index, so a collective over
``gpu`` never leaves a host. Topology-aware code reads sizes from the mesh, never a constant.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

NODE, GPU, STAGE = "node", "gpu", "stage"


def make_mesh(
    node: int | None = None,
    gpu: int | None = None,
    stage: int = 1,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Builds the (``stage``,) ``node``, ``gpu`` mesh with Explicit axes.

    Args:
      node: hosts per pipeline stage; default: the number of processes (divided by stage).
      gpu: devices per node; default: all remaining devices.
      stage: pipeline stages; the axis is added only when > 1.
      devices: defaults to ``jax.devices()``.
    Returns:
      A mesh of shape (stage?, node, gpu); devices are ordered by (process, id) so that the
      devices of one process fill consecutive positions along ``gpu``.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if stage < 1:
        raise ValueError(f"mesh: stage must be >= 1, got {stage}")
    if node is None:
        procs = len({d.process_index for d in devices})
        node = max(1, procs // stage) if gpu is None else n // (stage * gpu)
    if gpu is None:
        gpu = n // (stage * node) if node > 0 else 0
    if node < 1 or gpu < 1 or stage * node * gpu != n:
        raise ValueError(
            f"mesh: stage x node x gpu = {stage} x {node} x {gpu} = {stage * node * gpu} "
            f"does not match the {n} available devices"
        )
    devices.sort(key=lambda d: (d.process_index, d.id))
    grid = np.array(devices, dtype=object).reshape(stage, node, gpu)
    _check_hosts(grid)
    if stage == 1:
        return jax.make_mesh(
            (node, gpu), (NODE, GPU), (AxisType.Explicit,) * 2, devices=grid.reshape(-1)
        )
    return jax.make_mesh(
        (stage, node, gpu), (STAGE, NODE, GPU), (AxisType.Explicit,) * 3, devices=grid.reshape(-1)
    )


def _check_hosts(grid: np.ndarray) -> None:
    """Every process's devices must lie in one (stage, node) row: ``gpu`` stays intra-host.

    A single process (tests on virtual CPU devices, one multi-GPU host) may simulate
    several nodes, so the check applies only to multi-process runs.
    """
    if len({d.process_index for d in grid.flat}) == 1:
        return
    rows: dict[int, set[tuple[int, int]]] = collections.defaultdict(set)
    for (s, nd, _), dev in np.ndenumerate(grid):
        rows[dev.process_index].add((s, nd))
    split = {p: sorted(r) for p, r in rows.items() if len(r) > 1}
    if split:
        p, r = next(iter(split.items()))
        raise ValueError(
            f"mesh: process {p}'s devices span nodes {r}; choose gpu as a multiple of the "
            f"devices per process ({jax.local_device_count()})"
        )


def parse_mesh_spec(text: str | None) -> dict[str, int]:
    """``"node=2,gpu=4"`` (``stage=S`` optional) -> keyword arguments of ``make_mesh``.

    Empty or None gives {} (every default). Raises ValueError naming the bad spec.
    """
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        key, _, val = part.partition("=")
        if key.strip() not in (NODE, GPU, STAGE) or not val.strip().isdigit():
            raise ValueError(f"--mesh {text!r}: expected node=N,gpu=G (optionally stage=S)")
        out[key.strip()] = int(val)
    return out


def single_device_mesh() -> Mesh:
    """A (node=1, gpu=1) mesh on the first device: the unsharded reference."""
    return make_mesh(1, 1, devices=jax.devices()[:1])
