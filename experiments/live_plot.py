"""A live training plot for notebooks: pass ``LiveLoss().update`` as ``on_record`` to
``experiments.train.main``, and call ``close()`` in the same cell; the loss and
expert-balance curves are redrawn in place while it trains.

Outside IPython (a plain script) it only keeps the records and draws ``self.fig``.
"""

from __future__ import annotations

import time
from typing import Any


class LiveLoss:
    """Train / held-out cross-entropy and expert load max/mean, redrawn every ``every_s``."""

    def __init__(self, title: str = "", every_s: float = 2.0, moe_layers: int | None = None):
        """moe_layers: the main model's MoE layers; later rows of ``balance_L`` are MTP's."""
        import matplotlib.pyplot as plt

        self.records: list[dict[str, Any]] = []
        self.every_s = every_s
        self.moe_layers = moe_layers
        self._last = 0.0
        self.fig, (self.ax_loss, self.ax_bal) = plt.subplots(1, 2, figsize=(11, 3.8))
        self.fig.suptitle(title)
        self._handle = None
        try:
            from IPython import get_ipython
            from IPython.display import display

            if get_ipython() is not None:
                self._handle = display(self.fig, display_id=True)
        except ImportError:
            pass

    def update(self, rec: dict[str, Any]) -> None:
        """Takes one metrics record (``kind`` train or eval); redraws if ``every_s`` passed."""
        self.records.append(rec)
        if time.monotonic() - self._last >= self.every_s:
            self._draw()

    def close(self) -> None:
        """The final redraw; the figure is then closed so that it is not shown twice."""
        import matplotlib.pyplot as plt

        self._draw()
        plt.close(self.fig)

    def _draw(self) -> None:
        self._last = time.monotonic()
        train = [r for r in self.records if r["kind"] == "train"]
        evals = [r for r in self.records if r["kind"] == "eval"]
        a, b = self.ax_loss, self.ax_bal
        a.clear()
        b.clear()
        if train:
            steps = [r["step"] for r in train]
            a.plot(steps, [r["ce"] for r in train], lw=1, label="train CE")
            if "mtp_ce" in train[0]:
                a.plot(steps, [r["mtp_ce"] for r in train], lw=1, alpha=0.7, label="MTP CE")
            if "balance_L" in train[0]:
                for i, layer in enumerate(zip(*[r["balance_L"] for r in train], strict=True)):
                    main = self.moe_layers is None or i < self.moe_layers
                    b.plot(steps, layer, lw=1, label=f"MoE layer {i}" if main else "MTP")
        if evals:
            a.plot([r["step"] for r in evals], [r["ce"] for r in evals], "o-", label="held-out CE")
        a.set(xlabel="step", ylabel="nats / token", title="loss")
        b.axhline(1.0, color="gray", ls="--", lw=0.8)
        b.set(xlabel="step", ylabel="max / mean expert load", title="expert balance (1 = even)")
        for ax in (a, b):
            if ax.lines:
                ax.legend(fontsize=8)
        self.fig.tight_layout()
        if self._handle is not None:
            self._handle.update(self.fig)
