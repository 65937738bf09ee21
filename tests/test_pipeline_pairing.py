"""Which ticks the executor runs as one paired F&B computation (``pipeline/pairing.py``):
a paired tick's phases cover every stage's slot and are one stage's slot (so the masked
superset does not lengthen the lockstep tick), every DualPipe F&B slot lands in a paired
tick, and the runs partition the ticks."""

import numpy as np
import pytest

from deepseek_jax.pipeline.pairing import KINDS, PAIRED, paired_kind, phase_masks, runs
from deepseek_jax.pipeline.placement import layer_plan, tick_tables
from deepseek_jax.pipeline.schedule import make_schedule
from deepseek_jax.presets import get_preset


def _kinds(name: str, pp: int, m: int) -> np.ndarray:
    sched = make_schedule(name, pp, m)
    cfg = get_preset("tiny", [f"num_hidden_layers={2 * pp}"])
    return tick_tables(sched, layer_plan(cfg, sched))["kind"]


@pytest.mark.parametrize("name", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
@pytest.mark.parametrize("pp", [2, 4, 8])
def test_paired_ticks_cover_their_stages(name, pp):
    kind_TS = _kinds(name, pp, 2 * pp)
    masks = phase_masks()
    spans = runs(kind_TS)
    assert spans[0][0] == 0 and spans[-1][1] == len(kind_TS)
    assert all(a[1] == b[0] and a[2] != b[2] for a, b in zip(spans, spans[1:], strict=False))
    n_paired = 0
    for row in kind_TS:
        mode = paired_kind(row)
        if any(k in PAIRED for k in row):  # an F&B slot always runs paired
            assert mode in PAIRED, row
        if mode:
            n_paired += 1
            assert mode in row, row  # one stage runs the whole superset
            for k in row:  # every stage's phases are in it
                for ph in "FBW":
                    assert not masks[ph][k] or masks[ph][mode], (row, KINDS[mode])
    if name.startswith("dualpipe"):
        assert n_paired > 0
    else:  # one phase per slot: nothing to pair, 1F1B's F beside BW keeps its switch
        assert n_paired == 0


def test_phase_masks():
    m = phase_masks()
    assert [KINDS[k] for k in range(len(KINDS)) if m["F"][k]] == ["F", "FB", "FBW"]
    assert [KINDS[k] for k in range(len(KINDS)) if m["W"][k]] == ["W", "BW", "FBW"]
    assert not any(m[ph][0] for ph in "FBW")
