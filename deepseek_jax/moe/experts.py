"""Routed experts: the grouped SwiGLU FFN over dispatched rows, dropless, static shapes.

Three backends (``cfg.run.moe_backend``; ``"auto"`` is decided by ``resolve_backend`` on the
real shapes: measured on CPU, ``einsum`` elsewhere), all exact for any routing:
- ``"grouped"`` (auto on CPU where it was measured faster): rows sorted by expert, three
  grouped GEMMs over the exact group sizes: no padding, no spill loop, each expert's
  weights streamed once. On CPU that is our C++ kernel (``cpu_kernels/grouped_gemm.cc``,
  through the XLA FFI, with a custom VJP of grouped GEMMs), elsewhere
  ``jax.lax.ragged_dot``. Its cost is flat in E where the slots' is not (figures from
  ``experiments.bench_moe``: README, "Measured figures").
- ``"einsum"`` (auto off CPU, and on CPUs where the kernel loses): dense capacity slots
  ``[E, C, D]`` as one batched einsum per matrix (each expert's weights read once), plus a
  loop over the spill blocks that are in use (see ``permute.py``). Cost follows T*K, not
  E: E*C is about T*K plus a slack of ~2 sqrt(T*K/E) rows per expert, and spilling costs
  per used block. A custom VJP runs the same loop backwards and accumulates into the
  einsum's weight gradients in place, so no full-size weight gradient is ever added twice.
  On XLA:CPU the small per-expert GEMMs of many experts lose efficiency (padding, weight
  packing per expert).
- ``"ragged_dot"``: always ``jax.lax.ragged_dot``. On XLA:CPU it is far slower and grows
  with the number of experts; on an H200 it also lost to ``"einsum"`` at the bench shapes
  (README, "Measured figures").
With ``fp8`` (an FP8 backend, ``fp8.fp8_mode(cfg)``) every expert GEMM, forward and
backward, follows DeepSeek-V3's FP8 recipe (``deepseek_jax/fp8.py``): the slots run
``fp8_expert_ffn``, the spill blocks ``fp8_swiglu``, the ragged path ``fp8_grouped_ffn``;
the weights then come in as the FP32 masters and are quantised per 128x128 block.
``routed_ffn_reference`` is the plain twin: every expert applied to every token, masked.

Shape letters: T tokens (rows), K experts per token, A = T K assignments, E local experts, C
capacity slots, D hidden, F expert FFN width, P padded sorted positions.
"""

from __future__ import annotations

import functools
import typing
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

import cpu_kernels.grouped_gemm as grouped_gemm
import deepseek_jax.backends as backends
import deepseek_jax.fp8 as fp8_ops
import deepseek_jax.moe.permute as perm
from deepseek_jax.layers import swiglu
from deepseek_jax.moe.permute import Dispatch, SlotSizes

ExpertBackend = Literal["einsum", "grouped", "ragged_dot"]
KERNEL_NAME = "the C++ grouped GEMM"


def check_backend(name: str) -> str:
    """``name`` if it is ``"auto"`` or a backend, else a clear error."""
    if name != "auto" and name not in typing.get_args(ExpertBackend):
        raise ValueError(
            f"MoE backend {name!r}: use 'auto' or one of {typing.get_args(ExpertBackend)}"
        )
    return name


def resolve_backend(
    name: str, shape_TKEDF: tuple[int, ...] | None = None, dtype=jnp.float32, fp8=None
) -> ExpertBackend:
    """The expert backend for one device's T tokens x K choices over E local experts of
    width D -> F.

    ``"auto"``: ``"grouped"`` (our C++ kernel: no padding, no spill loop, flat in the
    number of experts) on CPU where it builds and was measured faster than the capacity
    slots here at this shape class (``backends.measured``); else ``"einsum"`` (on an H200
    at the bench shapes ``ragged_dot`` was slower than the slots). Without a shape,
    ``"auto"`` stays undecided (``routed_ffn`` decides it on the real shapes).
    """
    if check_backend(name) != "auto":
        return backends.note("moe_experts", shape_TKEDF or (), name, f"moe_backend={name}")
    if not backends.kernel_available(grouped_gemm.KERNEL, KERNEL_NAME):
        why = "auto: no C++ kernel here" if backends.target_platform() == "cpu" else "auto: off CPU"
        return backends.note("moe_experts", shape_TKEDF or (), "einsum", why)
    if shape_TKEDF is None:
        return "auto"
    return backends.measured(
        f"moe_experts[{jnp.dtype(dtype).name}{',fp8' if fp8 else ''}]",
        shape_TKEDF,
        {b: _timed(b, shape_TKEDF, dtype, fp8) for b in ("grouped", "einsum")},
        build_id=grouped_gemm.KERNEL.identity(),
        fallback="einsum",
    )


def _timed(backend: ExpertBackend, shape_TKEDF, dtype, fp8) -> backends.Candidate:
    """``routed_ffn`` forward (and backward) on uniform random routing of these shapes."""
    T, K, E, D, F = shape_TKEDF

    def build(backward: bool):
        keys = jax.random.split(jax.random.key(0), 6)
        x = jax.random.normal(keys[0], (T, D), dtype)
        idx = jax.random.randint(keys[1], (T, K), 0, E)
        weight = jax.random.uniform(keys[2], (T, K))
        ws = [
            jax.random.normal(k, s, jnp.float32 if fp8 else dtype) / s[1] ** 0.5
            for k, s in zip(keys[3:], [(E, D, F), (E, D, F), (E, F, D)], strict=True)
        ]

        def loss(x, *ws):
            return jnp.sum(routed_ffn(x, idx, weight, *ws, backend=backend, fp8=fp8))

        run = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)) if backward else loss)
        return lambda: jax.block_until_ready(run(x, *ws))

    return build


def expert_ffn(
    x_ECD: Float[Array, "E C D"],
    w_gate_EDF: Float[Array, "E D F"],
    w_up_EDF: Float[Array, "E D F"],
    w_down_EFD: Float[Array, "E F D"],
) -> Float[Array, "E C D"]:
    """SwiGLU of every expert over its own slots: three batched einsums."""
    h_ECF = jax.nn.silu(jnp.einsum("ecd,edf->ecf", x_ECD, w_gate_EDF))
    h_ECF = h_ECF * jnp.einsum("ecd,edf->ecf", x_ECD, w_up_EDF)
    return jnp.einsum("ecf,efd->ecd", h_ECF, w_down_EFD)


def grouped_ffn_ragged(
    x_AD: Float[Array, "A D"],
    group_sizes_E: Int[Array, " E"],
    w_gate_EDF: Float[Array, "E D F"],
    w_up_EDF: Float[Array, "E D F"],
    w_down_EFD: Float[Array, "E F D"],
    *,
    gmm=jax.lax.ragged_dot,
) -> Float[Array, "A D"]:
    """SwiGLU over rows sorted by expert, as grouped GEMMs ``gmm(x, w, group_sizes)``."""
    h_AF = jax.nn.silu(gmm(x_AD, w_gate_EDF, group_sizes_E))
    h_AF = h_AF * gmm(x_AD, w_up_EDF, group_sizes_E)
    return gmm(h_AF.astype(x_AD.dtype), w_down_EFD, group_sizes_E).astype(x_AD.dtype)


def grouped_ffn(x_AD, group_sizes_E, w_gate_EDF, w_up_EDF, w_down_EFD):
    """``grouped_ffn_ragged`` on the platform's fast grouped GEMM: our C++ kernel on CPU
    (``cpu_kernels.grouped_gemm``), ``jax.lax.ragged_dot`` elsewhere."""
    gmm = jax.lax.ragged_dot
    if backends.target_platform() == "cpu":
        if not grouped_gemm.available():
            raise RuntimeError(
                "MoE backend 'grouped' needs the C++ grouped GEMM on CPU, which did not "
                "build here (no g++?); use backend 'einsum'"
            )
        gmm = grouped_gemm.grouped_matmul
    return grouped_ffn_ragged(x_AD, group_sizes_E, w_gate_EDF, w_up_EDF, w_down_EFD, gmm=gmm)


def routed_ffn(
    x_TD: Float[Array, "T D"],
    idx_TK: Int[Array, "T K"],
    weight_TK: Float[Array, "T K"],
    w_gate_EDF: Float[Array, "E D F"],
    w_up_EDF: Float[Array, "E D F"],
    w_down_EFD: Float[Array, "E F D"],
    *,
    backend: ExpertBackend | Literal["auto"] = "einsum",
    sizes: SlotSizes | None = None,
    fp8: fp8_ops.Fp8Backend | None = None,
) -> Float[Array, "T D"]:
    """sum_k weight[t, k] * FFN_{idx[t, k]}(x[t]) for every token, in float32.

    Args:
      x_TD, w_*: in the compute dtype (with ``fp8``: w_* the FP32 masters).
      weight_TK: gate weights (float32).
      sizes: slot layout of the einsum backend; default ``SlotSizes.for_shapes``.
      fp8: None, or the FP8 GEMM backend (``"xla"`` or ``"pallas"``).
    """
    T, K = idx_TK.shape
    E = w_gate_EDF.shape[0]
    if backend == "auto":  # decided here, on one device's real shapes
        shape = (T, K, E, *w_gate_EDF.shape[1:])
        backend = resolve_backend("auto", shape, x_TD.dtype, fp8)
    sizes = sizes or SlotSizes.for_shapes(T, K, E)
    d = perm.sort_assignments(idx_TK, E, sizes)
    ws = (w_gate_EDF, w_up_EDF, w_down_EFD)
    if backend in ("grouped", "ragged_dot"):
        plain = grouped_ffn if backend == "grouped" else grouped_ffn_ragged
        grouped = _in_fp8(plain, fp8_ops.fp8_grouped_ffn, fp8)
        y_AD = grouped(perm.permute_sorted(x_TD, d), d.counts_E, *ws)
        return perm.unpermute_sorted(y_AD, weight_TK, d)
    if backend != "einsum":
        raise ValueError(
            f"routed_ffn: unknown backend {backend!r}; use one of {typing.get_args(ExpertBackend)}"
        )
    return _slots_and_spill(x_TD, weight_TK, *ws, d, fp8)


def _in_fp8(plain, fp8_twin, fp8: fp8_ops.Fp8Backend | None):
    """``plain``, or its FP8 drop-in bound to the backend when ``fp8`` is set."""
    return functools.partial(fp8_twin, backend=fp8) if fp8 else plain


def routed_ffn_reference(x_TD, idx_TK, weight_TK, w_gate_EDF, w_up_EDF, w_down_EFD, *, fp8=None):
    """The slow twin of ``routed_ffn``: each expert over all tokens, masked by its gate."""
    ffn = _in_fp8(swiglu, fp8_ops.fp8_swiglu, fp8)
    y_TD = jnp.zeros(x_TD.shape, jnp.float32)
    for e in range(w_gate_EDF.shape[0]):
        g_T = jnp.sum(jnp.where(idx_TK == e, weight_TK, 0.0), axis=-1)
        y_e = ffn(x_TD, w_gate_EDF[e], w_up_EDF[e], w_down_EFD[e]).astype(jnp.float32)
        y_TD = y_TD + g_T[:, None] * y_e
    return y_TD


# ----------------------------------------------------------------------- einsum backend


def _dense(x_TD, weight_TK, w_gate, w_up, w_down, d: Dispatch, fp8):
    """The slotted assignments: gather into slots, batched FFN, weighted combine."""
    ffn = _in_fp8(expert_ffn, fp8_ops.fp8_expert_ffn, fp8)
    y_ECD = ffn(perm.gather_slots(x_TD, d), w_gate, w_up, w_down)
    return perm.unpermute(y_ECD, weight_TK, d)


def _block(d: Dispatch, j, weight_A):
    """Assignment ids, tokens, validity and gate weights of spill block j (b rows)."""
    b, K = d.spill_block, d.slot_TK.shape[1]
    start = d.block_start_N[j]
    a_b = jax.lax.dynamic_slice_in_dim(d.order_P, start, b)
    ok_b = start + jnp.arange(b, dtype=jnp.int32) < d.block_end_N[j]
    w_b = jnp.where(ok_b, weight_A[a_b], 0.0)
    return a_b, a_b // K, ok_b, w_b


def _block_ffn(x_bD, w_b, w_gate_DF, w_up_DF, w_down_FD, *, fp8):
    ffn = _in_fp8(swiglu, fp8_ops.fp8_swiglu, fp8)
    return w_b[:, None] * ffn(x_bD, w_gate_DF, w_up_DF, w_down_FD).astype(jnp.float32)


def _expert(ws, e):
    return [jax.lax.dynamic_index_in_dim(w, e, keepdims=False) for w in ws]


def _spill(y_TD, x_TD, weight_TK, ws, d: Dispatch, fp8):
    """Adds the spilled assignments to y_TD, one block of one expert per step."""
    weight_A = weight_TK.reshape(-1)

    def body(j, y_TD):
        _, tok_b, _, w_b = _block(d, j, weight_A)
        y_bD = _block_ffn(x_TD[tok_b], w_b, *_expert(ws, d.block_expert_N[j]), fp8=fp8)
        return y_TD.at[tok_b].add(y_bD)

    if d.block_start_N.shape[0] == 0:
        return y_TD
    return jax.lax.fori_loop(0, d.num_blocks, body, y_TD)


def _spill_bwd(dy_TD, x_TD, weight_TK, ws, d: Dispatch, fp8, grads):
    """Cotangents of ``_spill``, accumulated in place into ``grads`` = (dx, dweight, dW..)."""
    weight_A = weight_TK.reshape(-1)

    def body(j, grads):
        dx_TD, dweight_A, *dws = grads
        a_b, tok_b, ok_b, w_b = _block(d, j, weight_A)
        e = d.block_expert_N[j]
        block_ffn = functools.partial(_block_ffn, fp8=fp8)
        _, vjp = jax.vjp(block_ffn, x_TD[tok_b], w_b, *_expert(ws, e))
        dx_bD, dw_b, *dw_e = vjp(dy_TD[tok_b])
        dx_TD = dx_TD.at[tok_b].add(dx_bD)  # zero on padding rows (their w_b is 0)
        dweight_A = dweight_A.at[a_b].add(jnp.where(ok_b, dw_b, 0.0))
        dws = [
            jax.lax.dynamic_update_index_in_dim(dw, dw[e] + g, e, 0)
            for dw, g in zip(dws, dw_e, strict=True)
        ]
        return (dx_TD, dweight_A, *dws)

    if d.block_start_N.shape[0] == 0:
        return grads
    return jax.lax.fori_loop(0, d.num_blocks, body, grads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _slots_and_spill(x_TD, weight_TK, w_gate, w_up, w_down, d: Dispatch, fp8):
    y_TD = _dense(x_TD, weight_TK, w_gate, w_up, w_down, d, fp8)
    return _spill(y_TD, x_TD, weight_TK, (w_gate, w_up, w_down), d, fp8)


def _slots_and_spill_fwd(x_TD, weight_TK, w_gate, w_up, w_down, d, fp8):
    dense = functools.partial(_dense, d=d, fp8=fp8)
    y_TD, dense_vjp = jax.vjp(dense, x_TD, weight_TK, w_gate, w_up, w_down)
    y_TD = _spill(y_TD, x_TD, weight_TK, (w_gate, w_up, w_down), d, fp8)
    return y_TD, (dense_vjp, x_TD, weight_TK, (w_gate, w_up, w_down), d)


def _slots_and_spill_bwd(fp8, res, dy_TD):
    dense_vjp, x_TD, weight_TK, ws, d = res
    dx, dweight, *dws = dense_vjp(dy_TD)
    grads = (dx, dweight.reshape(-1), *dws)
    dx, dweight_A, *dws = _spill_bwd(dy_TD, x_TD, weight_TK, ws, d, fp8, grads)
    return (dx, dweight_A.reshape(weight_TK.shape), *dws, None)


_slots_and_spill.defvjp(_slots_and_spill_fwd, _slots_and_spill_bwd)
