"""Manual-axis types of FFI results inside ``shard_map``."""

from __future__ import annotations

import jax


def varying_like(out, args):
    """``out`` marked as varying over the manual mesh axes its inputs vary over: inside
    ``shard_map`` an FFI call's result type carries none, which a custom VJP rejects."""
    vma = frozenset().union(*(_varying(a) for a in args))
    missing = tuple(sorted(vma - _varying(out)))
    return jax.lax.pcast(out, missing, to="varying") if missing else out


def _varying(x) -> frozenset:
    t = jax.typeof(x)
    mat = getattr(t, "manual_axis_type", None)  # jax 0.12; older releases: ``t.vma``
    return frozenset(mat.varying if mat is not None else getattr(t, "vma", ()))
