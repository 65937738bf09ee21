"""The DeepSeek-V3 transformer: embedding, dense blocks, scanned MoE blocks, head, MTP.

Shape letters: B batch, T positions, D hidden, V vocab, K MTP depth (not experts per token),
L layers, E routed experts.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

import deepseek_jax.overlap as overlap
import deepseek_jax.sharding as sharding
from deepseek_jax.block import StackStats, run_blocks, scan_blocks_decode, stacked_blocks
from deepseek_jax.config import LAYER_LOOPS, ModelConfig
from deepseek_jax.layers import Embed, RMSNorm, matmul, param
from deepseek_jax.mla import LatentCache
from deepseek_jax.moe.routing import update_bias
from deepseek_jax.mtp import MTPModule, shift_left

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class ModelOutput(NamedTuple):
    logits_BTV: Float[Array, "B T V"]
    mtp_logits_KBTV: Float[Array, "K B T V"] | None  # K = MTP depth
    moe_stats: StackStats | None  # main model's MoE layers
    mtp_stats: StackStats | None  # the MTP modules' MoE layers, one row per depth


class ModelCache(NamedTuple):
    """Latent caches of the dense and MoE stacks, each with a leading layer axis."""

    dense: LatentCache | None
    moe: LatentCache | None


class Transformer(nnx.Module):
    def __init__(
        self, cfg: ModelConfig, *, rngs: nnx.Rngs, remat: str = "none", layer_loop: str = "auto"
    ):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat: unknown policy {remat!r}; choose from {list(REMAT_POLICIES)}")
        if layer_loop not in LAYER_LOOPS:
            raise ValueError(f"layer_loop: unknown {layer_loop!r}; choose from {list(LAYER_LOOPS)}")
        self.cfg = cfg
        self.remat = remat
        self.layer_loop = layer_loop
        self.dtype = jnp.dtype(cfg.run.dtype)
        std = cfg.initializer_range
        self.embed_tokens = Embed(
            cfg.vocab_size, cfg.hidden_size, std=std, dtype=self.dtype, rngs=rngs
        )
        k_dense, k_moe = cfg.first_k_dense_replace, cfg.num_moe_layers
        self.dense_layers = stacked_blocks(cfg, k_dense, moe=False, rngs=rngs) if k_dense else None
        self.moe_layers = stacked_blocks(cfg, k_moe, moe=True, rngs=rngs) if k_moe else None
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), std=std)
        self.mtp = nnx.List(
            [MTPModule(cfg, rngs=rngs) for _ in range(cfg.num_nextn_predict_layers)]
        )

    def head(self, x_BTD: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
        """Output head, float32 logits (the softmax is always float32)."""
        w = self.lm_head[...].astype(self.dtype)
        return matmul(x_BTD.astype(self.dtype), w, out_dtype=jnp.float32)

    def hidden(
        self, ids_BT: Int[Array, "B T"], positions_BT: Int[Array, "B T"], open_end: bool = False
    ) -> tuple[Float[Array, "B T D"], StackStats | None]:
        """Last hidden state before the final norm, and the MoE layers' statistics.
        ``open_end`` (overlap=dual_deferred): a third value, the last block's deferred combine(B)
        (``overlap.Pending``; None where there is none), left for ``overlap.finish``."""
        x_BTD = self.embed_tokens(ids_BT)
        run = functools.partial(
            run_blocks,
            positions_BT=positions_BT,
            remat_policy=REMAT_POLICIES[self.remat],
            remat=self.remat != "none",
            loop=self.layer_loop,
        )
        if self.dense_layers is not None:
            with jax.named_scope("dense_layers"):
                x_BTD, _ = run(self.dense_layers, x_BTD)
        stats, pending = None, None
        if self.moe_layers is not None:
            with jax.named_scope("moe_layers"):
                x_BTD, stats, *pending = run(self.moe_layers, x_BTD, open_end=open_end)
            pending = pending[0] if pending else None
        return (x_BTD, stats, pending) if open_end else (x_BTD, stats)

    def __call__(
        self, ids_BT: Int[Array, "B T"], positions_BT: Int[Array, "B T"] | None = None
    ) -> ModelOutput:
        ids_BT = sharding.constrain(ids_BT, ("batch", None))
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(ids_BT.shape[1]), ids_BT.shape)
            positions_BT = sharding.constrain(positions_BT, ("batch", None))
        h_BTD, stats, pending = self.hidden(ids_BT, positions_BT, open_end=True)
        if pending is None:
            hn_BTD = self.norm(h_BTD)
            logits_BTV = self.head(hn_BTD)
        else:  # the last block's combine(B) beside half A's norm and head
            normed = lambda x: (hn := self.norm(x), self.head(hn))  # noqa: E731
            hn_BTD, logits_BTV = overlap.finish(self.moe_layers.mlp, h_BTD, pending, normed)
        mtp_logits, mtp_stats = self._mtp(ids_BT, positions_BT, hn_BTD)
        return ModelOutput(logits_BTV, mtp_logits, stats, mtp_stats)

    def init_cache(self, batch: int, max_len: int) -> ModelCache:
        """Zeroed latent caches for every block: (kv_lora_rank + rope dim) values per token."""

        def stack(n):
            one = LatentCache.init(batch, max_len, self.cfg, self.dtype)
            return jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), one) if n else None

        return ModelCache(stack(self.cfg.first_k_dense_replace), stack(self.cfg.num_moe_layers))

    def decode(
        self,
        ids_BT: Int[Array, "B T"],
        cache: ModelCache,
        cache_index: Int[Array, ""],
    ) -> tuple[Float[Array, "B T V"], ModelCache]:
        """Logits of T new tokens at positions ``cache_index ..``, through the latent cache.

        Prefill (T = prompt length) and token-by-token decode (T = 1) share this path.
        """
        positions_BT = cache_index + jnp.broadcast_to(jnp.arange(ids_BT.shape[1]), ids_BT.shape)
        x_BTD = self.embed_tokens(ids_BT)
        dense, moe = cache.dense, cache.moe
        if self.dense_layers is not None:
            x_BTD, dense = scan_blocks_decode(
                self.dense_layers, x_BTD, positions_BT, dense, cache_index
            )
        if self.moe_layers is not None:
            x_BTD, moe = scan_blocks_decode(self.moe_layers, x_BTD, positions_BT, moe, cache_index)
        return self.head(self.norm(x_BTD)), ModelCache(dense, moe)

    def update_routing_bias(
        self, moe_stats: StackStats | None, mtp_stats: StackStats | None, gamma: float
    ) -> None:
        """Aux-loss-free balancing: move every MoE layer's bias by its expert load."""
        if not self.cfg.has_routing_bias:
            return
        step = jax.vmap(lambda b, load: update_bias(b, load, gamma))
        if moe_stats is not None:
            bias = self.moe_layers.mlp.e_score_correction_bias
            # the load may be laid out otherwise (gathered layers, pipeline stages)
            bias[...] = step(bias[...], sharding.like(moe_stats.load_LE, bias[...]))
        for k, module in enumerate(self.mtp):
            bias = module.block.mlp.e_score_correction_bias
            bias[...] = update_bias(bias[...], mtp_stats.load_LE[k], gamma)

    def _mtp(self, ids_BT, positions_BT, h_BTD):
        """MTP depths; ``h_BTD`` is the final-normed hidden state, and each depth passes on its
        normed output (as transformers' ``MtpModel`` and vLLM feed the released weights)."""
        if not len(self.mtp):
            return None, None
        logits, loads, losses, dropped = [], [], [], []
        with jax.named_scope("mtp"):
            for k, module in enumerate(self.mtp, start=1):
                emb_BTD = self.embed_tokens(shift_left(ids_BT, k))
                h_BTD, logits_BTV, st = module(h_BTD, emb_BTD, positions_BT, self.head)
                logits.append(logits_BTV)
                loads.append(st.load_E)
                losses.append(st.balance_loss)
                dropped.append(st.dropped)
        return jnp.stack(logits), StackStats(
            jnp.stack(loads), jnp.stack(losses), jnp.stack(dropped)
        )
