"""The official DeepSeek-V3 FP8 weight format: e4m3 values, one scale per 128x128 block.

Design note
-----------
*Release format* (V3TR section 3.3.2; the official ``inference/kernel.py``
``weight_dequant``). Each large linear's weight ``W[out, in]`` is stored as
``float8_e4m3fn`` together with ``weight_scale_inv[ceil(out/128), ceil(in/128)]``
(float32): the real weight is ``W[i, j] = q[i, j] * scale_inv[i // 128, j // 128]``. Edge
blocks are partial when a dimension is not a multiple of 128; their scale covers only the
rows/columns that exist. ``config.json`` says so in ``quantization_config``
(``quant_method: fp8``, ``fmt: e4m3``, ``weight_block_size: [128, 128]``).

*What we do.* Dequantise on load, one tensor at a time on the host, in float32 (exact:
an e4m3 value times a float32 scale is representable up to float32 rounding of the
product, the same product the reference kernel forms). Our parameters are float32 master
weights, so an FP8 checkpoint becomes an ordinary model (FP8 training is a separate
matter). ``quantize_blocks`` is the inverse, for tests and FP8 exports: the package's one
quantiser (``fp8_quant.quantize_blocks``, its floor and clip policy) run on the host CPU.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

import deepseek_jax.fp8_quant as fp8_quant


def _expand(scale: np.ndarray, shape: tuple[int, ...], block: tuple[int, int]) -> np.ndarray:
    """Block scales [..., ceil(R/br), ceil(C/bc)] -> per-element [..., R, C] (edges cut)."""
    br, bc = block
    full = np.repeat(np.repeat(scale, br, axis=-2), bc, axis=-1)
    return full[..., : shape[-2], : shape[-1]]


def check_scale_shape(
    name: str, weight_shape: tuple[int, ...], scale_shape: tuple[int, ...], block: tuple[int, int]
) -> None:
    """Raises naming the tensor when ``scale_inv`` does not tile ``weight`` by ``block``."""
    want = (
        *weight_shape[:-2],
        math.ceil(weight_shape[-2] / block[0]),
        math.ceil(weight_shape[-1] / block[1]),
    )
    if tuple(scale_shape) != want:
        raise ValueError(
            f"tensor {name}_scale_inv: expected shape {list(want)} for a "
            f"{list(weight_shape)} weight in {block[0]}x{block[1]} blocks, "
            f"found {list(scale_shape)}"
        )


def dequantize_blocks(
    q: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int] = (128, 128)
) -> np.ndarray:
    """float32 weights from block-quantised ``q[..., R, C]`` and ``scale_inv[..., R/br, C/bc]``."""
    return q.astype(np.float32) * _expand(scale_inv.astype(np.float32), q.shape, block)


def quantize_blocks(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(e4m3 values, float32 ``scale_inv``) in the release's 128x128 blocks, each block's
    max magnitude mapped to 448."""
    with jax.default_device(jax.devices("cpu")[0]):
        q, s = fp8_quant.quantize_blocks(jnp.asarray(w, jnp.float32))
    return np.asarray(q), np.asarray(s)
