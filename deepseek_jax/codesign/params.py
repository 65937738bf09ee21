"""Parameter counts from abstract init, by REFERENCE.md's convention.

Counted: every weight matrix (SwiGLU experts with three matrices, MLA projections, gates,
embedding, head, MTP's ``eh_proj``). Ignored: vectors (RMSNorm weights, routing biases),
as the DeepSeek-V3 report's 671B / 37B figures do. "Activated per token" counts a routed
expert's matrices with weight k / E (k of E experts run for each token) and everything
else in full, embedding included. The MTP module's count is its own parameters only; it
shares the embedding and head with the main model.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from flax import nnx

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers.basic import is_matrix


@dataclasses.dataclass(frozen=True)
class ParamReport:
    total_params: int  # main model
    activated_params: float  # main model, per token
    mtp_params: int  # MTP modules' own parameters
    mtp_activated_params: float


def _is_routed_expert(v: nnx.Variable) -> bool:
    return "expert" in (v.get_metadata().get("out_sharding") or ())


def param_report(abs_model: nnx.Module, cfg: ModelConfig) -> ParamReport:
    """Counts the parameters of an abstract (``nnx.eval_shape``) model."""
    frac = cfg.num_experts_per_tok / cfg.n_routed_experts
    sums = {"main": [0, 0.0], "mtp": [0, 0.0]}
    flat = nnx.state(abs_model, nnx.Param).flat_state()
    for path, v in flat:
        if not is_matrix(v):
            continue
        n = int(np.prod(v.shape))
        part = "mtp" if path[0] == "mtp" else "main"
        sums[part][0] += n
        sums[part][1] += n * frac if _is_routed_expert(v) else n
    return ParamReport(sums["main"][0], sums["main"][1], sums["mtp"][0], sums["mtp"][1])


def abstract_report(cfg: ModelConfig) -> ParamReport:
    from deepseek_jax.build import abstract_model

    return param_report(abstract_model(cfg), cfg)
