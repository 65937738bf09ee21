"""Scheduled HLO as a timeline (codesign/timeline.py), on a hand-written module whose every
bar follows from the cost model by hand: an async all-to-all with a GEMM in its window, one
with nothing in it, a loop of sync all-to-alls (unrolled) and a loop without collectives
(one op)."""

import pytest

from deepseek_jax.codesign.schedule import CostModel
from deepseek_jax.codesign.timeline import OTHER, category, timeline, totals
from tests.hlo_fixtures import AXES, a2a_module

HLO = a2a_module(dot_op_name="jit(f)/mla_q/dot_general", plain_loop=True)


def test_bars_follow_the_schedule_and_the_cost_model():
    m = CostModel()
    bars = timeline(HLO, AXES, m)
    assert [(b.lane, b.name) for b in bars] == [
        ("compute", "g"), ("collective", "s"), ("collective", "s2"),
        *[("collective", "a2a")] * 3, ("compute", "loop2"),
    ]  # fmt: skip
    g, s, s2, *loop, loop2 = bars
    gemm = 2 * 64 * 256 * 128 / m.flops  # 4.2 ns
    a2a_gpu = 1024 * 3 / 4 / 160e9  # 3/4 of the bf16[4,16,8] buffer leaves: 4.8 ns
    a2a_node = 512 / 2 / 50e9  # half of bf16[2,16,8] over the slower link: 5.1 ns
    assert (g.start_s, g.end_s, g.category) == (0.0, pytest.approx(gemm), "attention")
    # s started before the GEMM, so only its tail past the GEMM stalls the compute stream
    assert (s.start_s, s.end_s) == (0.0, pytest.approx(a2a_gpu))
    assert s.transfer_s == pytest.approx(a2a_gpu) and s.stall_s == pytest.approx(a2a_gpu - gemm)
    assert s.is_async and s.axes == ("gpu",) and s.category == "all-to-all"
    # s2 has nothing in its window: all of it is stall
    assert s2.start_s == pytest.approx(a2a_gpu) and s2.stall_s == pytest.approx(a2a_node)
    assert s2.axes == ("node",)
    # the loop's sync all-to-all, once per trip, each stalling the stream whole
    t = a2a_gpu + a2a_node
    for k, b in enumerate(loop):
        assert not b.is_async and b.start_s == pytest.approx(t + k * a2a_gpu)
        assert b.end_s - b.start_s == pytest.approx(a2a_gpu) and b.stall_s == b.transfer_s
    # a loop without collectives is one op: 2 trips of an f32[256] add (3 x 1 KB moved)
    assert loop2.start_s == pytest.approx(t + 3 * a2a_gpu)
    assert loop2.end_s - loop2.start_s == pytest.approx(2 * 3 * 1024 / m.hbm_Bps)
    assert loop2.category == "routed experts"

    tot = totals(bars)
    assert tot.makespan_s == pytest.approx(loop2.end_s)
    assert tot.makespan_s == pytest.approx(tot.compute_s + tot.stall_s)
    assert tot.transfer_s == pytest.approx(4 * a2a_gpu + a2a_node)
    assert tot.overlapped_s == pytest.approx(gemm)  # the GEMM hid that much of s


def test_categories_and_bad_modules():
    assert category("jit(fn)/while/body/mla_decode/mla_q/dot_general") == "attention"
    assert category("jit(fn)/shard_map/router/top_k") == "router"
    assert category("jit(fn)/shared_experts/dot_general") == "shared expert"
    assert category("jit(fn)/shard_map/ecd,edf->ecf/dot_general") == "routed experts"
    assert category("jit(fn)/shard_map/jit(_take)/select_n") == OTHER
    with pytest.raises(ValueError, match="no ENTRY"):
        timeline("HloModule m\n", AXES)
    done = "  %d2 = bf16[2,16,8]{2,1,0} all-to-all-done(%s2)\n"
    early = HLO.replace(done, "").replace("  %s2 = ", done + "  %s2 = ")
    with pytest.raises(ValueError, match="d2 is done before s2 started"):
        timeline(early, AXES)
