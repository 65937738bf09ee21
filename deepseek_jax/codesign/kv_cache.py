"""KV-cache bytes per token (ISCA 2025, Table 1).

MLA caches only the normalised latent c_kv and the shared RoPE key per layer:
(kv_lora_rank + qk_rope_head_dim) values. A GQA model caches K and V for each KV head:
2 x kv_heads x head_dim; MHA is GQA with kv_heads = heads. All counted over all layers at
``bytes_per_value`` (BF16: 2). Ignored: cache paging / alignment, and MTP's extra layer.
"""

from __future__ import annotations

from deepseek_jax.codesign.dense_models import DENSE_MODELS, DenseModel
from deepseek_jax.config import ModelConfig


def mla_kv_bytes_per_token(cfg: ModelConfig, bytes_per_value: int = 2) -> int:
    """The latent cache: (kv_lora_rank + qk_rope_head_dim) x layers x bytes."""
    return (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * bytes_per_value


def gqa_kv_bytes_per_token(
    kv_heads: int, head_dim: int, layers: int, bytes_per_value: int = 2
) -> int:
    """K and V per KV head: 2 x kv_heads x head_dim x layers x bytes."""
    return 2 * kv_heads * head_dim * layers * bytes_per_value


def mha_kv_bytes_per_token(cfg: ModelConfig, bytes_per_value: int = 2) -> int:
    """What ``cfg`` would cache without MLA: full K (nope + rope) and V for every head."""
    per_head = cfg.qk_head_dim + cfg.v_head_dim
    return cfg.num_attention_heads * per_head * cfg.num_hidden_layers * bytes_per_value


def dense_kv_bytes_per_token(model: DenseModel, bytes_per_value: int = 2) -> int:
    return gqa_kv_bytes_per_token(
        model.num_key_value_heads, model.head_dim, model.num_hidden_layers, bytes_per_value
    )


def kv_cache_bytes(bytes_per_token: int, context_len: int, batch: int = 1) -> int:
    """Whole-cache bytes for ``batch`` sequences of ``context_len`` tokens (the
    mla_memory notebook's cache-against-context plot)."""
    return bytes_per_token * context_len * batch


# Published GQA shapes, for the comparison rows of ISCA Table 1.
GQA_MODELS = {
    name: dict(kv_heads=m.num_key_value_heads, head_dim=m.head_dim, layers=m.num_hidden_layers)
    for name, m in DENSE_MODELS.items()
}
