"""Scale-out network topologies: counts from switch radix, and a cost model (ISCA 2025 5.1,
Table 3).

Counts. ``endpoints`` are NIC ports, ``switches`` all switch boxes, ``links`` only
switch-to-switch cables (the paper's convention: FT2 has 2,048 links, not 2,048 + 2,048).

Cost model (the paper does not publish its own). Every switch port in use costs
``port_usd`` (its share of the switch plus an optical transceiver); every switch-to-switch
link adds ``fibre_usd`` of cable. Not counted: NICs and the endpoint-to-leaf cable, idle
ports, racks, power. The two prices are the least-squares fit of this model to the
paper's four distinct rows, rounded; every cost then lands within 0.5 % of the paper's.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class NetworkTopology:
    name: str
    endpoints: int
    switches: int
    links: int  # switch-to-switch

    @property
    def switch_ports_used(self) -> int:
        return self.endpoints + 2 * self.links


@dataclasses.dataclass(frozen=True)
class CostModel:
    port_usd: float = 1350.0
    fibre_usd: float = 360.0


def fat_tree_2(radix: int = 64) -> NetworkTopology:
    """Leaf-spine: k leaves (k/2 down, k/2 up), k/2 spines; k^2/2 endpoints, 3k/2 switches."""
    k = radix
    return NetworkTopology("FT2", k * k // 2, 3 * k // 2, k * k // 2)


def multi_plane_fat_tree(radix: int = 64, planes: int = 8) -> NetworkTopology:
    """MPFT: ``planes`` independent FT2s, one per NIC of an 8-GPU node (ISCA 5.1.1)."""
    one = fat_tree_2(radix)
    return NetworkTopology(
        "MPFT", planes * one.endpoints, planes * one.switches, planes * one.links
    )


def fat_tree_3(radix: int = 64) -> NetworkTopology:
    """Three-tier fat-tree: k pods of k/2 edge + k/2 aggregation switches, (k/2)^2 cores.

    k^3/4 endpoints, 5k^2/4 switches, k^3/4 edge-aggregation + k^3/4 aggregation-core links.
    """
    k = radix
    return NetworkTopology("FT3", k**3 // 4, 5 * k * k // 4, k**3 // 2)


def slim_fly_q(radix: int) -> tuple[int, int, int]:
    """The largest MMS parameter q (= 4w + delta) whose routers fit ``radix`` ports.

    Network radix k' = (3q - delta)/2, concentration p = ceil(k'/2) (balanced).
    Returns (q, k', p). MMS graphs need q to be a prime power; the paper's counts use
    q = 28, which is not one, so the count is a radix bound rather than a buildable graph.
    """
    best = None
    for q in range(3, radix):
        delta = {0: 0, 1: 1, 3: -1}.get(q % 4)
        if delta is None:
            continue
        kn = (3 * q - delta) // 2
        p = -(-kn // 2)
        if kn + p <= radix:
            best = (q, kn, p)
    return best


def slim_fly(radix: int = 64) -> NetworkTopology:
    """Slim Fly (MMS diameter-2 graph): 2q^2 routers of k' network and p endpoint ports."""
    q, kn, p = slim_fly_q(radix)
    routers = 2 * q * q
    return NetworkTopology("Slim Fly", routers * p, routers, routers * kn // 2)


def dragonfly(radix: int = 64, groups: int | None = None) -> NetworkTopology:
    """Balanced Dragonfly (Kim et al. 2008): p = h endpoint / global ports, a = 2p routers
    per group, all-to-all inside a group, every global port cabled.

    ``groups`` defaults to a*h - 1, which reproduces the paper's counts exactly; the
    canonical maximum is a*h + 1 (one global link between every pair of groups).
    """
    p = h = (radix + 1) // 4  # p + (a - 1) + h = 4p - 1 <= radix
    a = 2 * p
    g = a * h - 1 if groups is None else groups
    intra = g * a * (a - 1) // 2
    glob = g * a * h // 2
    return NetworkTopology("Dragonfly", g * a * p, g * a, intra + glob)


def topology_cost_usd(t: NetworkTopology, cost: CostModel = CostModel()) -> float:
    """Total cost by the module's cost model."""
    return t.switch_ports_used * cost.port_usd + t.links * cost.fibre_usd


def paper_topologies(radix: int = 64) -> list[NetworkTopology]:
    """The five rows of ISCA Table 3, in its order."""
    return [
        fat_tree_2(radix),
        multi_plane_fat_tree(radix),
        fat_tree_3(radix),
        slim_fly(radix),
        dragonfly(radix),
    ]


# ISCA Table 3 latency row, measured (us): (same leaf, cross leaf); NVLink has no leaves.
LATENCY_US = {"RoCE": (3.6, 5.6), "InfiniBand": (2.8, 3.7), "NVLink": (3.33, None)}
