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
interpret mode elsewhere). The FP8 dispatch payload (``moe/payload.py``) uses the same
1x128 tiles and scale policy (FP32 scales, not powers of two); ``pow2=True`` is kept only
for comparison. E5M2 and delayed scaling are not used.

*Modules, bottom up* (imports form a DAG): ``fp8_quant.py`` (the one tile quantiser and
its constants), ``fp8_gemm.py`` (block-scaled GEMMs), ``fp8_vjp.py`` (the custom VJPs),
this file (the FP8 linears the model calls).

Shape letters: K in and N out features of one linear (not experts per token / nope dim), D
hidden, F FFN width, E experts, C capacity slots per expert, A rows sorted by expert, P
their padded positions, B 128-row blocks.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int

import deepseek_jax.backends as backends
import deepseek_jax.fp8_vjp as fp8_vjp
from deepseek_jax.config import Fp8Backend
from deepseek_jax.fp8_gemm import contiguous_layout


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


def fp8_mode(cfg) -> Fp8Backend | None:
    """The FP8 backend a config asks for (``auto`` decided by ``backends``), or None when
    ``cfg.run.fp8`` is off."""
    return backends.pallas_kernel("fp8_gemm", cfg.run.fp8_backend) if cfg.run.fp8 else None


def fp8_linear(
    x: Float[Array, "... K"],
    w_KN: Float[Array, "K N"],
    *,
    backend: Fp8Backend = "xla",
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
    backend: Fp8Backend = "xla",
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
    backend: Fp8Backend = "xla",
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
    backend: Fp8Backend = "xla",
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
