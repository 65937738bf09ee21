"""Metrics as JSON lines and TensorBoard events, and the end-of-run plot."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np


class MetricsLogger:
    """Appends one JSON object per record to ``metrics.jsonl``; mirrors scalars to TensorBoard."""

    def __init__(self, out_dir: str, *, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(out_dir, "tb"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        flat = {k: _to_py(v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(flat) + "\n")
        step = flat.get("step", 0)
        for k, v in flat.items():
            if k == "step":
                continue
            if isinstance(v, list):
                for i, x in enumerate(v):
                    self.tb.add_scalar(f"{k}/{i}", x, step)
            elif isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _to_py(v: Any) -> Any:
    a = np.asarray(v)
    if a.ndim == 0:
        return a.item() if a.dtype.kind != "f" else float(a)
    return a.astype(float).tolist()


def read_metrics(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_run(metrics_path: str, png_path: str) -> None:
    """Loss curves (train, eval, MTP) and expert balance (max/mean load) per MoE layer."""
    # A bare Figure, not pyplot: switching the process's backend would break a notebook's.
    from matplotlib.figure import Figure

    recs = read_metrics(metrics_path)
    train = [r for r in recs if r.get("kind") == "train"]
    evals = [r for r in recs if r.get("kind") == "eval"]
    fig = Figure(figsize=(12, 4.5))
    ax1, ax2 = fig.subplots(1, 2)
    if train:
        steps = [r["step"] for r in train]
        ax1.plot(steps, [r["ce"] for r in train], label="train CE", lw=1)
        if "mtp_ce" in train[0]:
            ax1.plot(steps, [r["mtp_ce"] for r in train], label="train MTP CE", lw=1)
    if evals:
        ax1.plot([r["step"] for r in evals], [r["ce"] for r in evals], "o-", label="eval CE")
    base = next((r["unigram_entropy"] for r in recs if "unigram_entropy" in r), None)
    if base is not None:
        ax1.axhline(base, color="gray", ls="--", label="unigram entropy")
    ax1.set(xlabel="step", ylabel="nats/token", title="loss")
    ax1.legend()
    if train and "balance_L" in train[0]:
        bal = np.array([r["balance_L"] for r in train])
        n_main = next((r["num_moe_layers"] for r in recs if "num_moe_layers" in r), bal.shape[1])
        for i in range(bal.shape[1]):
            name = f"MoE layer {i}" if i < n_main else f"MTP {i - n_main + 1}"
            ax2.plot([r["step"] for r in train], bal[:, i], lw=1, label=name)
        ax2.set(xlabel="step", ylabel="max / mean expert load", title="expert balance")
        ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
