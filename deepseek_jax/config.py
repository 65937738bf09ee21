"""Model configuration: frozen data with Hugging Face DeepseekV3 field names.

``ModelConfig`` holds the architecture (HF names; a released ``config.json`` loads through
``interop.hf_config.config_from_hf``) and, nested under ``run``, how a run computes it
(``RunOptions``: dtype, FP8, backends and the expert-parallel ``EPOptions``). Each class is
validated by a table of rules: every invalid value raises a ``ValueError`` naming the class,
the field and the rule it breaks. ``key=value`` overrides are type-checked; run options take
their short names (``dtype=bfloat16``, ``ep_dispatch=flat``, ``RUN_ALIASES``) or their
dotted paths (``run.ep.path=flat``). Presets live in ``presets.py``.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

from deepseek_jax.config_fields import Rule, apply_overrides, build, positive, validate

ScoringFunc = Literal["sigmoid", "softmax"]
TopkMethod = Literal["noaux_tc", "group_limited_greedy", "greedy"]
DType = Literal["float32", "bfloat16", "float16"]
Fp8Backend = Literal["auto", "xla", "pallas"]
EPPath = Literal["two_hop", "flat"]
KernelBackend = Literal["auto", "xla", "pallas"]
MoEBackend = Literal["auto", "einsum", "grouped", "ragged_dot"]
AttentionBackend = Literal["auto", "xla", "cpu_kernel"]
Overlap = Literal["none", "dual", "dual_deferred"]
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
        validate(self, _ROPE_RULES)

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


_ROPE_RULES: tuple[Rule, ...] = (
    ("factor", lambda c: c.factor >= 1, "must be >= 1"),
    *positive("original_max_position_embeddings"),
    ("beta_fast", lambda c: c.beta_fast > c.beta_slow, "must exceed beta_slow ({c.beta_slow})"),
)


@dataclasses.dataclass(frozen=True)
class EPOptions:
    """How the expert-parallel exchange runs (``moe/dispatch.py``).

    path: "two_hop" (node then gpu) or "flat" (one all_to_all over both).
    capacity_factor: per-peer buffers = factor x balanced load (capped at the worst case);
      None sizes every buffer for the worst case: dropless.
    fp8_dispatch: the dispatch payload is E4M3 with one FP32 scale per 1x128 tile (V3TR 3.3.2).
    logfmt_bits: the dispatch payload is LogFMT-n (ISCA 3.2, ``deepseek_jax.logfmt``); 0: off.
    combine_dtype: the combine payload; None: the compute dtype.
    kernel: "pallas" runs our permute/combine kernels (interpreted off-GPU), "xla" their
      jnp twins; "auto": pallas when compiling for a GPU, else xla (``backends``). The
      Pallas interpreter does not track varying mesh axes, so a shard_map around the
      exchange needs ``check_vma=False`` with "pallas" (the MoE layer does so).
    """

    path: EPPath = "two_hop"
    capacity_factor: float | None = 3.0
    fp8_dispatch: bool = False
    logfmt_bits: int = 0
    combine_dtype: DType | None = None
    kernel: KernelBackend = "auto"

    def __post_init__(self):
        validate(self, _EP_RULES)


_EP_RULES: tuple[Rule, ...] = (
    (
        "capacity_factor",
        lambda c: c.capacity_factor is None or c.capacity_factor > 0,
        "must be positive, or None for dropless buffers",
    ),
    (
        "logfmt_bits",
        lambda c: c.logfmt_bits == 0 or 4 <= c.logfmt_bits <= 16,
        "must be 0 (off) or in [4, 16]",
    ),
    (
        "logfmt_bits",
        lambda c: not (c.logfmt_bits and c.fp8_dispatch),
        "choose one dispatch codec: LogFMT or fp8_dispatch, not both",
    ),
    (
        "combine_dtype",
        lambda c: c.combine_dtype in (None, *typing.get_args(DType)),
        f"must be None or one of {typing.get_args(DType)}",
    ),
)


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a run computes the model, not what the model is: absent from HF's config.json,
    free to change when a checkpoint is resumed (``train.checkpoint.resume_differences``).
    A new option that only changes how the same function is computed belongs here.

    dtype: compute dtype; parameters stay float32 (master weights).
    fp8: DeepSeek-V3's FP8 recipe for the large linears (``fp8.py``), by ``fp8_backend``:
      "xla" (reference GEMM) or "pallas" (our kernel); "auto": pallas when compiling for a GPU,
      else xla (``backends.pallas_kernel``).
    moe_backend: local expert compute (``moe/experts.py``): "einsum" (capacity slots),
      "grouped" (our C++ grouped GEMM on CPU, ragged_dot elsewhere), "ragged_dot"; "auto":
      grouped on CPU when its kernel builds, else einsum.
    attention_backend: training/prefill attention core (``mla.py``): "xla", "cpu_kernel"
      (our fused C++ kernel, float32 on CPU); "auto": cpu_kernel where it applies, else xla.
    overlap: "dual" splits each device's batch in two halves whose all-to-alls overlap the
      other half's compute (``overlap.py``); "dual_deferred": the same, each block's
      combine(B) run beside the next block's attention(A); "none": one batch.
    ep: the expert-parallel exchange on a multi-device mesh.
    """

    dtype: DType = "float32"
    fp8: bool = False
    fp8_backend: Fp8Backend = "auto"
    moe_backend: MoEBackend = "auto"
    attention_backend: AttentionBackend = "auto"
    overlap: Overlap = "none"
    ep: EPOptions = EPOptions()

    def __post_init__(self):
        validate(self, ())


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
    run: RunOptions = RunOptions()  # not in HF's config: how we compute

    def __post_init__(self):
        validate(self, _MODEL_RULES)

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
        """A config from field values (JSON types: ints accepted for floats, dicts for the
        nested ``rope_scaling`` and ``run``; older checkpoints' flat run options by their
        ``RUN_ALIASES``); raises naming an unknown field or a value of the wrong type.
        Hugging Face configs go through ``interop.hf_config.config_from_hf``."""
        fields = dict(fields)
        flat = {k: fields.pop(k) for k in list(fields) if k in RUN_ALIASES}
        cfg = build(cls, fields)
        return cfg.with_overrides(flat) if flat else cfg

    def with_overrides(
        self, overrides: dict[str, Any] | list[str] | tuple[str, ...]
    ) -> ModelConfig:
        """Applies ``key=value`` strings (or a dict of strings or values), converting by
        field type. A key is a field, a dotted path into ``run`` or a ``RUN_ALIASES`` name."""
        names = {f.name for f in dataclasses.fields(self)} - {"run"}
        known = names | set(RUN_ALIASES) | {"run.<path>"}
        return apply_overrides(self, overrides, RUN_ALIASES, known)

    def with_run(self, **changes: Any) -> ModelConfig:
        """This architecture with other run options (``RunOptions`` fields)."""
        return dataclasses.replace(self, run=dataclasses.replace(self.run, **changes))

    def to_hf_dict(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` contents for this config."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "run"}
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


_MODEL_RULES: tuple[Rule, ...] = (
    *positive(
        *"vocab_size hidden_size intermediate_size moe_intermediate_size num_hidden_layers "
        "num_attention_heads kv_lora_rank qk_nope_head_dim qk_rope_head_dim v_head_dim "
        "n_routed_experts num_experts_per_tok n_group topk_group max_position_embeddings "
        "routed_scaling_factor rms_norm_eps rope_theta initializer_range".split()
    ),
    *(
        (n, lambda c, n=n: getattr(c, n) >= 0, "must be >= 0")
        for n in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers")
    ),
    ("q_lora_rank", lambda c: c.q_lora_rank is None or c.q_lora_rank > 0, "must be > 0 or None"),
    (
        "qk_rope_head_dim",
        lambda c: c.qk_rope_head_dim % 2 == 0,
        "must be even (RoPE rotates pairs)",
    ),
    (
        "first_k_dense_replace",
        lambda c: c.first_k_dense_replace <= c.num_hidden_layers,
        "must be <= num_hidden_layers ({c.num_hidden_layers})",
    ),
    (
        "n_routed_experts",
        lambda c: c.n_routed_experts % c.n_group == 0,
        "must be divisible by n_group ({c.n_group})",
    ),
    ("topk_group", lambda c: c.topk_group <= c.n_group, "must be <= n_group ({c.n_group})"),
    (
        "num_experts_per_tok",
        lambda c: c.num_experts_per_tok <= c.n_routed_experts,
        "must be <= n_routed_experts ({c.n_routed_experts})",
    ),
    (
        "num_experts_per_tok",
        lambda c: c.num_experts_per_tok <= c.topk_group * c.experts_per_group,
        "must be <= topk_group x experts per group = {c.topk_group} x {c.experts_per_group} "
        "(the experts left after group masking)",
    ),
    (
        "scoring_func",
        lambda c: c.topk_method != "noaux_tc" or c.scoring_func == "sigmoid",
        "topk_method 'noaux_tc' needs scoring_func 'sigmoid'",
    ),
    (
        "n_routed_experts",
        lambda c: c.topk_method != "noaux_tc" or c.experts_per_group >= 2,
        "noaux_tc scores each group by its top-2 experts: need >= 2 experts per group "
        "(n_routed_experts / n_group)",
    ),
    (
        "tie_word_embeddings",
        lambda c: not c.tie_word_embeddings,
        "DeepSeek-V3 has an untied head; tied embeddings are not supported",
    ),
)

# Short names of the run options (the key=value spelling of the command line, and the flat
# fields of checkpoints written before ``run`` was nested) -> their path in ModelConfig.
RUN_ALIASES: dict[str, str] = {
    **{f: f"run.{f}" for f in ("dtype", "fp8", "fp8_backend", "moe_backend")},
    **{f: f"run.{f}" for f in ("attention_backend", "overlap")},
    "ep_dispatch": "run.ep.path",
    "ep_capacity_factor": "run.ep.capacity_factor",
    "ep_fp8_dispatch": "run.ep.fp8_dispatch",
    "ep_kernel": "run.ep.kernel",
    "ep_logfmt_bits": "run.ep.logfmt_bits",
    "ep_combine_dtype": "run.ep.combine_dtype",
}
# Top-level keys of a config dict that hold run options: what resuming may change.
RUN_OPTION_FIELDS = ("run", *RUN_ALIASES)
