"""The scheduled-HLO reader of the deviceless GPU compile (codesign/schedule.py), on a small
hand-written module whose figures follow from the cost model by hand."""

import pytest

from deepseek_jax.codesign.overlap_report import summary
from deepseek_jax.codesign.schedule import CostModel, Schedule, mesh_axes, shape_bytes
from tests.hlo_fixtures import AXES, a2a_module

HLO = a2a_module()


def test_windows_sync_trips_and_hidden_fraction():
    model = CostModel()
    sched = Schedule(HLO, AXES, model)
    by = {c.name: c for c in sched.collectives}
    assert set(by) == {"s", "s2", "a2a"}
    s, s2, loop = by["s"], by["s2"], by["a2a"]
    assert s.window == ["g"] and s.overlapped and s.axes == ("gpu",)
    assert s.compute_s == pytest.approx(2 * 64 * 256 * 128 / model.flops)
    assert s.transfer_s == pytest.approx(1024 * 3 / 4 / 160e9)  # 3/4 of 4x16x8 bf16 leaves
    assert s.hidden == pytest.approx(s.compute_s / s.transfer_s)  # 4.2 ns of 4.8 ns hidden
    assert s2.is_async and not s2.overlapped and s2.hidden == 0.0 and s2.axes == ("node",)
    assert not loop.is_async and loop.trips == 3 and loop.phase == "backward"
    out = summary(sched)
    assert out["all_to_all_total"] == 3 and out["all_to_all_overlapped"] == 1
    assert out["sync_all_to_all"] == 1 and out["sync_all_to_all_backward"] == 1
    t = [s.transfer_s, s2.transfer_s, 3 * loop.transfer_s]
    assert out["all_to_all_hidden_fraction"] == pytest.approx(s.hidden * t[0] / sum(t))
    assert out["all_to_all_hidden_fraction_backward"] == 0.0


def test_shapes_and_replica_group_forms():
    assert shape_bytes("((bf16[2,3]{1,0}), f32[4]{0})") == 2 * 6 + 16
    assert shape_bytes("f8e4m3fn[128,128]{1,0}") == 128 * 128
    assert mesh_axes("replica_groups={{0,1,2,3},{4,5,6,7}}", AXES) == ("gpu",)
    assert mesh_axes("replica_groups={{0,4},{1,5},{2,6},{3,7}}", AXES) == ("node",)
    assert mesh_axes("replica_groups=[4,2]<=[2,4]T(1,0)", AXES) == ("node",)
    assert mesh_axes("replica_groups=mesh['axis_0'=8] {'axis_0'}", AXES) == ("node", "gpu")


def test_not_a_compiled_module_is_named():
    with pytest.raises(ValueError, match="ENTRY"):
        Schedule("HloModule m\n", AXES)


DUS = """HloModule m, is_scheduled=true

%fused_dus (p0: f32[6,64,128], p1: s32[], p2: bf16[64,128]) -> f32[6,64,128] {
  %p0 = f32[6,64,128]{2,1,0} parameter(0)
  %p2 = bf16[64,128]{1,0} parameter(2)
  %c = f32[64,128]{1,0} convert(%p2)
  %b = f32[1,64,128]{2,1,0} bitcast(%c)
  %p1 = s32[] parameter(1)
  %z = s32[] constant(0)
  ROOT %dus = f32[6,64,128]{2,1,0} dynamic-update-slice(%p0, %b, %p1, %z, %z)
}

ENTRY %main (buf: f32[6,64,128], i: s32[], x: bf16[64,128]) -> f32[6,64,128] {
  %buf = f32[6,64,128]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  %x = bf16[64,128]{1,0} parameter(2)
  %f = f32[6,64,128]{2,1,0} fusion(%buf, %i, %x), kind=kLoop, calls=%fused_dus
  ROOT %n = f32[6,64,128]{2,1,0} negate(%f)
}
"""


def test_an_in_place_update_costs_its_slice_not_the_buffer():
    """A scan's residual stacks are written one slice per layer in place: pricing the whole
    [L, ...] buffer per layer credited windows with L-fold the real work."""
    model = CostModel()
    sched = Schedule(DUS, AXES, model)
    f, n = sched.comps["main"][3], sched.comps["main"][4]
    update, x, i = 64 * 128 * 4, 64 * 128 * 2, 4
    assert sched.cost("main", f) == pytest.approx((update + x + i) / model.hbm_Bps)
    assert sched.cost("main", n) == pytest.approx(2 * 6 * update / model.hbm_Bps)  # not in place
