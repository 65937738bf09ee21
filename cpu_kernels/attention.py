"""Causal softmax attention on XLA:CPU: a fused C++ kernel (``attention.cc``) via the XLA FFI.

q[B, T, H, Dk] (already multiplied by the softmax scale), k[B, T, H, Dk], v[B, T, H, Dv]
in the token-major layout the projections produce; query t sees keys 0..t. Differentiable
by a custom VJP whose backward is a second kernel that recomputes the probabilities from
the forward's per-row log-sum-exp, so no [T, T] tensor is ever saved. float32 only.

Under an Explicit mesh each device runs the kernel on its own batch and head shard
(``shard_map``); the sequence and feature axes are gathered if they were sharded.

``causal_attention_reference`` is the pure-JAX definition the tests hold it to.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float

from cpu_kernels import build
from cpu_kernels.vma import varying_like

_SOURCE = Path(__file__).with_suffix(".cc")
_PREFIX = "deepseek_jax_"


def available() -> bool:
    """True when the kernel compiles and loads here (and jax runs on CPU)."""
    if jax.default_backend() != "cpu":
        return False
    try:
        _load()
    except build.KernelBuildError:
        return False
    return True


def _load():
    return build.load(_SOURCE, ("DsjAttentionFwd", "DsjAttentionBwd"), _PREFIX)


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


def _forward_local(q, k, v):
    B, T, H, _ = q.shape
    call = jax.ffi.ffi_call(
        _PREFIX + "DsjAttentionFwd", (_sds(v.shape), _sds((B, H, T))), vmap_method="sequential"
    )
    return tuple(varying_like(r, (q, k, v)) for r in call(q, k, v))


def _backward_local(q, k, v, o, lse, do):
    call = jax.ffi.ffi_call(
        _PREFIX + "DsjAttentionBwd",
        (_sds(q.shape), _sds(k.shape), _sds(v.shape)),
        vmap_method="sequential",
    )
    return tuple(varying_like(r, (q, k, v, o, lse, do)) for r in call(q, k, v, o, lse, do))


def _per_shard(fn, args, lse_at: int | None, n_out_tokens: int, lse_out: bool):
    """``fn`` on each device's batch and head shard under an Explicit mesh, else as is.

    Token-major arrays [B, T, H, D] are split like q along B and H; the log-sum-exp
    [B, H, T] (input ``lse_at`` and/or the last output) likewise.
    """
    mesh = jax.sharding.get_abstract_mesh()
    explicit = not mesh.empty and any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
    if not explicit:
        return fn(*args)
    spec = tuple(jax.typeof(args[0]).sharding.spec) + (None,) * 4
    tok, lse = P(spec[0], None, spec[2], None), P(spec[0], spec[2], None)
    in_specs = tuple(lse if i == lse_at else tok for i in range(len(args)))
    args = tuple(jax.reshard(a, s) for a, s in zip(args, in_specs, strict=True))
    out_specs = (tok,) * n_out_tokens + ((lse,) if lse_out else ())
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)(*args)


def _forward(q, k, v):
    return _per_shard(_forward_local, (q, k, v), None, 1, True)


@jax.custom_vjp
def causal_attention(
    q_BTHK: Float[Array, "B T H K"],
    k_BTHK: Float[Array, "B T H K"],
    v_BTHO: Float[Array, "B T H O"],
) -> Float[Array, "B T H O"]:
    """softmax(q k^T + causal mask) v per batch and head, float32."""
    _check(q_BTHK, k_BTHK, v_BTHO)
    _load()
    return _forward(q_BTHK, k_BTHK, v_BTHO)[0]


def _fwd(q, k, v):
    _check(q, k, v)
    _load()
    o, lse = _forward(q, k, v)
    return o, (q, k, v, o, lse)


def _bwd(res, do):
    return _per_shard(_backward_local, (*res, do), 4, 3, False)


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
