"""Schedule tables: legality, and bubble / memory counts against V3TR Table 2's formulas."""

from __future__ import annotations

import dataclasses
import json

import pytest

from deepseek_jax.pipeline.schedule import (
    SCHEDULES,
    B,
    Costs,
    Op,
    W,
    check,
    counts,
    make_schedule,
    ticks,
)

UNIT = Costs(f=1.0, b=2.0, w=1.0)  # F = B_input = W: the formulas' assumption
OVERLAP = Costs(f=1.0, b=2.0, w=1.0, fb=2.5)  # F&B faster than F + B


def formula(name: str, pp: int, c: Costs) -> float:
    fb = c.f + c.b if c.fb is None else c.fb
    return {
        "1f1b": (pp - 1) * (c.f + c.b),
        "zb1p": (pp - 1) * (c.f + c.b - 2 * c.w),
        "dualpipe": (pp / 2 - 1) * (fb + c.b - 3 * c.w),
        # DualPipeV on PP devices is DualPipe's formula with 2 PP chunk-stages
        "dualpipev": (2 * pp / 2 - 1) * (fb + c.b - 3 * c.w),
    }[name]


PEAK = {"1f1b": lambda p: p, "zb1p": lambda p: p, "dualpipe": lambda p: p + 1}
PEAK["dualpipev"] = lambda p: 2 * p + 1  # in half-stage chunks: DualPipe's PP + 1 at 2 PP


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("pp", [2, 4, 8, 16])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_tables_legal_and_match_formulas(name, pp, k):
    m = k * pp
    if name.startswith("dualpipe") and k == 1:
        with pytest.raises(ValueError, match=f"at least {2 * pp} micro-batches"):
            make_schedule(name, pp, m)
        return
    sched = make_schedule(name, pp, m)  # runs check()
    table = ticks(sched)
    assert len(table) == pp
    for c in (UNIT, OVERLAP):
        got = counts(sched, c)
        assert got.bubble == pytest.approx(formula(name, pp, c)), (name, pp, m, c)
        busy = m * (c.f + c.b) * (1 if name != "dualpipev" else 2)  # chunk work per stage
        if c.fb is None:  # all the work, then the bubble: nothing else in the makespan
            assert got.makespan == pytest.approx(busy + got.bubble)
    assert counts(sched, UNIT).peak_activations == PEAK[name](pp)
    assert counts(sched).param_chunks == (2 if name.startswith("dualpipe") else 1)


def test_dualpipe_beats_zb1p_beats_1f1b():
    frac = {n: counts(make_schedule(n, 8, 16)).bubble_fraction for n in SCHEDULES}
    assert frac["dualpipe"] < frac["zb1p"] < frac["1f1b"]


def test_dualpipe_feeds_both_ends():
    sched = make_schedule("dualpipe", 4, 8)
    first = {s: next(slot for slot in sched.orders[s]) for s in (0, 3)}
    assert first[0][0].direction == 0 and first[3][0].direction == 1
    assert sched.paths[0][0] == (0, 0) and sched.paths[7][0] == (3, 1)


def _replace_orders(sched, stage, order):
    orders = list(sched.orders)
    orders[stage] = tuple(order)
    return dataclasses.replace(sched, orders=tuple(orders))


def test_checker_rejects_broken_tables():
    sched = make_schedule("1f1b", 4, 4)
    order = list(sched.orders[1])
    with pytest.raises(ValueError, match="missing"):  # an op dropped
        check(_replace_orders(sched, 1, order[:-1]))
    with pytest.raises(ValueError, match="repeated"):  # an op twice
        check(_replace_orders(sched, 1, order + order[-1:]))
    with pytest.raises(ValueError, match="deadlock"):  # a backward before its forward
        check(_replace_orders(sched, 3, list(reversed(sched.orders[3]))))
    bad = [((Op(0, 0, 0, B), Op(1, 0, 0, W)) if i == 0 else s) for i, s in enumerate(order)]
    with pytest.raises(ValueError):  # a W fused with another micro-batch's B
        check(_replace_orders(sched, 1, bad))


@pytest.mark.parametrize(
    "name,pp,m,match",
    [
        ("dualpipe", 3, 6, "even stage count"),
        ("1f1b", 4, 3, "at least 4 micro-batches"),
        ("dualpipe", 4, 9, "even number"),
        ("gpipe", 4, 8, "unknown schedule"),
    ],
)
def test_bad_arguments(name, pp, m, match):
    with pytest.raises(ValueError, match=match):
        make_schedule(name, pp, m)


def test_bench_pipeline(tmp_path, capsys):
    from experiments.bench_pipeline import draw, main

    out = main(["--no-plots"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == out and set(out) == {f"bubble_fraction_{n}" for n in SCHEDULES}
    assert out["bubble_fraction_dualpipe"] < min(
        out["bubble_fraction_1f1b"], out["bubble_fraction_zb1p"]
    )
    draw(make_schedule("dualpipe", 4, 8), UNIT, str(tmp_path / "d.png"))
    assert (tmp_path / "d.png").stat().st_size > 0
