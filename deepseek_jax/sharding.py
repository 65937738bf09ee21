"""Logical axis names -> mesh axes: the one rules table, and helpers that apply it.

Modules name their array axes logically (``batch``, ``embed``, ``expert``...); only this
file and ``mesh.py`` know the physical axes. DeepSeek-V3 uses no tensor parallelism:
attention and dense layers are data parallel over (``node``, ``gpu``), routed experts are
expert parallel over the same devices, layers pipeline over ``stage``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax.mesh import GPU, NODE, STAGE

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

RULES: Rules = (
    ("batch", (NODE, GPU)),
    ("expert", (NODE, GPU)),
    ("layers", STAGE),
    ("embed", None),
    ("heads", None),
    ("q_lora", None),
    ("kv_lora", None),
    ("head_dim", None),
    ("mlp", None),
    ("vocab", None),
    ("seq", None),
)


def mesh_axes_of(name: str, rules: Rules = RULES) -> tuple[str, ...]:
    """The mesh axes that logical axis ``name`` shards over, major first; () if replicated.

    For code that must call collectives or read sizes along a logical axis (``psum`` over the
    expert axes, a mesh's expert-parallel size) without spelling the physical names.
    """
    table = dict(rules)
    if name not in table:
        raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
    axes = table[name]
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def _links(expert_axes: tuple[str, ...]) -> tuple[str, str]:
    """(inter-node, intra-node) axes of expert parallelism: the rule's major axis crosses
    hosts, its minor axis stays inside one (``make_mesh`` gives a process's devices
    consecutive positions along the minor axis)."""
    if len(expert_axes) != 2:
        raise ValueError(
            f"the 'expert' rule must name two mesh axes, inter-node first, for the two-hop "
            f"dispatch; got {expert_axes}"
        )
    return expert_axes[0], expert_axes[1]


def expert_links(rules: Rules = RULES) -> tuple[str, str]:
    """(inter-node, intra-node) mesh axes of expert parallelism under ``rules``.

    The two-hop dispatch (moe/dispatch.py) must know which expert axis is the slow
    inter-node link (hop 1: once per token and node) and which the fast intra-node one
    (hop 2); this names them by role, read from the rules table at the call (not frozen at
    import), so the MoE code never names a physical axis and a ``rules=`` table rules it.
    """
    return _links(mesh_axes_of("expert", rules))


def logical_to_spec(
    names: Sequence[str | None], rules: Rules = RULES, mesh_axes: Sequence[str] | None = None
) -> P:
    """Maps logical axis names to a PartitionSpec.

    Mesh axes absent from ``mesh_axes`` (e.g. ``stage`` on a 2-D mesh) are dropped.
    Raises ValueError on an unknown logical name or when two logical axes would shard over
    the same mesh axis (which XLA would reject later with a far less helpful message).
    """
    table = dict(rules)
    used: dict[str, str] = {}
    out = []
    for name in names:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
        axes = table[name]
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        if mesh_axes is not None:
            axes = tuple(a for a in axes if a in mesh_axes)
        for a in axes:
            if a in used:
                raise ValueError(
                    f"logical axes {used[a]!r} and {name!r} both map to mesh axis {a!r} "
                    f"in {tuple(names)}"
                )
            used[a] = name
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def _current_mesh_axes() -> tuple[str, ...] | None:
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else tuple(mesh.axis_names)


def spec(names: Sequence[str | None]) -> P | None:
    """The spec for ``names`` on the current mesh, or None with no mesh set."""
    axes = _current_mesh_axes()
    return None if axes is None else logical_to_spec(names, mesh_axes=axes)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Reshards ``x`` to its logical layout under an Explicit mesh; a no-op without one."""
    s = spec(names)
    if s is None:
        return x
    mesh = jax.sharding.get_abstract_mesh()
    if any(t == jax.sharding.AxisType.Manual for t in mesh.axis_types):
        return x
    return jax.reshard(x, s)


def variable_names(v: nnx.Variable) -> tuple[str | None, ...] | None:
    return v.get_metadata().get("out_sharding")


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
    """Devices the batch is split over (``stage`` holds layers, not data)."""
    size = 1
    for a in mesh_axes_of("batch"):
        size *= dict(mesh.shape).get(a, 1)
    return size


def like(x: jax.Array, ref: jax.Array) -> jax.Array:
    """``x`` resharded to ``ref``'s layout (same shape) under an Explicit mesh, else as is."""
    want = getattr(jax.typeof(ref).sharding, "spec", None)
    mesh = getattr(jax.typeof(ref).sharding, "mesh", None)
    if want is None or mesh is None or mesh.empty or mesh._any_axis_manual:
        return x
    return x if jax.typeof(x).sharding.spec == want else jax.reshard(x, want)


def relayout_dim(x: jax.Array, dim: int, name: str | None) -> jax.Array:
    """``x`` with dimension ``dim`` laid out over logical axis ``name`` (None: replicated),
    its other dimensions as they are; a no-op without an Explicit mesh or when already so.

    Layer stacks sharded over ``layers`` must be gathered before a scan or an unstack walks
    them (a slice of a sharded axis has no layout), and pipeline stages re-stack them.
    """
    sh = jax.typeof(x).sharding
    mesh = getattr(sh, "mesh", None)
    if mesh is None or mesh.empty or mesh._any_axis_manual:
        return x
    spec = list(sh.spec) + [None] * (x.ndim - len(sh.spec))
    want = None if name is None else logical_to_spec((name,), mesh_axes=mesh.axis_names)[0]
    if spec[dim] == want:
        return x
    spec[dim] = want
    return jax.reshard(x, P(*spec))


def _divisible(p: P, shape: Sequence[int], mesh: jax.sharding.Mesh) -> P:
    """Drops the mesh axes of a dimension they do not divide (1 dense layer, 2 stages)."""
    out = []
    for e, n in zip(list(p) + [None] * (len(shape) - len(p)), shape, strict=True):
        axes = () if e is None else (e,) if isinstance(e, str) else tuple(e)
        size = 1
        for a in axes:
            size *= mesh.shape[a]
        out.append(e if n % size == 0 else None)
    return P(*out)


def state_shardings(abs_state: nnx.State, mesh: jax.sharding.Mesh) -> nnx.State:
    """NamedShardings for every Variable of an abstract state, from its logical names; an
    axis a mesh axis does not divide stays unsharded."""

    def one(v):
        names = variable_names(v) if isinstance(v, nnx.Variable) else None
        shape = v.shape if hasattr(v, "shape") else v.value.shape
        p = logical_to_spec(names, mesh_axes=mesh.axis_names) if names else P(*[None] * len(shape))
        return NamedSharding(mesh, _divisible(p, shape, mesh))

    return jax.tree.map(one, abs_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def zero1_sharding(s: NamedSharding, shape: Sequence[int]) -> NamedSharding:
    """The sharding of an optimizer-state leaf under ZeRO-1.

    Optimizer moments of a data-parallel (replicated) parameter are split over the data
    axes: the first dimension that is unsharded and divisible by the free data-axis size
    takes them. Parameters already sharded over those axes (routed experts) keep their
    layout. A leaf with no such dimension stays as it is.
    """
    data_axes = logical_to_spec(("batch",), mesh_axes=s.mesh.axis_names)[0] or ()
    data_axes = (data_axes,) if isinstance(data_axes, str) else tuple(data_axes)
    spec = list(s.spec) + [None] * (len(shape) - len(s.spec))
    used = {a for e in spec if e for a in ((e,) if isinstance(e, str) else e)}
    free = tuple(a for a in data_axes if a not in used)
    size = 1
    for a in free:
        size *= s.mesh.shape[a]
    if size == 1:
        return s
    for i, (e, n) in enumerate(zip(spec, shape, strict=True)):
        if e is None and n % size == 0:
            spec[i] = free if len(free) > 1 else free[0]
            return NamedSharding(s.mesh, P(*spec))
    return s
