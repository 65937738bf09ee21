"""Node-limited routing: inter-node traffic per token (V3TR 2.1.2 and 3.2.2, ISCA 4.3).

V3 places one expert group per node (256 experts = 8 groups of 32 on 8 nodes of 8 GPUs)
and lets each token reach at most M = ``topk_group`` groups. A token is sent over IB once
per target node and fanned out to that node's experts over NVLink, so its inter-node
copies drop from up to k (one per expert) to at most M.

Counted: IB copies of one token's hidden state, as the paper counts them (the token's own
node included, so these are upper bounds). Ignored: payload size (the same for every
copy), the NVLink hop's latency, load imbalance.

Shape letters: T tokens, K experts per token.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from deepseek_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class RoutingTraffic:
    copies_unlimited: int  # worst case without the node limit: one per expert
    copies_limited: int  # with it: one per node, at most M
    copies_uniform: float  # expected distinct nodes for k experts drawn uniformly, no limit
    experts_per_node: float  # NVLink fan-out affordable per IB copy at equal time
    experts_per_token: float  # M x experts_per_node: routed experts reachable at equal cost


def expected_nodes_uniform(n_experts: int, n_nodes: int, k: int) -> float:
    """Expected distinct nodes among k experts drawn without replacement, uniformly."""
    per_node = n_experts // n_nodes
    miss = math.comb(n_experts - per_node, k) / math.comb(n_experts, k)
    return n_nodes * (1 - miss)


def routing_traffic(
    cfg: ModelConfig, nvlink_GBps: float = 160.0, ib_GBps: float = 50.0
) -> RoutingTraffic:
    """Inter-node copies per token with and without the node limit, and the equal-cost
    expert count (ISCA 4.3: 160 / 50 = 3.2 experts per node, about 13 per token).

    Nodes are the config's expert groups (``n_group``), the V3 deployment's layout.
    """
    k, nodes, m = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
    per_node = nvlink_GBps / ib_GBps
    return RoutingTraffic(
        copies_unlimited=min(k, nodes),
        copies_limited=min(m, k),
        copies_uniform=expected_nodes_uniform(cfg.n_routed_experts, nodes, k),
        experts_per_node=per_node,
        experts_per_token=m * per_node,
    )


def internode_copies(
    idx_TK: np.ndarray, src_node_T: np.ndarray, experts_per_node: int
) -> tuple[np.ndarray, np.ndarray]:
    """Inter-node copies each token's dispatch sends, flat against two-hop.

    Counted as ``moe.dispatch`` counts them (``MoEStats.internode``): the flat exchange
    sends one copy per chosen expert on another node, the two-hop exchange one per other
    node the token reaches (fanned out over NVLink there). The token's own node costs none.

    Args:
      idx_TK: the chosen experts [T, K] (any leading axes flattened by the caller).
      src_node_T: the node each token starts on [T].
      experts_per_node: routed experts per node (experts are laid out node-major).
    Returns:
      (flat_T, two_hop_T): int copies per token [T] each.
    """
    idx_TK, src_node_T = np.asarray(idx_TK), np.asarray(src_node_T)
    if idx_TK.ndim != 2 or src_node_T.shape != idx_TK.shape[:1]:
        raise ValueError(
            f"internode_copies: idx_TK {idx_TK.shape} must be [T, K] and src_node_T "
            f"{src_node_T.shape} [T]"
        )
    node_TK = np.sort(idx_TK // experts_per_node, axis=-1)
    away_TK = node_TK != src_node_T[:, None]
    new_TK = np.ones_like(away_TK)  # a node's first occurrence in the sorted row
    new_TK[:, 1:] = node_TK[:, 1:] != node_TK[:, :-1]
    return away_TK.sum(-1), (away_TK & new_TK).sum(-1)
