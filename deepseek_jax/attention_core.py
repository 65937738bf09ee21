"""Plain-jnp attention pieces that several paths share: the masked float32 softmax and MLA's
attention over the shared latent (all heads against one [c_kv; k_rope] per position). Pure
functions of arrays only (no config, no backends), so the jnp twins of the Pallas decode
kernel and the paged engine, and the XLA causal core, can all use them.

Shape letters: B batch, T query positions, S key positions, H heads, C kv_lora_rank, R rope
head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float


def masked_softmax(scores: Float[Array, "*b S"], visible: Bool[Array, "*b S"], dtype) -> Array:
    """Softmax over the last axis of the positions ``visible`` (broadcast against
    ``scores``), in ``dtype``; every row must see at least one key (else NaN)."""
    return jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1).astype(dtype)


def latent_attention(
    qlat_BTHC: Float[Array, "B T H C"],
    qrope_BTHR: Float[Array, "B T H R"],
    ckv_BSC: Float[Array, "B S C"],
    krope_BSR: Float[Array, "B S R"],
    visible_BTS: Bool[Array, "B T S"],
    scale: float,
) -> Float[Array, "B T H C"]:
    """softmax(scale (q_lat c^T + q_rope k_rope^T)) c over the ``visible`` keys: float32
    scores and softmax, the probabilities and output in ``ckv_BSC``'s dtype."""
    f32 = jnp.float32
    scores_BTHS = (
        jnp.einsum("bthc,bsc->bths", qlat_BTHC, ckv_BSC, preferred_element_type=f32)
        + jnp.einsum("bthr,bsr->bths", qrope_BTHR, krope_BSR, preferred_element_type=f32)
    ) * scale
    probs_BTHS = masked_softmax(scores_BTHS, visible_BTS[:, :, None, :], ckv_BSC.dtype)
    return jnp.einsum("bths,bsc->bthc", probs_BTHS, ckv_BSC)
