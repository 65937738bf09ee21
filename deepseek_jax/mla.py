"""Multi-head Latent Attention (MLA): a training/prefill path and an absorbed decode path.

Design note
-----------
*Paper* (DeepSeek-V2 arXiv 2405.04434 section 2.1; V3TR arXiv 2412.19437 section 2.1.1).
Keys and values are compressed into one latent per token, ``c_kv = RMSNorm(x W_dkv)``
(C = 512), from which each head's keys and values are up-projected, ``k_nope = c_kv W_uk``,
``v = c_kv W_uv`` (V2 eq. 9-11). RoPE is incompatible with that compression (the rotation
would sit between W_uk and the query), so a separate decoupled key ``k_rope = RoPE(x W_kr)``
(R = 64) is *shared by all heads* (eq. 14-17); queries get per-head rope parts from their
own latent ``c_q = RMSNorm(x W_dq)`` (eq. 12-13). Scores are
``(q_nope . k_nope + q_rope . k_rope) / sqrt(N + R)`` times YaRN's temperature
(``layers/rope.py``). At inference W_uk can be absorbed into the query and W_uv into the
output (V2 section 2.1.2): ``q_nope . (W_uk c) = (W_uk^T q_nope) . c``, so only
``c_kv`` and ``k_rope`` are cached, (512 + 64) values per token per layer.

*What we do.* ``mla_naive`` is the training/prefill path: it materialises per-head
``k_nope`` and ``v`` for the T positions and runs causal attention over them.
``mla_absorbed`` is the decode path over a ``LatentCache``: the query is mapped into the
latent space (``q_lat = q_nope W_uk^T``, [B, T, H, C]), scores are taken directly against
cached latents, the probability-weighted latent is mapped back with W_uv, then ``o_proj``.
It writes T new entries at ``cache_index`` (T = 1: one decode step; T > 1: prefill into
the cache). The two paths agree to float32 rounding on every position (tests/test_mla.py),
the "slow twin" of the fast path.

*What we simplify.* Attention is plain ``einsum`` + float32 softmax on accelerators (no
flash/paged kernel; on CPU a fused C++ kernel, ``cpu_kernels/attention.py``); the cache
is one dense [B, S_max] buffer with a single write index shared by the batch; the naive
path's causal mask is by index within the T positions (``positions`` only drive RoPE).
No tensor parallelism: heads stay whole, activations are batch sharded.

Weight layout (HF names; [in, ..., out], float32, cast to ``cfg.run.dtype`` at use): see
``MLA.__init__``. The rope channels are in the checkpoints' interleaved-pair order
(``layers/rope.py``).

Shape letters (STYLE's list): B batch, T query positions, S key positions, D hidden, H
heads, Q q_lora_rank, C kv_lora_rank, N nope head dim, R rope head dim, O v head dim, K = N
+ R.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

import deepseek_jax.sharding as sharding
from deepseek_jax.attention_core import latent_attention
from deepseek_jax.causal_attention import causal_attend
from deepseek_jax.config import ModelConfig
from deepseek_jax.fp8 import fp8_linear, fp8_mode
from deepseek_jax.layers.basic import matmul, param, rms_norm
from deepseek_jax.layers.rope import apply_rope, rope_cos_sin, softmax_scale

Weights = Mapping[str, Array]


# ---------------------------------------------------------------------------- cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LatentCache:
    """Per-layer MLA cache: the normalised latent and the RoPE'd shared key.

    ``krope_BSR`` is in the half-split rope layout that ``apply_rope`` outputs.
    """

    ckv_BSC: Float[Array, "B S C"]
    krope_BSR: Float[Array, "B S R"]

    NAMES = {"ckv_BSC": ("batch", "seq", "kv_lora"), "krope_BSR": ("batch", "seq", "head_dim")}

    @classmethod
    def init(
        cls, batch: int, max_len: int, cfg: ModelConfig, dtype: jnp.dtype = jnp.float32
    ) -> LatentCache:
        """Zeros, batch-sharded when a mesh is set."""

        def zeros(name: str, dim: int) -> Array:
            shape = (batch, max_len, dim)
            return jnp.zeros(shape, dtype, out_sharding=sharding.spec(cls.NAMES[name]))

        return cls(zeros("ckv_BSC", cfg.kv_lora_rank), zeros("krope_BSR", cfg.qk_rope_head_dim))

    @property
    def max_len(self) -> int:
        return self.ckv_BSC.shape[1]

    def write(
        self,
        ckv_BTC: Float[Array, "B T C"],
        krope_BTR: Float[Array, "B T R"],
        index: Int[Array, ""] | int,
    ) -> LatentCache:
        """Stores T new entries at slots ``index .. index + T - 1``."""
        put = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
            buf, new.astype(buf.dtype), index, axis=1
        )
        return LatentCache(put(self.ckv_BSC, ckv_BTC), put(self.krope_BSR, krope_BTR))


# ---------------------------------------------------------------------------- pure core


def _cast(w: Weights, name: str, dtype: jnp.dtype) -> Array:
    return w[name].astype(dtype)


def _proj(spec: str, x: Array, w: Weights, name: str, cfg: ModelConfig) -> Array:
    """``einsum(spec, x, w[name])`` as one 2-D GEMM (``layers.matmul``); with ``cfg.run.fp8``
    an FP8 linear on the flattened weight.

    The weight's leading axes are the contracted ones (x's trailing axes), e.g.
    ``"btho,hod->btd"``.
    """
    n_in = len(set(spec.split(",")[0]) & set(spec.split(",")[1].split("->")[0]))
    if not cfg.run.fp8:
        return matmul(x, _cast(w, name, x.dtype), n_in)
    return matmul(x, w[name], n_in, dot=functools.partial(fp8_linear, backend=fp8_mode(cfg)))


def mla_queries(
    w: Weights, x_BTD: Float[Array, "B T D"], cos_BTR: Array, sin_BTR: Array, cfg: ModelConfig
) -> tuple[Float[Array, "B T H N"], Float[Array, "B T H R"]]:
    """Per-head queries: (q_nope, RoPE'd q_rope), from the query latent when q_lora_rank is set."""
    if cfg.q_lora_rank is None:
        q_BTHK = _proj("btd,dhk->bthk", x_BTD, w, "q_proj", cfg)
    else:
        cq_BTQ = rms_norm(
            _proj("btd,dq->btq", x_BTD, w, "q_a_proj", cfg), w["q_a_layernorm"], cfg.rms_norm_eps
        )
        q_BTHK = _proj("btq,qhk->bthk", cq_BTQ, w, "q_b_proj", cfg)
    qnope_BTHN, qrope_BTHR = jnp.split(q_BTHK, [cfg.qk_nope_head_dim], axis=-1)
    return qnope_BTHN, apply_rope(qrope_BTHR, cos_BTR, sin_BTR)


def mla_latent_kv(
    w: Weights, x_BTD: Float[Array, "B T D"], cos_BTR: Array, sin_BTR: Array, cfg: ModelConfig
) -> tuple[Float[Array, "B T C"], Float[Array, "B T R"]]:
    """What the cache stores: normalised latent c_kv and the RoPE'd key shared by all heads."""
    ckv_BTC, krope_BTR = jnp.split(
        _proj("btd,dc->btc", x_BTD, w, "kv_a_proj_with_mqa", cfg), [cfg.kv_lora_rank], axis=-1
    )
    ckv_BTC = rms_norm(ckv_BTC, w["kv_a_layernorm"], cfg.rms_norm_eps)
    return ckv_BTC, apply_rope(krope_BTR, cos_BTR, sin_BTR)


def _out_proj(
    w: Weights, out_BTHO: Float[Array, "B T H O"], cfg: ModelConfig
) -> Float[Array, "B T D"]:
    return _proj("btho,hod->btd", out_BTHO, w, "o_proj", cfg)


def mla_naive(
    w: Weights, x_BTD: Float[Array, "B T D"], positions_BT: Int[Array, "B T"], cfg: ModelConfig
) -> Float[Array, "B T D"]:
    """Causal MLA over the T positions, per-head keys/values materialised (training, prefill).

    Args:
      w: float32 weights by HF name (``MLA.weights()``).
      x_BTD: inputs; computed in ``cfg.run.dtype``.
      positions_BT: RoPE positions; causality is by index along T.
    Returns:
      y_BTD in ``cfg.run.dtype``.
    """
    dt = jnp.dtype(cfg.run.dtype)
    x_BTD = x_BTD.astype(dt)
    cos_BTR, sin_BTR = rope_cos_sin(positions_BT, cfg)
    with jax.named_scope("mla_q"):
        qnope_BTHN, qrope_BTHR = mla_queries(w, x_BTD, cos_BTR, sin_BTR, cfg)
    with jax.named_scope("mla_kv"):
        ckv_BSC, krope_BSR = mla_latent_kv(w, x_BTD, cos_BTR, sin_BTR, cfg)
        kv_BSHK = _proj("bsc,chk->bshk", ckv_BSC, w, "kv_b_proj", cfg)
        knope_BSHN, v_BSHO = jnp.split(kv_BSHK, [cfg.qk_nope_head_dim], axis=-1)
    with jax.named_scope("mla_attend"):
        out_BTHO = causal_attend(qnope_BTHN, qrope_BTHR, knope_BSHN, krope_BSR, v_BSHO, cfg)
    with jax.named_scope("mla_out"):
        return _out_proj(w, out_BTHO, cfg)


def mla_absorbed(
    w: Weights,
    x_BTD: Float[Array, "B T D"],
    positions_BT: Int[Array, "B T"],
    cache: LatentCache,
    cache_index: Int[Array, ""] | int,
    cfg: ModelConfig,
) -> tuple[Float[Array, "B T D"], LatentCache]:
    """MLA over the latent cache with W_uk absorbed into the query, W_uv into the output.

    Args:
      w: float32 weights by HF name.
      x_BTD: the T new tokens (T = 1 for a decode step).
      positions_BT: their RoPE positions.
      cache: entries for slots < cache_index are the earlier tokens.
      cache_index: slot of the first new token; query t sees slots <= cache_index + t.
    Returns:
      (y_BTD in ``cfg.run.dtype``, the cache with the T new entries written).
    """
    dt = jnp.dtype(cfg.run.dtype)
    x_BTD = x_BTD.astype(dt)
    cos_BTR, sin_BTR = rope_cos_sin(positions_BT, cfg)
    wuk_CHN, wuv_CHO = jnp.split(_cast(w, "kv_b_proj", dt), [cfg.qk_nope_head_dim], axis=-1)
    with jax.named_scope("mla_q"):
        qnope_BTHN, qrope_BTHR = mla_queries(w, x_BTD, cos_BTR, sin_BTR, cfg)
        qlat_BTHC = jnp.einsum("bthn,chn->bthc", qnope_BTHN, wuk_CHN)  # V2 2.1.2: absorb W_uk
    with jax.named_scope("mla_cache_write"):
        cache = cache.write(*mla_latent_kv(w, x_BTD, cos_BTR, sin_BTR, cfg), cache_index)
        ckv_BSC, krope_BSR = cache.ckv_BSC.astype(dt), cache.krope_BSR.astype(dt)
    with jax.named_scope("mla_attend_latent"):
        T, S = x_BTD.shape[1], cache.max_len
        visible_TS = jnp.arange(S)[None, :] <= (cache_index + jnp.arange(T))[:, None]
        visible_BTS = jnp.broadcast_to(visible_TS, (x_BTD.shape[0], T, S))
        olat_BTHC = latent_attention(
            qlat_BTHC, qrope_BTHR, ckv_BSC, krope_BSR, visible_BTS, softmax_scale(cfg)
        )
    with jax.named_scope("mla_out"):
        out_BTHO = jnp.einsum("bthc,cho->btho", olat_BTHC, wuv_CHO)  # absorb W_uv
        return _out_proj(w, out_BTHO, cfg), cache


# ---------------------------------------------------------------------------- module


class MLA(nnx.Module):
    """MLA parameters (HF names) and the two entry points: ``__call__`` and ``decode``.

    Shapes (D hidden, Q q_lora_rank, C kv_lora_rank, H heads, N/R/O nope/rope/v head dims):
      q_a_proj [D, Q], q_a_layernorm [Q], q_b_proj [Q, H, N+R]   (q_lora_rank set)
      q_proj [D, H, N+R]                                          (q_lora_rank None)
      kv_a_proj_with_mqa [D, C+R], kv_a_layernorm [C], kv_b_proj [C, H, N+O], o_proj [H, O, D]
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D, Q, C = cfg.hidden_size, cfg.q_lora_rank, cfg.kv_lora_rank
        H, N, R, O = (
            cfg.num_attention_heads,
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
        )
        std = cfg.initializer_range
        if Q is None:
            self.q_proj = param(rngs, (D, H, N + R), ("embed", "heads", "head_dim"), std=std)
        else:
            self.q_a_proj = param(rngs, (D, Q), ("embed", "q_lora"), std=std)
            self.q_a_layernorm = param(None, (Q,), ("q_lora",), value=1.0)
            self.q_b_proj = param(rngs, (Q, H, N + R), ("q_lora", "heads", "head_dim"), std=std)
        self.kv_a_proj_with_mqa = param(rngs, (D, C + R), ("embed", "kv_lora"), std=std)
        self.kv_a_layernorm = param(None, (C,), ("kv_lora",), value=1.0)
        self.kv_b_proj = param(rngs, (C, H, N + O), ("kv_lora", "heads", "head_dim"), std=std)
        self.o_proj = param(rngs, (H, O, D), ("heads", "head_dim", "embed"), std=std)

    def weights(self) -> dict[str, Array]:
        """The float32 parameter arrays by HF name, for the pure functions."""
        names = (
            "q_proj",
            "q_a_proj",
            "q_a_layernorm",
            "q_b_proj",
            "kv_a_proj_with_mqa",
            "kv_a_layernorm",
            "kv_b_proj",
            "o_proj",
        )
        return {n: getattr(self, n)[...] for n in names if hasattr(self, n)}

    def __call__(
        self, x_BTD: Float[Array, "B T D"], positions_BT: Int[Array, "B T"]
    ) -> Float[Array, "B T D"]:
        """Causal attention over the T positions (training / prefill without a cache)."""
        with jax.named_scope("mla"):
            return mla_naive(self.weights(), x_BTD, positions_BT, self.cfg)

    def decode(
        self,
        x_BTD: Float[Array, "B T D"],
        positions_BT: Int[Array, "B T"],
        cache: LatentCache,
        cache_index: Int[Array, ""] | int,
    ) -> tuple[Float[Array, "B T D"], LatentCache]:
        """Absorbed attention over ``cache``, writing the T new entries at ``cache_index``."""
        with jax.named_scope("mla_decode"):
            return mla_absorbed(self.weights(), x_BTD, positions_BT, cache, cache_index, self.cfg)
