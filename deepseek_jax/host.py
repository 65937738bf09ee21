"""The machine a run is on, as benchmarks and the backend chooser name it: the CPU model,
its widest vector instruction set, and the kernel build it compiled."""

import platform
from pathlib import Path

import jax

import cpu_kernels.build as build


def cpu_model() -> str:
    """The CPU's model name (x86 ``model name``, or Arm's implementer/part), else the
    platform's processor string."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        info = []
    for key in ("model name", "Model", "CPU part"):
        for line in info:
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def vector_isa() -> str:
    """The widest float32 vector instruction set the CPU offers: ``AVX-512``,
    ``AVX2+FMA``, ``AVX``, ``NEON`` or ``SSE2`` (x86 baseline) / ``none``."""
    flags = set(build.cpu_flags().split())
    if "avx512f" in flags:
        return "AVX-512"
    if {"avx2", "fma"} <= flags:
        return "AVX2+FMA"
    if "avx" in flags:
        return "AVX"
    if flags & {"asimd", "neon"} or platform.machine().lower() in ("aarch64", "arm64"):
        return "NEON"
    return "SSE2" if platform.machine().lower() in ("x86_64", "amd64") else "none"


def machine() -> dict[str, str]:
    """What benchmarks print and put in their JSON: platform, CPU, vector ISA, kernel
    build variant and the register tile it compiled to."""
    info = {"platform": jax.default_backend(), "cpu": cpu_model(), "vector_isa": vector_isa()}
    variant = build.default_variant()
    info["kernel_variant"] = variant
    try:
        import cpu_kernels.grouped_gemm as grouped_gemm

        info["kernel_tiles"] = grouped_gemm.KERNEL.tile_config(variant)
    except build.KernelBuildError:
        info["kernel_tiles"] = "not built"
    return info
