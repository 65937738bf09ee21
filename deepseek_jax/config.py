"""Model configuration: frozen data with Hugging Face DeepseekV3 field names.

A released ``config.json`` loads as is (``interop.hf_config.config_from_hf``); presets are built
with ``dataclasses.replace`` on one base; ``key=value`` overrides are type-checked. Every
invalid value raises a ``ValueError`` that names the field and the rule it breaks.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Literal

ScoringFunc = Literal["sigmoid", "softmax"]
TopkMethod = Literal["noaux_tc", "group_limited_greedy", "greedy"]
DType = Literal["float32", "bfloat16", "float16"]
Fp8Backend = Literal["auto", "xla", "pallas"]
EPDispatch = Literal["two_hop", "flat"]
KernelBackend = Literal["auto", "xla", "pallas"]
MoEBackend = Literal["auto", "einsum", "grouped", "ragged_dot"]
AttentionBackend = Literal["auto", "xla", "cpu_kernel"]
Overlap = Literal["none", "dual"]
# How the layer stacks run (block.run_blocks): a scan, unrolled, or "auto" (unrolled on CPU).
LAYER_LOOPS = ("auto", "scan", "unroll")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN rope scaling, as in the official DeepSeek-V3 ``rope_scaling`` block."""

    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    type: Literal["yarn"] = "yarn"

    def __post_init__(self):
        if self.type != "yarn":
            raise ValueError(f"rope_scaling.type: only 'yarn' is supported, got {self.type!r}")
        if self.factor < 1:
            raise ValueError(f"rope_scaling.factor must be >= 1, got {self.factor}")
        if self.original_max_position_embeddings <= 0:
            raise ValueError("rope_scaling.original_max_position_embeddings must be positive")
        if self.beta_fast <= self.beta_slow:
            raise ValueError(
                f"rope_scaling.beta_fast ({self.beta_fast}) must exceed "
                f"beta_slow ({self.beta_slow})"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> RopeScaling | None:
        """Reads HF's ``rope_scaling`` / ``rope_parameters`` dict; None or non-YaRN -> None."""
        if not d:
            return None
        kind = d.get("type", d.get("rope_type"))
        if kind in (None, "default"):
            return None
        if kind != "yarn":
            raise ValueError(f"rope_scaling: only 'yarn' is supported, got type {kind!r}")
        names = {f.name for f in dataclasses.fields(cls)} - {"type"}
        hints = typing.get_type_hints(cls)
        kwargs = {k: hints[k](d[k]) for k in names if k in d and d[k] is not None}
        return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """DeepSeek-V3 architecture. Defaults are the published V3 shapes (REFERENCE.md)."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: ScoringFunc = "sigmoid"
    topk_method: TopkMethod = "noaux_tc"
    num_nextn_predict_layers: int = 1
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = RopeScaling()
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.006
    tie_word_embeddings: bool = False
    # Not in HF's config: how we compute. Parameters stay float32 (master weights).
    dtype: DType = "float32"
    fp8: bool = False  # DeepSeek-V3 FP8 recipe for the large linears (fp8.py)
    fp8_backend: Fp8Backend = "auto"  # "xla" (reference GEMM), "pallas" (ours); auto: backends
    # Local expert compute (moe/experts.py): "einsum" (capacity slots), "grouped" (grouped
    # GEMM: our C++ kernel on CPU, ragged_dot elsewhere), "ragged_dot"; "auto": grouped
    # on CPU when its kernel builds, else einsum.
    moe_backend: MoEBackend = "auto"
    # Training/prefill attention core (mla.py): "xla" (einsums + softmax), "cpu_kernel"
    # (our fused C++ kernel, float32 on CPU); "auto": cpu_kernel on CPU in float32 when it
    # builds, else xla.
    attention_backend: AttentionBackend = "auto"
    # Expert parallelism on a multi-device mesh (moe/dispatch.py).
    ep_dispatch: EPDispatch = "two_hop"  # "two_hop" (node, then gpu) or "flat" (one hop)
    ep_capacity_factor: float | None = 3.0  # per-peer buffers x balanced load; None: dropless
    ep_fp8_dispatch: bool = False  # dispatch payload E4M3 with 1x128 scales (V3TR 3.3.2)
    ep_kernel: KernelBackend = "auto"  # permute/combine: "xla" (jnp), "pallas"; auto: backends
    ep_logfmt_bits: int = 0  # dispatch payload in LogFMT-n (ISCA 3.2), n in 4..16; 0: off
    # MoE blocks under expert parallelism: "dual" splits each device's batch in two halves
    # whose all-to-alls overlap the other half's compute (overlap.py); "none": one batch.
    overlap: Overlap = "none"

    # ---------------------------------------------------------------- validation
    def __post_init__(self):
        positive = (
            "vocab_size hidden_size intermediate_size moe_intermediate_size num_hidden_layers "
            "num_attention_heads kv_lora_rank qk_nope_head_dim qk_rope_head_dim v_head_dim "
            "n_routed_experts num_experts_per_tok n_group topk_group max_position_embeddings"
        ).split()
        for name in positive:
            _require(name, getattr(self, name) > 0, "must be positive", getattr(self, name))
        for name in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
            _require(name, getattr(self, name) >= 0, "must be >= 0", getattr(self, name))
        if self.q_lora_rank is not None:
            _require(
                "q_lora_rank", self.q_lora_rank > 0, "must be positive or None", self.q_lora_rank
            )
        _require(
            "qk_rope_head_dim",
            self.qk_rope_head_dim % 2 == 0,
            "must be even (RoPE rotates pairs)",
            self.qk_rope_head_dim,
        )
        _require(
            "first_k_dense_replace",
            self.first_k_dense_replace <= self.num_hidden_layers,
            f"must be <= num_hidden_layers ({self.num_hidden_layers})",
            self.first_k_dense_replace,
        )
        _require(
            "n_routed_experts",
            self.n_routed_experts % self.n_group == 0,
            f"must be divisible by n_group ({self.n_group})",
            self.n_routed_experts,
        )
        _require(
            "topk_group",
            self.topk_group <= self.n_group,
            f"must be <= n_group ({self.n_group})",
            self.topk_group,
        )
        _require(
            "num_experts_per_tok",
            self.num_experts_per_tok <= self.n_routed_experts,
            f"must be <= n_routed_experts ({self.n_routed_experts})",
            self.num_experts_per_tok,
        )
        kept = self.topk_group * self.experts_per_group
        _require(
            "num_experts_per_tok",
            self.num_experts_per_tok <= kept,
            f"must be <= topk_group x experts per group = {self.topk_group} x "
            f"{self.experts_per_group} = {kept} (the experts left after group masking)",
            self.num_experts_per_tok,
        )
        if self.topk_method == "noaux_tc":
            _require(
                "scoring_func",
                self.scoring_func == "sigmoid",
                "topk_method 'noaux_tc' needs scoring_func 'sigmoid'",
                self.scoring_func,
            )
            _require(
                "n_routed_experts",
                self.experts_per_group >= 2,
                "noaux_tc scores each group by its top-2 experts: need >= 2 experts per "
                "group (n_routed_experts / n_group)",
                self.n_routed_experts,
            )
        _require(
            "routed_scaling_factor",
            self.routed_scaling_factor > 0,
            "must be positive",
            self.routed_scaling_factor,
        )
        _require("rms_norm_eps", self.rms_norm_eps > 0, "must be positive", self.rms_norm_eps)
        _require("rope_theta", self.rope_theta > 0, "must be positive", self.rope_theta)
        _require(
            "initializer_range",
            self.initializer_range > 0,
            "must be positive",
            self.initializer_range,
        )
        _require(
            "tie_word_embeddings",
            not self.tie_word_embeddings,
            "DeepSeek-V3 has an untied head; tied embeddings are not supported",
            self.tie_word_embeddings,
        )
        if self.ep_capacity_factor is not None:
            _require(
                "ep_capacity_factor",
                self.ep_capacity_factor > 0,
                "must be positive, or None for dropless buffers",
                self.ep_capacity_factor,
            )
        _require(
            "ep_logfmt_bits",
            self.ep_logfmt_bits == 0 or 4 <= self.ep_logfmt_bits <= 16,
            "must be 0 (off) or in [4, 16]",
            self.ep_logfmt_bits,
        )
        _require(
            "ep_logfmt_bits",
            not (self.ep_logfmt_bits and self.ep_fp8_dispatch),
            "choose one dispatch codec: LogFMT or ep_fp8_dispatch, not both",
            self.ep_logfmt_bits,
        )
        for name in (
            "scoring_func",
            "topk_method",
            "dtype",
            "fp8_backend",
            "moe_backend",
            "attention_backend",
            "ep_dispatch",
            "ep_kernel",
            "overlap",
        ):
            allowed = typing.get_args(_field_types()[name])
            _require(
                name,
                getattr(self, name) in allowed,
                f"must be one of {allowed}",
                getattr(self, name),
            )

    # ---------------------------------------------------------------- derived sizes
    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_group

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def has_routing_bias(self) -> bool:
        """V3's aux-loss-free balancing bias (``e_score_correction_bias``)."""
        return self.topk_method == "noaux_tc"

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> ModelConfig:
        """A config from field values (JSON types: ints accepted for floats, a dict for
        ``rope_scaling``); raises naming an unknown field or a value of the wrong type.
        Hugging Face configs go through ``interop.hf_config.config_from_hf``."""
        types = _field_types()
        unknown = sorted(set(fields) - set(types))
        if unknown:
            raise ValueError(f"unknown model config field(s) {unknown}")
        fields = dict(fields)
        if isinstance(fields.get("rope_scaling"), dict):
            fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
        return cls(**{k: _coerce(k, v, types[k]) for k, v in fields.items()})

    def with_overrides(
        self, overrides: dict[str, str] | list[str] | tuple[str, ...]
    ) -> ModelConfig:
        """Applies ``key=value`` strings (or a dict of strings), converting by field type."""
        pairs = (
            dict(_split_kv(o) for o in overrides) if not isinstance(overrides, dict) else overrides
        )
        fields = _field_types()
        changes = {}
        for key, text in pairs.items():
            if key not in fields:
                raise ValueError(f"unknown model config field {key!r}; known: {sorted(fields)}")
            changes[key] = _parse_value(key, text, fields[key])
        return dataclasses.replace(self, **changes)

    def to_hf_dict(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` contents for this config."""
        d = dataclasses.asdict(self)
        for ours in RUN_OPTION_FIELDS:
            d.pop(ours, None)
        d["rope_scaling"] = dataclasses.asdict(self.rope_scaling) if self.rope_scaling else None
        d.update(
            model_type="deepseek_v3",
            architectures=["DeepseekV3ForCausalLM"],
            num_key_value_heads=self.num_attention_heads,
            hidden_act="silu",
            moe_layer_freq=1,
            attention_bias=False,
        )
        return d


# How a run computes, not what the model is: absent from HF's config.json, free to change
# when a checkpoint is resumed (``train.checkpoint.resume_differences``). A new field that
# only changes how the same function is computed belongs here.
RUN_OPTION_FIELDS = (
    "dtype",
    "fp8",
    "fp8_backend",
    "moe_backend",
    "attention_backend",
    "ep_dispatch",
    "ep_capacity_factor",
    "ep_fp8_dispatch",
    "ep_kernel",
    "ep_logfmt_bits",
    "overlap",
)


# -------------------------------------------------------------------- helpers


def _require(field: str, ok: bool, rule: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"ModelConfig.{field} = {value!r}: {rule}")


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(ModelConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(ModelConfig)}


def _split_kv(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ValueError(f"override {text!r} is not of the form key=value")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def _parse_value(key: str, text: Any, tp: Any) -> Any:
    """Converts an override string to the field's type; raises naming the field."""
    if not isinstance(text, str):
        return _coerce(key, text, tp)
    args = typing.get_args(tp)
    optional = type(None) in args
    if optional and text.lower() in ("none", "null"):
        return None
    if tp is RopeScaling or RopeScaling in args:
        try:
            return RopeScaling.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ValueError(f"{key}: expected a JSON object or none, got {text!r}") from e
    base = next((a for a in args if a is not type(None)), tp) if optional else tp
    if typing.get_origin(base) is Literal:
        return text
    try:
        if base is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if base is int:
            return int(text)
        if base is float:
            return float(text)
    except ValueError:
        raise ValueError(f"{key}: expected {base.__name__}, got {text!r}") from None
    return text


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Type-checks a JSON value against the field type (ints accepted for floats)."""
    args = typing.get_args(tp)
    if value is None and (type(None) in args):
        return None
    if (
        isinstance(value, RopeScaling)
        or (tp is RopeScaling or RopeScaling in args)
        and value is None
    ):
        return value
    base = next((a for a in args if a is not type(None)), tp) if type(None) in args else tp
    if typing.get_origin(base) is Literal:
        return value
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(base, type) and not isinstance(value, base):
        raise ValueError(f"ModelConfig.{key}: expected {base.__name__}, got {value!r}")
    return value


# -------------------------------------------------------------------- presets

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
    n_group=8,
    topk_group=3,
    routed_scaling_factor=16.0,
    norm_topk_prob=False,
    scoring_func="softmax",
    topk_method="group_limited_greedy",
    num_nextn_predict_layers=0,
    initializer_range=0.02,
    rope_scaling=RopeScaling(
        factor=40.0,
        original_max_position_embeddings=4096,
        beta_fast=32.0,
        beta_slow=1.0,
        mscale=0.707,
        mscale_all_dim=0.707,
    ),
)

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
    n_shared_experts=1,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=2.5,
    num_nextn_predict_layers=1,
    max_position_embeddings=4096,
    rope_scaling=None,
    initializer_range=0.02,
)

SMALL = dataclasses.replace(
    V3_671B,
    vocab_size=4096,
    hidden_size=256,
    num_hidden_layers=4,
    first_k_dense_replace=1,
    num_attention_heads=4,
    q_lora_rank=96,
    kv_lora_rank=64,
    qk_rope_head_dim=16,
    qk_nope_head_dim=32,
    v_head_dim=32,
    intermediate_size=704,
    moe_intermediate_size=128,
    n_routed_experts=16,
    n_shared_experts=1,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=2.5,
    num_nextn_predict_layers=1,
    max_position_embeddings=2048,
    rope_scaling=None,
    initializer_range=0.02,
)

TINY = dataclasses.replace(
    V3_671B,
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    num_attention_heads=4,
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    intermediate_size=128,
    moe_intermediate_size=32,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=2.5,
    num_nextn_predict_layers=1,
    max_position_embeddings=512,
    rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=128),
    initializer_range=0.02,
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
