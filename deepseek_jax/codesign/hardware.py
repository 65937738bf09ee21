"""Accelerators and clusters for the co-design calculators (ISCA 2025 sections 2-5).

A ``Hardware`` is one scale-up domain (an 8-GPU HGX node, or a 72-GPU NVL72 rack); a
``Cluster`` is a number of them joined by a scale-out network with one NIC per GPU.
Bandwidths are per GPU and per direction, in the units vendors quote: scale-up in GB/s,
scale-out in Gb/s. Peak FLOP/s are dense (no 2:4 sparsity).

What is modelled: link bandwidths, peak dense throughput, HBM size. What is ignored:
latency (see ``topology.LATENCY_US``), PCIe, congestion, the NIC's message rate.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One scale-up domain of ``gpus_per_node`` GPUs.

    ``scale_up_effective_GBps`` is the bandwidth a real all-to-all reaches, where one has
    been measured (H800: 160 GB/s of its 200 GB/s per direction, V3TR section 3.2.2);
    None means "use the nominal figure".
    """

    name: str
    gpus_per_node: int
    scale_up_GBps: float  # NVLink, per GPU, per direction
    scale_out_Gbps: float  # InfiniBand / RoCE NIC, per GPU, per direction
    bf16_tflops: float  # dense peak, per GPU
    fp8_tflops: float
    hbm_GB: float
    scale_up_effective_GBps: float | None = None

    @property
    def scale_out_GBps(self) -> float:
        return self.scale_out_Gbps / 8

    @property
    def nvlink_GBps(self) -> float:
        """Scale-up bandwidth an all-to-all can use (measured where known, else nominal)."""
        return self.scale_up_effective_GBps or self.scale_up_GBps


@dataclasses.dataclass(frozen=True)
class Cluster:
    hardware: Hardware
    nodes: int

    @property
    def gpus(self) -> int:
        return self.nodes * self.hardware.gpus_per_node


# H800: NVLink cut to 400 GB/s bidirectional; 8 x 400 Gb/s CX7 InfiniBand per node.
H800 = Hardware(
    "H800",
    8,
    scale_up_GBps=200.0,
    scale_out_Gbps=400.0,
    bf16_tflops=989.5,
    fp8_tflops=1979.0,
    hbm_GB=80.0,
    scale_up_effective_GBps=160.0,
)
H100 = Hardware(
    "H100",
    8,
    scale_up_GBps=450.0,
    scale_out_Gbps=400.0,
    bf16_tflops=989.5,
    fp8_tflops=1979.0,
    hbm_GB=80.0,
)
H200 = dataclasses.replace(H100, name="H200", hbm_GB=141.0)
# GB200 NVL72: 72 GPUs in one NVLink domain, 1.8 TB/s bidirectional per GPU.
GB200_NVL72 = Hardware(
    "GB200 NVL72",
    72,
    scale_up_GBps=900.0,
    scale_out_Gbps=400.0,
    bf16_tflops=2500.0,
    fp8_tflops=5000.0,
    hbm_GB=186.0,
)

CLUSTERS: dict[str, Cluster] = {
    "h800": Cluster(H800, nodes=256),  # DeepSeek-V3's 2048-GPU training cluster
    "h100": Cluster(H100, nodes=128),
    "h200": Cluster(H200, nodes=128),
    "gb200-nvl72": Cluster(GB200_NVL72, nodes=1),
}


def get_cluster(name: str) -> Cluster:
    if name not in CLUSTERS:
        raise ValueError(f"unknown cluster {name!r}; choose one of {sorted(CLUSTERS)}")
    return CLUSTERS[name]


def ep_link_GBps(cluster: Cluster, ep_size: int) -> float:
    """Per-GPU bandwidth an EP all-to-all of ``ep_size`` ranks runs at (ISCA 2.3.2).

    Inside one scale-up domain the all-to-all uses NVLink; once it spans domains every
    token's copies to other domains leave over the GPU's NIC, which is the bottleneck.
    """
    hw = cluster.hardware
    return hw.nvlink_GBps if ep_size <= hw.gpus_per_node else hw.scale_out_GBps
