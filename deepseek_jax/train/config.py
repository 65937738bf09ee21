"""Training configuration: frozen data, validated, with REFERENCE.md's defaults."""

from __future__ import annotations

import dataclasses

from deepseek_jax.config import LAYER_LOOPS
from deepseek_jax.pipeline.schedule import SCHEDULES

REMATS = ("none", "full", "dots")
PIPELINES = ("none", *SCHEDULES)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    mtp_weight: float = 0.3  # V3TR 2.2: 0.3 for the first 10T tokens, then 0.1
    balance_alpha: float = 1e-4  # V3TR 2.1.2: sequence-wise balance loss
    bias_gamma: float = 1e-3  # aux-loss-free bias update speed
    remat: str = "none"
    layer_loop: str = "auto"  # scan or unroll the layer stacks; auto: unroll on CPU
    pipeline: str = "none"  # schedule over the mesh's stage axis (pipeline/schedule.py)
    microbatches: int = 1  # per step, each from every device's local batch (pipelined)
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 100
    keep: int = 2

    def __post_init__(self):
        for name in (
            "steps",
            "batch_size",
            "seq_len",
            "eval_every",
            "ckpt_every",
            "keep",
            "eval_batches",
            "microbatches",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} = {getattr(self, name)}: must be positive")
        for name in ("lr", "clip_norm", "eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TrainConfig.{name} = {getattr(self, name)}: must be positive")
        for name in ("weight_decay", "mtp_weight", "balance_alpha", "bias_gamma", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} = {getattr(self, name)}: must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig.min_lr_ratio = {self.min_lr_ratio}: must be in [0, 1]")
        if self.remat not in REMATS:
            raise ValueError(f"TrainConfig.remat = {self.remat!r}: must be one of {REMATS}")
        if self.pipeline not in PIPELINES:
            raise ValueError(
                f"TrainConfig.pipeline = {self.pipeline!r}: must be one of {PIPELINES}"
            )
        if self.microbatches > 1 and self.pipeline == "none":
            raise ValueError(
                f"TrainConfig.microbatches = {self.microbatches}: needs a --pipeline schedule"
            )
        if self.layer_loop not in LAYER_LOOPS:
            raise ValueError(
                f"TrainConfig.layer_loop = {self.layer_loop!r}: must be one of {LAYER_LOOPS}"
            )

    @property
    def model_options(self) -> dict[str, str]:
        """The Transformer's keyword options this run sets."""
        return {"remat": self.remat, "layer_loop": self.layer_loop}
