"""DeepSeek-V3's FP8 training recipe: fine-grained quantisation and block-scaled GEMMs.

Design note
-----------
*Paper* (V3TR arXiv 2412.19437 section 3.3; REFERENCE.md "FP8 recipe"). Every GEMM
operand of the large linears is E4M3 (max 448), in Fprop, Dgrad and Wgrad alike. Scales
are computed online from the max-abs of small groups, in FP32: activations per 1x128 tile
(one token, 128 channels), weights per 128x128 block. Products are accumulated in FP32
and *promoted* every N_C = 128 elements of K: each 128-wide K slice is summed on its own,
multiplied by both operands' scales and added into an FP32 accumulator (section 3.3.2:
Hopper's FP8 MMA keeps ~14 bits, which without promotion gave ~2 % error at K = 4096).

*The three GEMMs of a linear* y = x W, x [M tokens, K], W [K, N]:
- Fprop  y  = x W:    x in 1x128 tiles along K, W in 128x128 blocks.
- Dgrad  dx = dy W^T: dy in 1x128 tiles along N (its contraction dim), W in the *same*
  128x128 blocks read transposed (block quantisation commutes with transposition, so
  one quantised copy serves both GEMMs).
- Wgrad  dW = x^T dy: the contraction runs over tokens, so both x and dy are re-tiled
  along tokens, 128x1 (one channel, 128 tokens). V3 found 128x128 blocks for
  activation gradients to diverge: gradients are only ever tiled 1x128 along the
  contraction dim of the GEMM they feed.
Every GEMM is written in one "NT" form: out[M, N] = sum_g (a[:, g] . b[:, g]) sa[:, g]
sb[:, g], with both operands contiguous along K ("K-major", what Hopper's FP8 wgmma
needs for B) and one FP32 scale per row per 128-K slice g; a weight's 128x128 scale is
repeated over the 128 rows of its block (DeepGEMM's 1D2D and 1D1D contracts in one).

*Where we keep higher precision and why.* Scales, accumulators and the Wgrad output are
FP32 (weight gradients and master weights are FP32 as in V3); Fprop and Dgrad return the
compute dtype. The embedding, output head, router gate, norms and the attention core
(QK^T, softmax, PV) stay BF16/FP32: they are either small, sensitive (the gate decides
routing; the head sees the loss directly) or not weight GEMMs. The absorbed decode path
of MLA keeps its W_uk / W_uv products in high precision.

*What we do / simplify.* Quantisation runs in plain XLA just before each GEMM (V3 fuses
it into the previous kernel's epilogue). The Fprop input is saved for Wgrad already
re-tiled and in FP8 (as V3 caches FP8 activations), the FP32 master weight is
re-quantised in the backward pass. Dimensions that are not multiples of 128 get a partial
last tile whose scale comes from its own elements; GEMMs zero-pad K. Backends: ``xla``
(plain jnp: a batched FP8 dot per K slice, then the scaled FP32 sum; XLA:CPU upcasts) and
``pallas`` (our kernel, ``pallas_kernels/fp8_matmul.py``: Mosaic GPU wgmma on Hopper,
interpret mode elsewhere). The FP8 dispatch payload (power-of-two scales, ``pow2=True``
here) belongs to ``moe/dispatch.py``; E5M2 and delayed scaling are not used.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int

from deepseek_jax import fp8_vjp
from pallas_kernels import fp8_matmul as kernels

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
TILE = 128  # quantisation group and promotion interval N_C (V3TR 3.3.2)
Backend = Literal["xla", "pallas"]
_TINY = 1e-30  # floor on max-abs: all-zero tiles get a finite scale and quantise to 0


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pad_to(x: Array, axis: int, multiple: int) -> Array:
    n = x.shape[axis]
    extra = _cdiv(n, multiple) * multiple - n
    if extra == 0:
        return x
    pads = [(0, 0)] * x.ndim
    pads[axis] = (0, extra)
    return jnp.pad(x, pads)


def _scale(amax: Array, pow2: bool) -> Array:
    """FP32 dequantisation scale s = amax / 448 (x ~ q s); rounded up to 2^k if pow2."""
    s = jnp.maximum(amax.astype(jnp.float32), _TINY) / E4M3_MAX
    if not pow2:
        return s
    mant, exp = jnp.frexp(s)  # s = mant 2^exp, mant in [0.5, 1): exact, unlike exp2(log2)
    return jnp.ldexp(jnp.ones_like(s), jnp.where(mant == 0.5, exp - 1, exp))


def _to_e4m3(x: Array) -> Array:
    # Clip: an FP32 ratio can land a hair above 448, and E4M3FN has no inf (overflow -> NaN).
    return jnp.clip(x, -E4M3_MAX, E4M3_MAX).astype(E4M3)


# ------------------------------------------------------------------------ quantisation


def quantize_tiles(x: Array, *, axis: int = -1, pow2: bool = False) -> tuple[Array, Array]:
    """1x128 tiles along ``axis`` (128x1 when ``axis`` is the token axis), E4M3.

    Args:
      x: any float array; ``axis`` need not be a multiple of 128 (partial last tile).
    Returns:
      q: E4M3, x's shape.
      s: FP32 scales, x's shape with ``axis`` replaced by ceil(n / 128); x ~ q * s.
    """
    axis = axis % x.ndim
    n = x.shape[axis]
    xt = jnp.moveaxis(_pad_to(x.astype(jnp.float32), axis, TILE), axis, -1)
    xt = xt.reshape(*xt.shape[:-1], xt.shape[-1] // TILE, TILE)
    s = _scale(jnp.max(jnp.abs(xt), axis=-1, initial=0.0), pow2)
    q = _to_e4m3(xt / s[..., None]).reshape(*xt.shape[:-2], xt.shape[-2] * TILE)[..., :n]
    return jnp.moveaxis(q, -1, axis), jnp.moveaxis(s, -1, axis)


def dequantize_tiles(q: Array, s: Array, *, axis: int = -1) -> Float[Array, "..."]:
    """Inverse of ``quantize_tiles`` in FP32."""
    axis = axis % q.ndim
    s_full = jnp.repeat(s, TILE, axis=axis)
    s_full = lax.slice_in_dim(s_full, 0, q.shape[axis], axis=axis)
    return q.astype(jnp.float32) * s_full


def quantize_blocks(w: Float[Array, "... K N"], *, pow2: bool = False) -> tuple[Array, Array]:
    """128x128 blocks over the last two axes (leading axes, e.g. experts, are batch).

    Returns:
      q: E4M3, w's shape.
      s: FP32 scales [..., ceil(K/128), ceil(N/128)]; w ~ q * s per block.
    """
    K, N = w.shape[-2:]
    wp = _pad_to(_pad_to(w.astype(jnp.float32), -1, TILE), -2, TILE)
    G, H = wp.shape[-2] // TILE, wp.shape[-1] // TILE
    wb = wp.reshape(*w.shape[:-2], G, TILE, H, TILE)
    s = _scale(jnp.max(jnp.abs(wb), axis=(-3, -1)), pow2)
    q = _to_e4m3(wb / s[..., :, None, :, None]).reshape(wp.shape)[..., :K, :N]
    return q, s


def dequantize_blocks(q: Array, s: Array) -> Float[Array, "... K N"]:
    """Inverse of ``quantize_blocks`` in FP32."""
    K, N = q.shape[-2:]
    s_full = jnp.repeat(jnp.repeat(s, TILE, axis=-2), TILE, axis=-1)[..., :K, :N]
    return q.astype(jnp.float32) * s_full


def quantize_tensor(x: Array) -> tuple[Array, Array]:
    """Per-tensor E4M3 (one FP32 scale): the coarse baseline fine-grained tiling beats."""
    s = _scale(jnp.max(jnp.abs(x)), False)
    return _to_e4m3(x.astype(jnp.float32) / s), s


def block_rows(s_RC: Float[Array, "... R/128 C/128"], rows: int) -> Float[Array, "... R C/128"]:
    """128x128 block scales of a K-major [R, C] operand as the NT GEMM's per-row scales.

    The GEMM wants one scale per row per 128-K slice; row r takes block (r // 128, g).
    """
    return jnp.repeat(s_RC, TILE, axis=-2)[..., :rows, :]


# ------------------------------------------------------------------------ block-scaled GEMM


def scaled_matmul_reference(
    a8_MK: Array, sa_MG: Float[Array, "M G"], b8_NK: Array, sb_NG: Float[Array, "N G"]
) -> Float[Array, "M N"]:
    """out = sum_g (a[:, g] . b[:, g]) sa[:, g] sb[:, g]^T, in FP32 (the slow twin).

    Each 128-wide K slice g is accumulated on its own in FP32 (exact FP8 products, FP32
    sums, ``HIGHEST`` precision so no TF32 on GPU), scaled by both operands' scales, then
    added: promotion every 128 elements (V3TR 3.3.2).
    """
    G = sa_MG.shape[-1]
    a = _pad_to(a8_MK.astype(jnp.float32), -1, TILE).reshape(a8_MK.shape[0], G, TILE)
    b = _pad_to(b8_NK.astype(jnp.float32), -1, TILE).reshape(b8_NK.shape[0], G, TILE)
    part_GMN = jnp.einsum("mgk,ngk->gmn", a, b, precision=lax.Precision.HIGHEST)
    return jnp.sum(part_GMN * sa_MG.T[:, :, None] * sb_NG.T[:, None, :], axis=0)


def _scaled_matmul_xla(a8, sa, b8, sb, out_dtype):
    """Batched ([Bt, M, K] x [Bt, N, K]) FP8 dot per K slice, then the scaled FP32 sum."""
    Bt, M, K = a8.shape
    N, G = b8.shape[1], sa.shape[-1]
    a = _pad_to(a8, -1, TILE).reshape(Bt, M, G, TILE)
    b = _pad_to(b8, -1, TILE).reshape(Bt, N, G, TILE)
    dims = (((3,), (3,)), ((0, 2), (0, 2)))
    part = lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)  # [Bt, G, M, N]
    sa_t, sb_t = jnp.swapaxes(sa, 1, 2), jnp.swapaxes(sb, 1, 2)
    out = jnp.sum(part * sa_t[:, :, :, None] * sb_t[:, :, None, :], axis=1)
    return out.astype(out_dtype)


def scaled_matmul(
    a8: Array,
    sa: Array,
    b8: Array,
    sb: Array,
    *,
    backend: Backend = "xla",
    out_dtype=jnp.float32,
) -> Array:
    """The NT block-scaled GEMM on either backend, batched over an optional leading axis.

    Args:
      a8: E4M3 [(Bt,) M, K]; sa: FP32 [(Bt,) M, ceil(K/128)].
      b8: E4M3 [(Bt,) N, K] (K-major); sb: FP32 [(Bt,) N, ceil(K/128)].
    Returns:
      [(Bt,) M, N] in ``out_dtype``, accumulated in FP32 with per-128-K promotion.
    """
    batched = a8.ndim == 3
    if not batched:
        a8, sa, b8, sb = a8[None], sa[None], b8[None], sb[None]
    if backend == "xla":
        out = _scaled_matmul_xla(a8, sa, b8, sb, out_dtype)
    elif backend == "pallas":
        out = kernels.fp8_matmul(a8, sa, b8, sb, out_dtype=out_dtype)
    else:
        raise ValueError(f"fp8 backend must be 'xla' or 'pallas', got {backend!r}")
    return out if batched else out[0]


def grouped_scaled_matmul(
    a8_MK: Array,
    sa_MG: Array,
    b8_ENK: Array,
    sb_ENG: Array,
    group_ids_B: Int[Array, " B"],
    *,
    backend: Backend = "xla",
    out_dtype=jnp.float32,
) -> Array:
    """m-grouped contiguous NT GEMM: 128-row block b of ``a`` uses expert group_ids[b].

    Args:
      a8_MK: rows sorted by expert, each expert's rows padded to a multiple of 128
        (M = 128 B); sa_MG its 1x128 scales.
      b8_ENK, sb_ENG: per-expert K-major weights and per-row scales.
      group_ids_B: the expert of each 128-row block.
    """
    if backend == "pallas":
        return kernels.fp8_grouped_matmul(
            a8_MK, sa_MG, b8_ENK, sb_ENG, group_ids_B, out_dtype=out_dtype
        )
    if backend != "xla":
        raise ValueError(f"fp8 backend must be 'xla' or 'pallas', got {backend!r}")
    B = group_ids_B.shape[0]
    a = a8_MK.reshape(B, TILE, -1)
    sa = sa_MG.reshape(B, TILE, -1)
    # Gathering whole expert weights per row block: fine for tests and small MoEs.
    out = _scaled_matmul_xla(a, sa, b8_ENK[group_ids_B], sb_ENG[group_ids_B], out_dtype)
    return out.reshape(B * TILE, -1)


# ------------------------------------------------------------------------ FP8 layers


def _auto_sharded(fn, x: Array):
    """``fn`` with XLA-chosen shardings inside when an Explicit mesh is set.

    Tiling reshapes sharded axes (tokens into 128-blocks), which Explicit mode refuses;
    the output keeps x's sharding on its leading axes, the last axis replicated.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or jax.sharding.AxisType.Explicit not in mesh.axis_types:
        return fn
    spec = tuple(jax.typeof(x).sharding.spec)
    spec = spec + (None,) * (x.ndim - len(spec))
    return jax.sharding.auto_axes(fn, out_sharding=P(*spec[:-1], None))


def fp8_mode(cfg) -> Backend | None:
    """The FP8 backend a config asks for, or None when ``cfg.fp8`` is off."""
    return cfg.fp8_backend if cfg.fp8 else None


def fp8_linear(
    x: Float[Array, "... K"],
    w_KN: Float[Array, "K N"],
    *,
    backend: Backend = "xla",
    pow2: bool = False,
) -> Float[Array, "... N"]:
    """y = x W with FP8 Fprop, Dgrad and Wgrad (custom VJP in ``fp8_vjp.py``).

    Args:
      x: activations in the compute dtype (bf16 or fp32), any leading shape.
      w_KN: the FP32 master weight [in, out].
      backend: ``xla`` or ``pallas``. pow2: power-of-two scales.
    Returns:
      y in x's dtype; gradients: dx in x's dtype, dW in w's dtype (FP32).
    """

    def linear(x, w_KN):
        lead, K = x.shape[:-1], x.shape[-1]
        y = fp8_vjp.fp8_dot(x.reshape(1, math.prod(lead), K), w_KN[None], backend, pow2)
        return y.reshape(*lead, w_KN.shape[-1])

    return _auto_sharded(linear, x)(x, w_KN)


def fp8_swiglu(
    x: Float[Array, "... D"],
    w_gate_DF: Array,
    w_up_DF: Array,
    w_down_FD: Array,
    *,
    backend: Backend = "xla",
) -> Float[Array, "... D"]:
    """SwiGLU with its three GEMMs in FP8 (drop-in for ``layers.swiglu``)."""
    lin = lambda h, w: fp8_linear(h, w, backend=backend)  # noqa: E731
    return lin(jax.nn.silu(lin(x, w_gate_DF)) * lin(x, w_up_DF), w_down_FD)


def fp8_expert_ffn(
    x_ECD: Float[Array, "E C D"],
    w_gate_EDF: Array,
    w_up_EDF: Array,
    w_down_EFD: Array,
    *,
    backend: Backend = "xla",
) -> Float[Array, "E C D"]:
    """Every expert's SwiGLU over its slots in FP8 (drop-in for ``moe.experts.expert_ffn``).

    Each expert is one batch entry of the block-scaled GEMM: its own 128x128 weight blocks,
    its own 1x128 token tiles, and for Wgrad its own 128x1 tiles over its C slots.
    """

    def ffn(x_ECD, w_gate_EDF, w_up_EDF, w_down_EFD):
        lin = lambda h, w: fp8_vjp.fp8_dot(h, w, backend, False)  # noqa: E731
        h_ECF = jax.nn.silu(lin(x_ECD, w_gate_EDF)) * lin(x_ECD, w_up_EDF)
        return lin(h_ECF, w_down_EFD)

    return _auto_sharded(ffn, x_ECD)(x_ECD, w_gate_EDF, w_up_EDF, w_down_EFD)


def fp8_grouped_ffn(
    x_AD: Float[Array, "A D"],
    group_sizes_E: Int[Array, " E"],
    w_gate_EDF: Array,
    w_up_EDF: Array,
    w_down_EFD: Array,
    *,
    backend: Backend = "xla",
) -> Float[Array, "A D"]:
    """SwiGLU over rows sorted by expert in FP8 (drop-in for ``grouped_ffn_ragged``).

    The rows are laid out m-grouped contiguous (each expert's rows padded to a multiple
    of 128, DeepGEMM's layout) so every 128-row block belongs to one expert; Fprop and
    Dgrad run the grouped kernel, Wgrad sums per-block FP8 products per expert.
    """

    def ffn(x_AD, group_sizes_E, w_gate_EDF, w_up_EDF, w_down_EFD):
        A = x_AD.shape[0]
        row_P, group_ids_B = contiguous_layout(group_sizes_E, A)
        x_PD = jnp.take(x_AD, row_P, axis=0, mode="fill", fill_value=0)
        lin = lambda h, w: fp8_vjp.fp8_grouped_dot(h, w, group_ids_B, backend)  # noqa: E731
        h_PF = jax.nn.silu(lin(x_PD, w_gate_EDF)) * lin(x_PD, w_up_EDF)
        y_PD = lin(h_PF, w_down_EFD)
        # Each row sits at one padded position; padding positions (row_P == A) are dropped.
        return jnp.zeros((A + 1, y_PD.shape[1]), y_PD.dtype).at[row_P].set(y_PD)[:A]

    return _auto_sharded(ffn, x_AD)(x_AD, group_sizes_E, w_gate_EDF, w_up_EDF, w_down_EFD)


def contiguous_layout(
    group_sizes_E: Int[Array, " E"], rows: int
) -> tuple[Int[Array, " P"], Int[Array, " B"]]:
    """Padded positions of ``rows`` expert-sorted rows, each group padded to 128.

    Returns:
      row_P: source row of each padded position (``rows`` for padding), static
        P = 128 * (ceil(rows / 128) + E), enough for any group sizes.
      group_ids_B: the expert of each 128-row block (the last expert for unused blocks).
    """
    E = group_sizes_E.shape[0]
    B = _cdiv(rows, TILE) + E
    sizes = group_sizes_E.astype(jnp.int32)
    blocks_E = (sizes + TILE - 1) // TILE
    pstart_E = (jnp.cumsum(blocks_E) - blocks_E) * TILE
    start_E = jnp.cumsum(sizes) - sizes
    p = jnp.arange(B * TILE, dtype=jnp.int32)
    group_ids_B = jnp.minimum(
        jnp.searchsorted(jnp.cumsum(blocks_E), jnp.arange(B), side="right"), E - 1
    ).astype(jnp.int32)
    e_P = jnp.repeat(group_ids_B, TILE)
    local = p - pstart_E[e_P]
    valid = (local >= 0) & (local < sizes[e_P])
    row_P = jnp.where(valid, start_E[e_P] + local, rows)
    return row_P, group_ids_B
