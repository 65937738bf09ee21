"""Training FLOPs per token and the throughput they imply (ISCA 2025 Tables 2 and 4).

The ISCA Table 2 convention, which reproduces its MoE rows (REFERENCE.md):

    FLOPs/token = 6 x (activated matmul params, input embedding excluded, head included)
                + 3 x 2 x s x heads x (d_qk + d_v) x layers  (/ 2 when causal)

6 = forward 2 + backward 4 per parameter; the attention term is QK^T and PV over ``s``
keys, forward + backward (x 3). Counted: every weight matrix a token passes through (MLA
projections, the dense FFNs, the shared and its k routed experts, gates, the head).
Ignored: norms, softmax, RoPE, the router's top-k, MTP, recomputation.

The parameter counts here are analytic, from the config alone; they equal
``deepseek_jax.codesign.params.abstract_report`` (tested), which builds the model.
"""

from __future__ import annotations

import dataclasses

from deepseek_jax.codesign.dense_models import DenseModel
from deepseek_jax.config import ModelConfig

SECONDS_PER_DAY = 86_400


@dataclasses.dataclass(frozen=True)
class MoEParams:
    total: int  # main model, embedding and head included
    activated: float  # per token, embedding included (as the reports count)
    embedding: int


def mla_params(cfg: ModelConfig) -> int:
    """One MLA layer's matrices: q (low-rank or not), kv down / up, output."""
    d, h = cfg.hidden_size, cfg.num_attention_heads
    if cfg.q_lora_rank:
        q = d * cfg.q_lora_rank + cfg.q_lora_rank * h * cfg.qk_head_dim
    else:
        q = d * h * cfg.qk_head_dim
    kv = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    kv += cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return q + kv + h * cfg.v_head_dim * d


def moe_params(cfg: ModelConfig) -> MoEParams:
    """Main-model parameter counts (MTP excluded), by REFERENCE.md's convention."""
    d = cfg.hidden_size
    expert, gate = 3 * d * cfg.moe_intermediate_size, d * cfg.n_routed_experts
    dense_ffn = 3 * d * cfg.intermediate_size
    emb = cfg.vocab_size * d
    shared = cfg.num_hidden_layers * mla_params(cfg) + cfg.first_k_dense_replace * dense_ffn
    shared += cfg.num_moe_layers * (cfg.n_shared_experts * expert + gate) + 2 * emb
    routed = cfg.num_moe_layers * cfg.n_routed_experts * expert
    frac = cfg.num_experts_per_tok / cfg.n_routed_experts
    return MoEParams(total=shared + routed, activated=shared + routed * frac, embedding=emb)


def attention_flops(
    seq_len: int, heads: int, qk_dim: int, v_dim: int, layers: int, causal: bool = True
) -> float:
    """Training FLOPs per token of QK^T and PV: 3 x 2 x s x heads x (d_qk + d_v) x layers."""
    f = 3 * 2 * seq_len * heads * (qk_dim + v_dim) * layers
    return f / 2 if causal else f


def training_flops_per_token(
    cfg: ModelConfig,
    seq_len: int = 4096,
    causal: bool = True,
    activated_params: float | None = None,
) -> float:
    """ISCA Table 2 FLOPs per token for an MLA/MoE config.

    Args:
      activated_params: per-token parameters with the embedding included (as
        ``abstract_report(cfg).activated_params``); None counts them from the config.
    """
    p = moe_params(cfg)
    act = p.activated if activated_params is None else activated_params
    attn = attention_flops(
        seq_len,
        cfg.num_attention_heads,
        cfg.qk_head_dim,
        cfg.v_head_dim,
        cfg.num_hidden_layers,
        causal,
    )
    return 6 * (act - p.embedding) + attn


def mtp_training_flops_per_token(
    cfg: ModelConfig, seq_len: int, mtp_activated_params: float, causal: bool = True
) -> float:
    """Training FLOPs per token of the MTP modules, which ``training_flops_per_token``
    leaves out: their own activated matrices (``abstract_report(cfg).mtp_activated_params``),
    the shared output head once more per depth, and their attention."""
    depth = cfg.num_nextn_predict_layers
    if not depth:
        return 0.0
    head = depth * cfg.hidden_size * cfg.vocab_size
    attn = attention_flops(
        seq_len, cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim, depth, causal
    )
    return 6 * (mtp_activated_params + head) + attn


def dense_training_flops_per_token(
    model: DenseModel, seq_len: int = 4096, causal: bool = True
) -> float:
    """The same formula for a dense GQA/MHA model (no paper row follows from it)."""
    attn = attention_flops(
        seq_len,
        model.num_attention_heads,
        model.head_dim,
        model.head_dim,
        model.num_hidden_layers,
        causal,
    )
    return 6 * model.matmul_params() + attn


def tflops_per_gpu(tokens_per_day: float, gpus: int, flops_per_token: float) -> float:
    """Achieved TFLOP/s per GPU from a measured cluster throughput (ISCA Table 4)."""
    return tokens_per_day / SECONDS_PER_DAY / gpus * flops_per_token / 1e12


def tokens_per_day(tflops: float, gpus: int, flops_per_token: float) -> float:
    """The inverse: cluster tokens per day at ``tflops`` achieved per GPU."""
    return tflops * 1e12 / flops_per_token * gpus * SECONDS_PER_DAY


def mfu(tflops: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation, a fraction of the dense peak."""
    return tflops / peak_tflops
