"""Causal softmax attention on XLA:CPU: a fused C++ kernel (``attention.cc``) via the XLA FFI.

q[B, T, H, Dk] (already multiplied by the softmax scale), k[B, T, H, Dk], v[B, T, H, Dv]
in the token-major layout the projections produce; query t sees keys 0..t. Differentiable
by a custom VJP whose backward is a second kernel that recomputes the probabilities from
the forward's per-row log-sum-exp, so no [T, T] tensor is ever saved. float32 only.

Under an Explicit mesh each device runs the kernel on its own batch and head shard
(``shard_map``); the sequence and feature axes are gathered if they were sharded.

``variant`` picks the build (``cpu_kernels.build``; None: the default).
``causal_attention_reference`` is the pure-JAX definition the tests hold it to.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float

import cpu_kernels.build as build
from cpu_kernels.vma import varying_like

_KERNEL = build.Kernel(Path(__file__).with_suffix(".cc"), ("DsjAttentionFwd", "DsjAttentionBwd"))


KERNEL = _KERNEL  # for backends.py: availability, build errors, tile configuration


def available(variant: str | None = None) -> bool:
    """True when the kernel compiles and loads here (and jax runs on CPU)."""
    return _KERNEL.available(variant)


def _check(q, k, v):
    if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"causal_attention: expected q[B, T, H, Dk], k[B, T, H, Dk], v[B, T, H, Dv]; "
            f"got shapes {q.shape}, {k.shape}, {v.shape}"
        )
    dtypes = {jnp.dtype(a.dtype) for a in (q, k, v)}
    if dtypes != {jnp.dtype(jnp.float32)}:
        raise ValueError(f"causal_attention: float32 only; got {sorted(map(str, dtypes))}")


def _sds(shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _forward_local(q, k, v, *, variant):
    B, T, H, _ = q.shape
    call = _KERNEL.call("DsjAttentionFwd", (_sds(v.shape), _sds((B, H, T))), variant)
    return tuple(varying_like(r, (q, k, v)) for r in call(q, k, v))


def _backward_local(q, k, v, o, lse, do, *, variant):
    shapes = (_sds(q.shape), _sds(k.shape), _sds(v.shape))
    call = _KERNEL.call("DsjAttentionBwd", shapes, variant)
    return tuple(varying_like(r, (q, k, v, o, lse, do)) for r in call(q, k, v, o, lse, do))


def _per_shard(fn, args, arg_layouts: str, out_layouts: str):
    """``fn`` on each device's batch and head shard under an Explicit mesh, else as is.

    Layouts, one letter per argument and per result: ``t`` token-major [B, T, H, D], split
    like q (``args[0]``) along B and H; ``l`` a log-sum-exp [B, H, T], likewise.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or jax.sharding.AxisType.Explicit not in mesh.axis_types:
        return fn(*args)
    spec = tuple(jax.typeof(args[0]).sharding.spec) + (None,) * 4
    layouts = {"t": P(spec[0], None, spec[2], None), "l": P(spec[0], spec[2], None)}
    in_specs = tuple(layouts[c] for c in arg_layouts)
    out_specs = tuple(layouts[c] for c in out_layouts)
    args = tuple(jax.reshard(a, s) for a, s in zip(args, in_specs, strict=True))
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def causal_attention(
    q_BTHK: Float[Array, "B T H K"],
    k_BTHK: Float[Array, "B T H K"],
    v_BTHO: Float[Array, "B T H O"],
    variant: str | None = None,
) -> Float[Array, "B T H O"]:
    """softmax(q k^T + causal mask) v per batch and head, float32."""
    return _fwd(q_BTHK, k_BTHK, v_BTHO, variant)[0]


def _fwd(q, k, v, variant):
    _check(q, k, v)
    fwd = functools.partial(_forward_local, variant=variant)
    o, lse = _per_shard(fwd, (q, k, v), "ttt", "tl")
    return o, (q, k, v, o, lse)


def _bwd(variant, res, do):
    bwd = functools.partial(_backward_local, variant=variant)
    return _per_shard(bwd, (*res, do), "ttttlt", "ttt")


causal_attention.defvjp(_fwd, _bwd)


def causal_attention_reference(
    q_BTHK: Float[Array, "B T H K"],
    k_BTHK: Float[Array, "B T H K"],
    v_BTHO: Float[Array, "B T H O"],
) -> Float[Array, "B T H O"]:
    """The definition in jnp, float32 throughout."""
    T = q_BTHK.shape[1]
    hi = jax.lax.Precision.HIGHEST
    s_BHTS = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BTHK, precision=hi)
    visible_TS = jnp.tril(jnp.ones((T, T), bool))
    p_BHTS = jax.nn.softmax(jnp.where(visible_TS, s_BHTS, -jnp.inf), axis=-1)
    return jnp.einsum("bhts,bshk->bthk", p_BHTS, v_BTHO, precision=hi)
