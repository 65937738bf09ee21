"""Why all-to-alls stay exposed: the harness's figures, a per-loop-body table read from the
scheduled HLO, and what the dual schedule could hide at best at a given width.

- ``summary``: the harness's JSON figures (counts, hidden fractions per phase).
- ``body_table``: per computation holding all-to-alls (a scan body runs once per layer):
  its compute-stream time under the cost model split by what the ops belong to (attention,
  routed and shared experts, the scan's residual stacks, the rest: routing, permutes,
  casts), against the transfer time of its all-to-alls and what was hidden.
- ``phase_bound``: the dual schedule's pairing, in numbers (one MoE block, one device, one
  half of T tokens): dispatch(A) beside attention(B), dispatch(B) beside experts(A),
  combine(A) beside experts(B) + shared(A), combine(B) beside shared(B) alone inside a
  scan body (the next block's attention(A) if it were deferred across the loop boundary).
  Compute counts GEMM FLOPs at the model's rate (balanced routing, the useful T K rows);
  transfer counts the padded buffers the program sends. hidden <= sum min(transfer, paired
  compute) / sum transfer; backward GEMMs are 2x the forward's beside the same bytes.
  ``ceiling``: no schedule hides more of a block's forward transfers behind its GEMMs than
  all of them (both halves) against all the transfers, whatever the pairing.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any

from deepseek_jax.codesign.flops import mla_params
from deepseek_jax.codesign.schedule import Collective, CostModel, Schedule
from deepseek_jax.config import ModelConfig
from deepseek_jax.mesh import STAGE
from deepseek_jax.moe.dispatch import Capacities, Topology
from deepseek_jax.sharding import RULES, expert_links

# op_name fragments -> the part of the block an op belongs to (first match wins)
PARTS = (
    ("residual stacks", "dynamic_update_slice"),
    ("shared experts", "shared_experts"),
    ("routed experts", "ecd,edf"),
    ("attention", "/mla"),
)


def _hidden_fraction(cs: list[Collective]) -> float:
    """Transfer-time-weighted hidden fraction (loop trips counted); 1.0 when nothing moves."""
    total = sum(c.transfer_s * c.trips for c in cs)
    return sum(c.hidden * c.transfer_s * c.trips for c in cs) / total if total else 1.0


def summary(sched: Schedule) -> dict[str, Any]:
    """The schedule's figures (the harness's JSON keys); counts are HLO instructions."""
    cs = sched.collectives
    a2a = [c for c in cs if c.kind == "all-to-all"]
    over = [c for c in a2a if c.overlapped]
    nbytes = sum(c.nbytes * c.trips for c in a2a)
    out: dict[str, Any] = {
        "collectives": len(cs),
        "all_to_all_total": len(a2a),
        "all_to_all_overlapped": len(over),
        "all_to_all_overlapped_bytes_fraction": (
            sum(c.nbytes * c.trips for c in over) / nbytes if nbytes else 1.0
        ),
        "all_to_all_hidden_fraction": _hidden_fraction(a2a),
        "sync_collectives": sum(not c.is_async for c in cs),
        "sync_all_to_all": sum(not c.is_async for c in a2a),
    }
    for phase in ("forward", "backward"):
        part = [c for c in a2a if c.phase == phase]
        out[f"all_to_all_hidden_fraction_{phase}"] = _hidden_fraction(part)
        out[f"sync_all_to_all_{phase}"] = sum(not c.is_async for c in part)
    stage = [c for c in cs if c.kind == "collective-permute" and c.axes == (STAGE,)]
    out["stage_collective_permute_total"] = len(stage)  # a pipeline's stage-to-stage transfers
    out["stage_collective_permute_overlapped"] = sum(c.overlapped for c in stage)
    out["sync_stage_collective_permute"] = sum(not c.is_async for c in stage)
    out["stage_collective_permute_hidden_fraction"] = _hidden_fraction(stage)
    # The best any schedule can do under the model: all compute of the program against all
    # all-to-all transfer time (each counted once per trip).
    out["all_to_all_transfer_s"] = sum(c.transfer_s * c.trips for c in a2a)
    out["program_compute_s"] = sched.program_compute_s()
    return out


def body_table(sched: Schedule) -> list[dict[str, Any]]:
    """One row per computation with all-to-alls: trips, its compute by part (us, one
    execution), all-to-all transfer (us), hidden transfer (us), sync count."""
    where = {i.name: comp for comp, instrs in sched.comps.items() for i in instrs}
    by_comp: dict[str, list[Collective]] = collections.defaultdict(list)
    for c in sched.collectives:
        if c.kind == "all-to-all":
            by_comp[where[c.name]].append(c)
    rows = []
    for comp, cs in by_comp.items():
        parts: dict[str, float] = collections.Counter()
        for ins in sched.comps[comp]:
            name = next((p for p, frag in PARTS if frag in ins.op_name), "other")
            parts[name] += sched.cost(comp, ins) * 1e6
        phases = sorted({c.phase for c in cs})
        rows.append(
            {
                "computation": re.sub(r"(\.clone)+$", "", comp),
                "phase": "+".join(phases),
                "trips": cs[0].trips,
                "compute_us": {k: round(v, 1) for k, v in parts.items() if v > 0},
                "transfer_us": round(sum(c.transfer_s for c in cs) * 1e6, 1),
                "hidden_us": round(sum(c.hidden * c.transfer_s for c in cs) * 1e6, 1),
                "sync": sum(not c.is_async for c in cs),
            }
        )
    return rows


@dataclasses.dataclass(frozen=True)
class PhaseBound:
    """Seconds per half and block (forward): transfers, paired GEMM compute, the bound."""

    dispatch_s: float
    combine_s: float
    attention_s: float
    experts_s: float
    shared_s: float
    forward: float  # best hidden fraction, combine(B) inside the block
    backward: float
    deferred: float  # forward, combine(B) beside the next block's attention(A)
    ceiling: float  # forward, any pairing: the block's GEMMs against all its transfers


def phase_bound(
    cfg: ModelConfig,
    tokens: int,
    seq_len: int,
    nodes: int,
    gpus: int,
    model: CostModel | None = None,
) -> PhaseBound:
    """What the dual schedule could hide at best for ``cfg`` with ``tokens`` per device
    (both halves) on a (nodes, gpus) mesh (see the module note)."""
    model = model or CostModel()
    T, D, K = tokens // 2, cfg.hidden_size, cfg.num_experts_per_tok
    limited = cfg.topk_method != "greedy" and cfg.topk_group < cfg.n_group
    inter, intra = expert_links(RULES)
    reach = min(cfg.topk_group, nodes) if limited else nodes
    topo = Topology(nodes, gpus, cfg.n_routed_experts, reach, inter, intra)
    caps = Capacities.for_tokens(T, K, topo, cfg.run.ep.capacity_factor)
    send = 1 + 4 / 128 if cfg.run.ep.fp8_dispatch else 2  # bytes per element on the wire

    def hops(nbytes: float) -> float:
        return sum(model.exchange_s(topo, caps, D * nbytes, cfg.run.ep.path == "flat"))

    ffn = 6 * D * cfg.moe_intermediate_size  # forward FLOPs of one token through one expert
    core = 2 * seq_len * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) / 2
    attn = T * (2 * mla_params(cfg) + core) / model.flops
    experts, shared = T * K * ffn / model.flops, T * cfg.n_shared_experts * ffn / model.flops
    x_d, x_c = hops(send), hops(2)

    def bound(scale: float, last: float) -> float:
        pairs = [(x_d, attn), (x_d, experts), (x_c, experts + shared), (x_c, last)]
        total = 2 * x_d + 2 * x_c  # 0 on one device: nothing to hide
        return sum(min(x, scale * c) for x, c in pairs) / total if total else 1.0

    total = 2 * (x_d + x_c)
    ceiling = min(1.0, 2 * (attn + experts + shared) / total) if total else 1.0
    return PhaseBound(
        x_d, x_c, attn, experts, shared,
        forward=bound(1, shared), backward=bound(2, shared), deferred=bound(1, shared + attn),
        ceiling=ceiling,
    )  # fmt: skip


def at_width(cfg: ModelConfig, width: int) -> ModelConfig:
    """``cfg`` widened to ``hidden_size=width``: the FFN, head count and low ranks scaled
    alike (head dims kept), so its proportions stay those of ``cfg``."""
    f = width / cfg.hidden_size
    scaled = ("moe_intermediate_size", "intermediate_size", "num_attention_heads")
    scaled += ("q_lora_rank", "kv_lora_rank")
    fields = {k: str(max(1, round(getattr(cfg, k) * f))) for k in scaled if getattr(cfg, k)}
    return cfg.with_overrides({"hidden_size": str(width), **fields})
