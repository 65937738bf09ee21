"""Upper bound on decode speed under expert parallelism (ISCA 2025 section 2.3.2).

One EP round moves every token's hidden state to each of its experts (dispatch, FP8:
1 byte per value) and back (combine, BF16: 2 bytes). With ``tokens_per_device`` tokens on
a GPU and ``experts_per_token`` copies each (8 routed + 1 shared in V3), the GPU's link
carries (1 + 2) x tokens x experts x hidden bytes per layer:

    t_round = (dispatch_bytes + combine_bytes) x tokens x experts x hidden / bandwidth

Two micro-batches overlap one's computation with the other's communication, so when
communication dominates a layer takes ``micro_batches`` x t_round and
TPOT = micro_batches x t_round x layers. The paper rounds hidden 7168 to 7000 and counts
all 61 layers (the 3 dense layers dispatch nothing): we follow it for the paper rows.

Counted: payload bytes over one link per GPU. Ignored: compute time (assumed hidden under
communication), latency, FP8 scales (about 1/128 more), all-to-all imbalance, MTP.
"""

from __future__ import annotations

import dataclasses

from deepseek_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class DecodeBound:
    round_us: float  # one dispatch + combine
    tpot_ms: float  # time per output token
    tokens_per_s: float  # per sequence: 1 / TPOT


def ep_round_bytes(
    tokens_per_device: int,
    experts_per_token: int,
    hidden: int,
    dispatch_bytes: float = 1.0,
    combine_bytes: float = 2.0,
) -> float:
    """Bytes one GPU sends in one dispatch + combine round."""
    return (dispatch_bytes + combine_bytes) * tokens_per_device * experts_per_token * hidden


def ep_decode_bound(
    tokens_per_device: int,
    experts_per_token: int,
    hidden: int,
    layers: int,
    bandwidth_GBps: float,
    micro_batches: int = 2,
    dispatch_bytes: float = 1.0,
    combine_bytes: float = 2.0,
) -> DecodeBound:
    """Communication-bound TPOT and tokens/s (see the module docstring).

    Args:
      bandwidth_GBps: per-GPU link bandwidth in GB/s (10^9 bytes/s).
      micro_batches: micro-batches whose communication is serialised on the link per layer.
    """
    b = ep_round_bytes(tokens_per_device, experts_per_token, hidden, dispatch_bytes, combine_bytes)
    round_s = b / (bandwidth_GBps * 1e9)
    tpot_s = micro_batches * round_s * layers
    return DecodeBound(round_us=round_s * 1e6, tpot_ms=tpot_s * 1e3, tokens_per_s=1 / tpot_s)


def config_decode_bound(
    cfg: ModelConfig,
    bandwidth_GBps: float,
    tokens_per_device: int = 32,
    hidden: int | None = None,
    all_layers: bool = True,
    micro_batches: int = 2,
) -> DecodeBound:
    """``ep_decode_bound`` from a config: experts = routed top-k + shared.

    ``hidden`` overrides ``cfg.hidden_size`` (the paper's 7000); ``all_layers=False`` counts
    only the MoE layers, which is what actually dispatches.
    """
    layers = cfg.num_hidden_layers if all_layers else cfg.num_moe_layers
    experts = cfg.num_experts_per_tok + cfg.n_shared_experts
    return ep_decode_bound(
        tokens_per_device, experts, hidden or cfg.hidden_size, layers, bandwidth_GBps, micro_batches
    )
