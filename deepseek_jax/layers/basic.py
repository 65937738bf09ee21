"""Parameters born with logical axis names, and the small layers built on them.

Parameters are float32 (master weights); each layer casts to the compute ``dtype`` at use.
``Linear`` and ``MLP`` take ``fp8`` (None, or an FP8 backend from ``fp8.fp8_mode(cfg)``):
then their GEMMs run through ``fp8.fp8_linear`` on the FP32 masters (DeepSeek-V3 recipe).
``eager_sharding=False`` keeps the names as metadata without sharding at creation: the model
is initialised under ``jit`` with out-shardings derived from these names (``build.py``).

Shape letters: B batch, T positions, D hidden, F FFN width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

import deepseek_jax.fp8 as fp8_ops
import deepseek_jax.sharding as sharding


def param(
    rngs: nnx.Rngs | None,
    shape: Sequence[int],
    names: Sequence[str | None],
    *,
    std: float | None = None,
    value: float | None = None,
) -> nnx.Param:
    """A float32 Param: normal(0, std) when ``std`` is given, else filled with ``value``."""
    if len(shape) != len(names):
        raise ValueError(f"param shape {tuple(shape)} and names {tuple(names)} differ in rank")
    if std is not None:
        x = std * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)
    else:
        x = jnp.full(tuple(shape), 0.0 if value is None else value, jnp.float32)
    return nnx.Param(x, out_sharding=tuple(names), eager_sharding=False)


def is_matrix(v: nnx.Variable) -> bool:
    """A weight matrix (not a norm vector or bias), ignoring a stacked ``layers`` axis."""
    names = [n for n in (v.get_metadata().get("out_sharding") or ()) if n != "layers"]
    return len(names) >= 2 if names else len(v.shape) >= 2


def rms_norm(
    x: Float[Array, "... D"], w_D: Float[Array, " D"], eps: float
) -> Float[Array, "... D"]:
    """RMSNorm in float32 (as the reference does), cast back to the input dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * w_D.reshape((1,) * (x.ndim - 1) + (-1,))).astype(x.dtype)


def matmul(x: Array, w: Array, n_in: int = 1, *, out_dtype=None, dot=None) -> Array:
    """``x[..., I_1..I_n] @ w[I_1..I_n, O...]`` as one 2-D GEMM over flattened axes.

    XLA:CPU runs a plain [M, K] x [K, N] dot faster than one with extra free axes,
    backward above all (figures: README, "Measured figures"). ``out_dtype`` is the dot's
    ``preferred_element_type``; ``dot(x2, w2)`` replaces ``jnp.dot`` (e.g. an FP8 linear).
    """
    k_shape = w.shape[:n_in]
    if x.shape[x.ndim - n_in :] != k_shape:
        raise ValueError(f"matmul: x {x.shape} and w {w.shape} disagree on {n_in} contracted axes")
    lead, out = x.shape[: x.ndim - n_in], w.shape[n_in:]
    k = math.prod(k_shape)
    # One axis group per reshape: explicit sharding types a merge or split of the (sharded)
    # row axes and of the feature axes only as separate reshapes.
    x2 = x.reshape(*lead, k).reshape(-1, k)
    if dot is None:
        y = jnp.dot(x2, w.reshape(k, -1), preferred_element_type=out_dtype)
    else:
        y = dot(x2, w.reshape(k, -1))
    y = y.reshape(*lead, y.shape[-1]).reshape(*lead, *out)
    return _rows_sharded_like(y, x, len(lead))


def _rows_sharded_like(y: Array, x: Array, n_lead: int) -> Array:
    """y with x's sharding on the leading (row) axes. The merge and split above drop it
    for a sharded axis of size 1 (one prompt on a one-device mesh), and ops that demand
    equal shardings (a cache's dynamic_update_slice) then fail."""
    want = tuple(jax.typeof(x).sharding.spec)[:n_lead]
    have = tuple(jax.typeof(y).sharding.spec)[:n_lead]
    pad = lambda s: s + (None,) * (n_lead - len(s))  # noqa: E731
    if not any(want) or pad(want) == pad(have):
        return y
    return jax.reshard(y, jax.sharding.PartitionSpec(*pad(want)))


def swiglu(
    x: Float[Array, "... D"],
    w_gate_DF: Float[Array, "D F"],
    w_up_DF: Float[Array, "D F"],
    w_down_FD: Float[Array, "F D"],
) -> Float[Array, "... D"]:
    """SwiGLU FFN: down(silu(x gate) * (x up))."""
    h = jax.nn.silu(matmul(x, w_gate_DF)) * matmul(x, w_up_DF)
    return matmul(h, w_down_FD)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, names: Sequence[str | None] = ("embed",)):
        self.eps = eps
        self.weight = param(None, (dim,), names, value=1.0)

    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
        return rms_norm(x, self.weight[...], self.eps)


class Linear(nnx.Module):
    """y = x W, W stored as [in, out] float32 and applied in ``dtype``; no bias (as V3)."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        names: Sequence[str | None],
        *,
        std: float,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
        fp8: fp8_ops.Fp8Backend | None = None,
    ):
        self.dtype = dtype
        self.fp8 = fp8
        self.kernel = param(rngs, (d_in, d_out), names, std=std)

    def __call__(self, x: Float[Array, "... I"]) -> Float[Array, "... O"]:
        if self.fp8:
            return fp8_ops.fp8_linear(x.astype(self.dtype), self.kernel[...], backend=self.fp8)
        return matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype))


class MLP(nnx.Module):
    """The dense SwiGLU FFN (dense layers and shared experts)."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        *,
        std: float,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
        fp8: fp8_ops.Fp8Backend | None = None,
    ):
        self.dtype = dtype
        self.fp8 = fp8
        self.gate_proj = param(rngs, (d_model, d_ff), ("embed", "mlp"), std=std)
        self.up_proj = param(rngs, (d_model, d_ff), ("embed", "mlp"), std=std)
        self.down_proj = param(rngs, (d_ff, d_model), ("mlp", "embed"), std=std)

    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
        if self.fp8:  # FP32 masters go in whole: quantised per 128x128 block
            ws = (self.gate_proj[...], self.up_proj[...], self.down_proj[...])
            return fp8_ops.fp8_swiglu(x.astype(self.dtype), *ws, backend=self.fp8)
        c = lambda w: w[...].astype(self.dtype)  # noqa: E731
        return swiglu(x.astype(self.dtype), c(self.gate_proj), c(self.up_proj), c(self.down_proj))


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, std: float, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = param(rngs, (vocab, dim), ("vocab", "embed"), std=std)

    def __call__(self, ids_BT: Int[Array, "B T"]) -> Float[Array, "B T D"]:
        out = sharding.spec(("batch", None, "embed"))
        table = self.embedding[...].astype(self.dtype)
        if out is None:
            return table[ids_BT]
        return table.at[ids_BT].get(out_sharding=out)
