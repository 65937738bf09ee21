"""The one Hugging Face ``config.json`` translator, both ways.

``config_from_hf`` reads a released DeepseekV3 or DeepseekV2 config (a folder, a file or a
dict) into a ``ModelConfig``: transformers' own defaults for the keys a terse config leaves
out (they differ between V2 and V3), the ``rope_scaling`` / ``rope_parameters`` spellings,
V2's softmax gate, and a refusal naming the key for anything we cannot run faithfully.
``hf_config_dict`` writes one for an export. Loading weights, converting runs and the
co-design calculators all go through here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from deepseek_jax.config import ModelConfig, RopeScaling

ARCHITECTURES = {"DeepseekV3ForCausalLM": "deepseek_v3", "DeepseekV2ForCausalLM": "deepseek_v2"}
# transformers' DeepseekV2Config defaults where they differ from ours (a terse config.json).
_V2_DEFAULTS = {
    "topk_method": "greedy",
    "norm_topk_prob": False,
    "routed_scaling_factor": 1.0,
    "first_k_dense_replace": 0,
    "n_shared_experts": 2,
    "num_nextn_predict_layers": 0,
    "max_position_embeddings": 2048,
}
_V3_DEFAULTS = {"max_position_embeddings": 4096}
_REQUIRED = (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False))


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The dict of ``path/config.json`` (or of ``path`` itself when it is a file)."""
    path = os.fspath(path)
    file = path if os.path.isfile(path) else os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint directory or config.json at {path}")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{path}: missing config.json")
    with open(file) as f:
        return json.load(f)


def config_from_hf(
    source: str | os.PathLike | dict[str, Any], *, dtype: str = "float32"
) -> ModelConfig:
    """Our config for a HF config (folder, ``config.json`` path or dict).

    Args:
      source: the config; unknown keys (``architectures``, ``torch_dtype``...) are ignored.
      dtype: our compute dtype (a run option: HF's ``torch_dtype`` is storage).
    Raises:
      ValueError naming the key: an unsupported architecture, activation, bias, layer
      pattern or quantisation, or a value ``ModelConfig`` refuses.
    """
    raw = dict(source) if isinstance(source, dict) else read_hf_config(source)
    archs = raw.get("architectures") or []
    known = [a for a in archs if a in ARCHITECTURES]
    model_type = ARCHITECTURES[known[0]] if known else raw.get("model_type")
    if model_type not in ARCHITECTURES.values():
        raise ValueError(
            f"config.json: unsupported architecture {archs or raw.get('model_type')!r}; "
            f"supported: {sorted(ARCHITECTURES)}"
        )
    defaults = _V2_DEFAULTS if model_type == "deepseek_v2" else _V3_DEFAULTS
    raw = {**defaults, **raw}
    for key, want in (*_REQUIRED, ("moe_layer_freq", 1)):
        if raw.get(key, want) != want:
            raise ValueError(f"config.json: {key} = {raw[key]!r} is not supported (need {want!r})")
    fp8_block(raw)  # validates quantization_config
    try:
        cfg = ModelConfig.from_dict(_fields(raw))
    except (ValueError, TypeError) as e:
        raise ValueError(f"config.json: {e}") from None
    return cfg.with_run(dtype=dtype)


def _fields(raw: dict[str, Any]) -> dict[str, Any]:
    """Our field values from HF's keys: YaRN from ``rope_scaling`` or the newer
    ``rope_parameters``; V2's softmax gate; one group when a config has none."""
    # not ``run``: HF's ``dtype`` (newer transformers) is storage, ours a run option
    names = {f.name for f in dataclasses.fields(ModelConfig)} - {"run", "rope_scaling"}
    out = {k: v for k, v in raw.items() if k in names}
    rope = raw.get("rope_scaling") or raw.get("rope_parameters")
    out["rope_scaling"] = RopeScaling.from_dict(rope)
    if rope and "rope_theta" in rope:  # transformers >= 5 keeps theta in rope_parameters
        out["rope_theta"] = rope["rope_theta"]
    if "scoring_func" not in raw and raw.get("topk_method") in ("greedy", "group_limited_greedy"):
        out["scoring_func"] = "softmax"
    if raw.get("topk_method") == "greedy":  # V2-Lite: no groups
        out.setdefault("n_group", 1)
        out.setdefault("topk_group", 1)
    for key in ("n_group", "topk_group"):
        if out.get(key) is None:
            out[key] = 1
    if out.get("n_routed_experts", 1) is None:
        raise ValueError("dense models (n_routed_experts null) are not supported")
    return out


def fp8_block(raw: dict[str, Any]) -> tuple[int, int] | None:
    """The official FP8 weights' block shape from ``quantization_config`` (None: no FP8)."""
    q = raw.get("quantization_config")
    if not q:
        return None
    if q.get("quant_method") != "fp8" or q.get("fmt", "e4m3") != "e4m3":
        raise ValueError(
            f"config.json: quantization_config {q!r} is not supported "
            "(only the official fp8 e4m3 block format)"
        )
    block = tuple(q.get("weight_block_size") or (128, 128))
    if len(block) != 2:
        raise ValueError(f"config.json: weight_block_size {list(block)} must have two entries")
    return block


def hf_config_dict(cfg: ModelConfig, storage_dtype: str) -> dict[str, Any]:
    """``config.json`` for an export: V3, or V2 for a softmax gate (V3 code is sigmoid-only)."""
    d = cfg.to_hf_dict()
    if cfg.scoring_func == "softmax":
        d.update(model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"])
    else:
        d["rope_interleave"] = True
    d.update(torch_dtype=storage_dtype, bos_token_id=None, eos_token_id=None)
    return d
