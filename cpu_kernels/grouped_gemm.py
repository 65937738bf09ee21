"""Grouped GEMM on XLA:CPU: ``y[rows of g] = x[rows of g] @ w[g]``, rows sorted by group.

The CPU twin of ``jax.lax.ragged_dot`` (which XLA:CPU runs hundreds of times slower and
ever slower with more groups): a C++ kernel (``grouped_gemm.cc``) through the XLA FFI,
differentiable by a custom VJP whose two halves are grouped GEMMs too:
``dx = gmm(dy, w^T)`` and ``dw[g] = x[rows of g]^T dy[rows of g]`` (``tgmm``).
Computes in float32 whatever the input dtype; rows beyond ``sum(sizes)`` come out zero.

``variant`` picks the build (``cpu_kernels.build``: ``native``, ``avx2``, ...; None: the
default). ``grouped_matmul_reference`` is the pure-JAX reference the tests hold it to.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

import cpu_kernels.build as build
from cpu_kernels.vma import varying_like

_KERNEL = build.Kernel(Path(__file__).with_suffix(".cc"), ("DsjGmm", "DsjTgmm"))


KERNEL = _KERNEL  # for backends.py: availability, build errors, tile configuration


def available(variant: str | None = None) -> bool:
    """True when the kernel compiles and loads here (and jax runs on CPU)."""
    return _KERNEL.available(variant)


def _check(x_AK, w_GKN, sizes_G):
    if x_AK.ndim != 2 or w_GKN.ndim != 3 or sizes_G.ndim != 1:
        raise ValueError(
            f"grouped_matmul: expected x[A, K], w[G, K, N], sizes[G]; got shapes "
            f"{x_AK.shape}, {w_GKN.shape}, {sizes_G.shape}"
        )
    if x_AK.shape[1] != w_GKN.shape[1] or sizes_G.shape[0] != w_GKN.shape[0]:
        raise ValueError(
            f"grouped_matmul: x[A, K] = {x_AK.shape}, w[G, K, N] = {w_GKN.shape} and "
            f"sizes[G] = {sizes_G.shape} disagree on K or G"
        )


def gmm(
    x_AK: Float[Array, "A K"],
    w_GKN: Float[Array, "G K N"],
    sizes_G: Int[Array, " G"],
    variant: str | None = None,
) -> Float[Array, "A N"]:
    """The forward kernel, float32 (no gradient)."""
    _check(x_AK, w_GKN, sizes_G)
    out = jax.ShapeDtypeStruct((x_AK.shape[0], w_GKN.shape[2]), jnp.float32)
    call = _KERNEL.call("DsjGmm", out, variant)
    args = (x_AK.astype(jnp.float32), w_GKN.astype(jnp.float32), sizes_G.astype(jnp.int32))
    return varying_like(call(*args), args)


def tgmm(
    x_AK: Float[Array, "A K"],
    dy_AN: Float[Array, "A N"],
    sizes_G: Int[Array, " G"],
    variant: str | None = None,
) -> Float[Array, "G K N"]:
    """dw[g] = x[rows of g]^T dy[rows of g], float32 (zero for an empty group)."""
    G, (A, K), N = sizes_G.shape[0], x_AK.shape, dy_AN.shape[1]
    if dy_AN.shape[0] != A:
        raise ValueError(f"tgmm: x[A, K] = {x_AK.shape} and dy[A, N] = {dy_AN.shape} differ in A")
    out = jax.ShapeDtypeStruct((G, K, N), jnp.float32)
    call = _KERNEL.call("DsjTgmm", out, variant)
    args = (x_AK.astype(jnp.float32), dy_AN.astype(jnp.float32), sizes_G.astype(jnp.int32))
    return varying_like(call(*args), args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def grouped_matmul(
    x_AK: Float[Array, "A K"],
    w_GKN: Float[Array, "G K N"],
    sizes_G: Int[Array, " G"],
    variant: str | None = None,
) -> Float[Array, "A N"]:
    """x @ w[group of each row] in float32; rows past ``sum(sizes_G)`` give zero."""
    return gmm(x_AK, w_GKN, sizes_G, variant)


def _fwd(x_AK, w_GKN, sizes_G, variant):
    return gmm(x_AK, w_GKN, sizes_G, variant), (x_AK, w_GKN, sizes_G)


def _bwd(variant, res, dy_AN):
    x_AK, w_GKN, sizes_G = res
    dx_AK = gmm(dy_AN, jnp.swapaxes(w_GKN, 1, 2), sizes_G, variant).astype(x_AK.dtype)
    dw_GKN = tgmm(x_AK, dy_AN, sizes_G, variant).astype(w_GKN.dtype)
    return dx_AK, dw_GKN, None


grouped_matmul.defvjp(_fwd, _bwd)


def grouped_matmul_reference(
    x_AK: Float[Array, "A K"], w_GKN: Float[Array, "G K N"], sizes_G: Int[Array, " G"]
) -> Float[Array, "A N"]:
    """``jax.lax.ragged_dot`` in float32: the definition (slow on CPU)."""
    f32 = jnp.float32
    return jax.lax.ragged_dot(
        x_AK.astype(f32), w_GKN.astype(f32), sizes_G.astype(jnp.int32), preferred_element_type=f32
    )
