"""What every benchmark prints and records beside its figures: the CPU, its vector
instruction set, the kernel build, and the backend each ``auto`` resolved to.

A kernel tuned on one CPU ran 10-30x slower than XLA on another, so a figure without
the machine and the backends it ran on cannot be compared with anything.
"""

from __future__ import annotations

import logging

from deepseek_jax import backends, host


def log_backend_choices() -> None:
    """Shows ``deepseek_jax.backends``' one-line decisions on stderr."""
    logging.basicConfig(format="%(message)s")
    logging.getLogger("deepseek_jax").setLevel(logging.INFO)


def describe() -> dict:
    """Machine facts and this process's backend choices (call after the run)."""
    return {**host.machine(), "backends": backends.decisions()}


def print_description(info: dict) -> None:
    print(
        f"machine: {info['cpu']} ({info['vector_isa']}); {info['platform']}; C++ kernels: "
        f"{info['kernel_variant']} build, {info['kernel_tiles']} tiles"
    )
    for what, choice in info["backends"].items():
        print(f"  backend {what}: {choice}")
