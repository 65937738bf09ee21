"""Named model configs, each derived from the one above it with ``dataclasses.replace``, so
a preset lists only what makes it differ: V3 (the defaults) -> V2; V3 -> bench-small (a
16-expert, 6-layer model for benchmarks) -> small -> tiny (the test model)."""

from __future__ import annotations

import dataclasses

from deepseek_jax.config import ModelConfig, RopeScaling

V3_671B = ModelConfig()

V2_236B = dataclasses.replace(
    V3_671B,
    vocab_size=102400,
    hidden_size=5120,
    intermediate_size=12288,
    moe_intermediate_size=1536,
    num_hidden_layers=60,
    first_k_dense_replace=1,
    n_routed_experts=160,
    n_shared_experts=2,
    num_experts_per_tok=6,
    topk_group=3,
    routed_scaling_factor=16.0,
    norm_topk_prob=False,
    scoring_func="softmax",
    topk_method="group_limited_greedy",
    num_nextn_predict_layers=0,
    initializer_range=0.02,
    rope_scaling=dataclasses.replace(V3_671B.rope_scaling, mscale=0.707, mscale_all_dim=0.707),
)

# V3's routing (sigmoid, noaux_tc, 2.5 scaling, one shared expert, one MTP module) on 16
# experts in 4 groups, top-4 within 2 groups; no YaRN.
BENCH_SMALL = dataclasses.replace(
    V3_671B,
    vocab_size=4096,
    hidden_size=512,
    num_hidden_layers=6,
    first_k_dense_replace=1,
    num_attention_heads=8,
    q_lora_rank=192,
    kv_lora_rank=128,
    qk_rope_head_dim=32,
    qk_nope_head_dim=64,
    v_head_dim=64,
    intermediate_size=1408,
    moe_intermediate_size=256,
    n_routed_experts=16,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    max_position_embeddings=4096,
    rope_scaling=None,
    initializer_range=0.02,
)

# The widths a smaller preset divides: hidden, MLA ranks and head dims, FFN widths.
_WIDTHS = (
    "hidden_size",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_rope_head_dim",
    "qk_nope_head_dim",
    "v_head_dim",
    "intermediate_size",
    "moe_intermediate_size",
)


def _narrowed(base: ModelConfig, by: int, **changes) -> ModelConfig:
    """``base`` with every width of ``_WIDTHS`` divided by ``by``, then ``changes``."""
    widths = {f: getattr(base, f) // by for f in _WIDTHS}
    return dataclasses.replace(base, **{**widths, **changes})


# bench-small at half the width (and context), 4 heads and 4 layers.
SMALL = _narrowed(
    BENCH_SMALL, 2, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=2048
)

# small with head dims halved again, the rest narrower still; 8 experts of which 2 per
# token, with YaRN on (factor 4).
TINY = _narrowed(
    SMALL,
    2,
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=3,
    q_lora_rank=32,
    kv_lora_rank=16,
    intermediate_size=128,
    moe_intermediate_size=32,
    n_routed_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=512,
    rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=128),
)

PRESETS: dict[str, ModelConfig] = {
    "tiny": TINY,
    "small": SMALL,
    "bench-small": BENCH_SMALL,
    "v2-236b": V2_236B,
    "v3-671b": V3_671B,
}


def get_preset(
    name: str, overrides: dict[str, str] | list[str] | tuple[str, ...] = ()
) -> ModelConfig:
    """Returns preset ``name`` with ``key=value`` overrides applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].with_overrides(overrides) if overrides else PRESETS[name]
