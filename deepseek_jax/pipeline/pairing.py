"""Which ticks run as one paired forward-and-backward computation (DualPipe's F&B overlap).

Design note. The executor runs a slot's kinds through ``lax.switch``; XLA schedules a
conditional as one op, so the all-to-alls inside one micro-batch's forward can never overlap
the other micro-batch's backward when the two sit in separate switches (the deviceless GPU
compile showed it). A tick in which some stage runs an F&B pair (kind FB or FBW) is therefore
run without a switch: every stage runs that pair's superset of phases in one computation and
masks out the phases its own slot lacks. In a lockstep tick the slowest stage sets the
duration, and that is the pair, so the masked work of the other stages sits in time they
would spend waiting; only their energy is spent. A tick whose phases' union is not one
stage's slot (1F1B's F beside BW) keeps the switch: running F + BW everywhere would lengthen
it. Inside the paired computation the forward's and the backward's collectives are
independent, and XLA's latency-hiding scheduler puts each beside the other's compute, the
dual micro-batch mechanism of ``overlap.py`` (there: two halves of a batch; here: two
micro-batches in flight). Not done: pinning the pair layer by layer with
``optimization_barrier`` chains (the backward would need per-layer stored inputs).
"""

from __future__ import annotations

import numpy as np

KINDS = ("idle", "F", "B", "W", "BW", "FB", "FBW")  # slot kinds, by the phases they hold
PAIRED = (KINDS.index("FB"), KINDS.index("FBW"))


def phase_masks() -> dict[str, np.ndarray]:
    """[kinds] bool per phase: does a slot of this kind run F, B (input grad), W?"""
    return {ph: np.asarray([ph in k and k != "idle" for k in KINDS]) for ph in "FBW"}


def paired_kind(kinds_S: np.ndarray) -> int:
    """The kind a tick runs without a switch (FB or FBW), or 0 to keep the switch.

    Args:
      kinds_S: [PP] slot kinds of one tick.
    """
    present = {int(k) for k in kinds_S}
    union = "".join(ph for ph in "FBW" if any(ph in KINDS[k] for k in present if k))
    kind = KINDS.index(union) if union in KINDS else 0
    return kind if kind in PAIRED and kind in present else 0


def runs(kind_TS: np.ndarray) -> list[tuple[int, int, int]]:
    """Consecutive ticks with the same mode: (start, stop, paired kind or 0 for switched)."""
    modes = [paired_kind(row) for row in kind_TS]
    out: list[tuple[int, int, int]] = []
    for t, mode in enumerate(modes):
        if out and out[-1][2] == mode:
            out[-1] = (out[-1][0], t + 1, mode)
        else:
            out.append((t, t + 1, mode))
    return out
