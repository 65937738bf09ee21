"""KV-cache bytes per token (ISCA 2025, Table 1).

MLA caches only the normalised latent c_kv and the shared RoPE key per layer:
(kv_lora_rank + qk_rope_head_dim) values. A GQA model caches K and V for each KV head:
2 x kv_heads x head_dim. Both counted over all layers at ``bytes_per_value`` (BF16: 2).
"""

from __future__ import annotations

from deepseek_jax.config import ModelConfig


def mla_kv_bytes_per_token(cfg: ModelConfig, bytes_per_value: int = 2) -> int:
    return (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * bytes_per_value


def gqa_kv_bytes_per_token(kv_heads: int, head_dim: int, layers: int,
                           bytes_per_value: int = 2) -> int:
    return 2 * kv_heads * head_dim * layers * bytes_per_value


# Published GQA shapes, for the comparison rows of ISCA Table 1.
GQA_MODELS = {
    "Qwen-2.5 72B": dict(kv_heads=8, head_dim=128, layers=80),
    "LLaMA-3.1 405B": dict(kv_heads=8, head_dim=128, layers=126),
}
