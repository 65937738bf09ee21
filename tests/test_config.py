"""Config: presets validate, overrides are typed, bad values name the field and the rule."""

import dataclasses
import json

import pytest

from deepseek_jax.config import RUN_ALIASES, RUN_OPTION_FIELDS, EPOptions, ModelConfig, RopeScaling
from deepseek_jax.interop.hf_config import config_from_hf
from deepseek_jax.presets import PRESETS, get_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate(name):
    cfg = get_preset(name)
    assert dataclasses.replace(cfg) == cfg  # re-runs __post_init__


def test_bench_small_is_exact():
    c = get_preset("bench-small")
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.first_k_dense_replace) == (
        4096,
        512,
        6,
        1,
    )
    assert (c.num_attention_heads, c.q_lora_rank, c.kv_lora_rank) == (8, 192, 128)
    assert (c.qk_rope_head_dim, c.qk_nope_head_dim, c.v_head_dim) == (32, 64, 64)
    assert (c.intermediate_size, c.moe_intermediate_size) == (1408, 256)
    assert (c.n_routed_experts, c.n_shared_experts, c.num_experts_per_tok) == (16, 1, 4)
    assert (c.n_group, c.topk_group, c.routed_scaling_factor) == (4, 2, 2.5)
    assert (c.num_nextn_predict_layers, c.max_position_embeddings) == (1, 4096)


def test_v3_preset_matches_reference():
    c = get_preset("v3-671b")
    assert (c.num_hidden_layers, c.first_k_dense_replace, c.hidden_size) == (61, 3, 7168)
    assert (c.n_routed_experts, c.n_group, c.topk_group, c.num_experts_per_tok) == (256, 8, 4, 8)
    assert c.rope_scaling == RopeScaling(40.0, 4096, 32.0, 1.0, 1.0, 1.0)
    assert c.vocab_size == 129280 and c.max_position_embeddings == 163840


@pytest.mark.parametrize(
    "overrides, field, rule",
    [
        (["n_group=3"], "n_routed_experts", "divisible by n_group"),
        (["topk_group=5"], "topk_group", "<= n_group"),
        (["num_experts_per_tok=5"], "num_experts_per_tok", "experts left after group masking"),
        (["hidden_size=0"], "hidden_size", "positive"),
        (["qk_rope_head_dim=7"], "qk_rope_head_dim", "even"),
        (["first_k_dense_replace=9"], "first_k_dense_replace", "<= num_hidden_layers"),
        (["scoring_func=softmax"], "scoring_func", "noaux_tc"),
        (["dtype=int8"], "RunOptions.dtype", "one of"),
        (["kv_lora_rank=-1"], "kv_lora_rank", "positive"),
        (["ep_logfmt_bits=3"], "EPOptions.logfmt_bits", "[4, 16]"),
        (["ep_logfmt_bits=8", "ep_fp8_dispatch=true"], "EPOptions.logfmt_bits", "one dispatch"),
        (["run.ep.combine_dtype=int4"], "EPOptions.combine_dtype", "one of"),
        (['rope_scaling={"type": "yarn", "factor": 0.5}'], "RopeScaling.factor", ">= 1"),
    ],
)
def test_bad_values_name_field_and_rule(overrides, field, rule):
    with pytest.raises(ValueError, match=field) as e:
        get_preset("tiny", overrides)
    assert rule in str(e.value)


def test_run_options_nest_and_keep_their_short_names():
    """Run options live under ``cfg.run``; the command line's short names and dotted paths
    reach the same fields, applied together (the rules see the final values)."""
    a = get_preset("tiny", ["dtype=bfloat16", "ep_dispatch=flat", "ep_capacity_factor=none"])
    b = get_preset(
        "tiny", ["run.dtype=bfloat16", "run.ep.path=flat", "run.ep.capacity_factor=none"]
    )
    assert a == b and a.run.dtype == "bfloat16" and a.run.ep == EPOptions("flat", None)
    assert a.with_run(dtype="float32").run == dataclasses.replace(a.run, dtype="float32")
    # 6 experts in 4 groups is invalid alone; with n_group=3 in the same call it is fine
    assert get_preset("tiny", ["n_routed_experts=6", "n_group=3"]).experts_per_group == 2
    assert "run" not in a.to_hf_dict() and "dtype" not in a.to_hf_dict()


def test_from_dict_reads_nested_and_older_flat_checkpoints():
    cfg = get_preset("tiny", ["dtype=bfloat16", "ep_kernel=pallas", "fp8=true"])
    nested = json.loads(json.dumps(dataclasses.asdict(cfg)))
    assert nested["run"]["ep"]["kernel"] == "pallas"
    assert ModelConfig.from_dict(nested) == cfg
    flat = {k: v for k, v in nested.items() if k != "run"}  # before run options nested
    flat.update(dtype="bfloat16", ep_kernel="pallas", fp8=True, ep_dispatch="two_hop")
    assert ModelConfig.from_dict(flat) == cfg
    with pytest.raises(ValueError, match=r"run\.ep\.kernal"):
        ModelConfig.from_dict({**nested, "run": {"ep": {"kernal": "xla"}}})
    assert set(RUN_OPTION_FIELDS) >= {"run", *RUN_ALIASES}


def test_presets_derive_from_one_another():
    """A preset lists only what differs from its parent: tiny keeps small's routing."""
    tiny, small, bench = get_preset("tiny"), get_preset("small"), get_preset("bench-small")
    for field in ("n_group", "topk_group", "n_shared_experts", "routed_scaling_factor"):
        assert getattr(tiny, field) == getattr(small, field) == getattr(bench, field)
    assert get_preset("v2-236b").rope_scaling.factor == get_preset("v3-671b").rope_scaling.factor


def test_override_types():
    c = get_preset(
        "tiny",
        [
            "hidden_size=32",
            "norm_topk_prob=false",
            "routed_scaling_factor=1",
            "q_lora_rank=none",
            "rope_scaling=none",
        ],
    )
    assert c.hidden_size == 32 and c.norm_topk_prob is False and c.q_lora_rank is None
    assert isinstance(c.routed_scaling_factor, float) and c.rope_scaling is None
    with pytest.raises(ValueError, match="hidden_size: expected int"):
        get_preset("tiny", ["hidden_size=1.5"])
    with pytest.raises(ValueError, match="unknown model config field 'hiden_size'"):
        get_preset("tiny", ["hiden_size=3"])
    with pytest.raises(ValueError, match="key=value"):
        get_preset("tiny", ["hidden_size"])
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("huge")


# A released DeepSeek-V3 config.json (the fields that matter; extra keys are ignored).
V3_JSON = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "ep_size": 1,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc",
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "hidden_act": "silu",
    "max_position_embeddings": 163840,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
}


def test_config_from_hf_v3(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(V3_JSON))
    c = config_from_hf(tmp_path)
    assert c == dataclasses.replace(get_preset("v3-671b"), initializer_range=0.02)
    assert config_from_hf(V3_JSON) == c


def test_config_from_hf_rope_parameters_and_v2():
    d = dict(V3_JSON)
    d.pop("rope_scaling")
    d["rope_parameters"] = {
        "rope_type": "yarn",
        "factor": 4.0,
        "rope_theta": 5e4,
        "original_max_position_embeddings": 1024,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
    }
    d.update(
        scoring_func="softmax",
        topk_method="group_limited_greedy",
        norm_topk_prob=False,
        n_group=8,
        topk_group=3,
    )
    c = config_from_hf(d)
    assert c.rope_scaling.factor == 4.0 and c.rope_theta == 5e4
    assert c.rope_scaling.mscale == pytest.approx(0.707)
    assert c.scoring_func == "softmax" and not c.has_routing_bias


def test_config_from_hf_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        config_from_hf(tmp_path)
    with pytest.raises(ValueError, match="n_group"):
        config_from_hf({**V3_JSON, "n_group": 7})
    with pytest.raises(ValueError, match="rope_scaling"):
        config_from_hf({**V3_JSON, "rope_scaling": {"type": "dynamic", "factor": 2}})
    with pytest.raises(ValueError, match="hidden_size: expected int"):
        config_from_hf({**V3_JSON, "hidden_size": "big"})
