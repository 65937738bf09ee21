"""Multi-token prediction (DeepSeek-V3 report, section 2.2).

Module k (1-based) predicts token t_{i+k+1} at position i from the previous depth's hidden
state h^{k-1}_i and the embedding of t_{i+k}:
    h'_i = W_eh [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)],  h^k = Block(h'),
    logits = Head(RMSNorm(h^k)).
Embedding and head are shared with the main model; each module has its own norms,
projection and transformer block. The concatenation order (embedding first) follows the
released checkpoints' ``eh_proj`` layout. h^0 is the main model's last hidden state *after*
its final norm, and depth k > 1 gets depth k-1's normed output (``shared_head.norm``): that
is how transformers' ``MtpModel`` and vLLM run the released MTP weights (our golden MTP
logits come from the former). Causality holds: position i sees tokens up to i+k, all of
them inputs.

Shape letters: B batch, T positions, D hidden, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

import deepseek_jax.overlap as overlap
from deepseek_jax.block import Block
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import RMSNorm, matmul, param
from deepseek_jax.moe.layer import MoEStats


class MTPModule(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.dtype = jnp.dtype(cfg.run.dtype)
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
        self.eh_proj = param(rngs, (2 * d, d), (None, "embed"), std=cfg.initializer_range)
        self.block = Block(cfg, moe=True, rngs=rngs)
        self.norm = RMSNorm(d, cfg.rms_norm_eps)  # HF: shared_head.norm

    def __call__(
        self,
        h_BTD: Float[Array, "B T D"],
        emb_BTD: Float[Array, "B T D"],
        positions_BT: Int[Array, "B T"],
        head: Callable[[Array], Float[Array, "B T V"]],
    ) -> tuple[Float[Array, "B T D"], Float[Array, "B T V"], MoEStats | None]:
        """Returns (normalised h^k, ``head`` of it: the logits, MoE stats). Under
        ``overlap=dual_deferred`` the block leaves half B's combine undone and it runs beside
        half A's norm and head (``overlap.finish``), as the main stack's last block does."""
        cat = jnp.concatenate([self.enorm(emb_BTD), self.hnorm(h_BTD)], axis=-1)
        x_BTD = matmul(cat.astype(self.dtype), self.eh_proj[...].astype(self.dtype))
        normed = lambda x: (hn := self.norm(x), head(hn))  # noqa: E731
        block = self.block
        if block._dual(x_BTD.shape[0]) and block.mlp.cfg.run.overlap == "dual_deferred":
            with jax.named_scope("dual_overlap"):
                x_BTD, stats, pending = overlap.dual_block(block, x_BTD, positions_BT, defer=True)
                hn_BTD, logits_BTV = overlap.finish(block.mlp, x_BTD, pending, normed)
            return hn_BTD, logits_BTV, stats
        x_BTD, stats = block(x_BTD, positions_BT)
        return *normed(x_BTD), stats


def shift_left(ids_BT: Int[Array, "B T"], k: int, fill: int = 0) -> Int[Array, "B T"]:
    """ids[:, i+k] at position i; the last k positions get ``fill`` (and are masked in losses)."""
    if k == 0:
        return ids_BT
    keep_T = jnp.arange(ids_BT.shape[1]) < ids_BT.shape[1] - k  # roll keeps the batch sharding
    return jnp.where(keep_T[None, :], jnp.roll(ids_BT, -k, axis=1), fill).astype(ids_BT.dtype)


def mtp_targets(ids_BT: Int[Array, "B T"], depth: int) -> tuple[Int[Array, "B T"], Array]:
    """Targets of MTP module ``depth`` (t_{i+depth+1}) and the mask of valid positions."""
    t = ids_BT.shape[1]
    valid_T = jnp.arange(t) < t - depth - 1
    return shift_left(ids_BT, depth + 1), jnp.broadcast_to(valid_T, ids_BT.shape)
