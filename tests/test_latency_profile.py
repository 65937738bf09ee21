"""The cost-model latency profile (codesign/latency_profile.py) on the hand-written a2a
module: every kernel and collective priced as the hidden-fraction model prices it, by the
name XLA's scheduler knew it by, in the text format XLA's PGLE reader takes."""

import re

from deepseek_jax.codesign.latency_profile import costs_us, profile_text
from deepseek_jax.codesign.schedule import CostModel, Schedule
from tests.hlo_fixtures import AXES, a2a_module


def test_costs_are_the_cost_model_figures():
    model = CostModel()
    costs = costs_us(Schedule(a2a_module(), AXES, model))
    gemm_us = 2 * 64 * 256 * 128 / model.flops * 1e6
    # the async starts' transfers: [4,16,8] bf16 over gpu (3/4 leaves), [2,16,8] over node
    gpu_us = 4 * 16 * 8 * 2 * 3 / 4 / dict(model.link_Bps)["gpu"] * 1e6
    node_us = 2 * 16 * 8 * 2 * 1 / 2 / dict(model.link_Bps)["node"] * 1e6
    assert costs["g"] == gemm_us
    assert costs["s"] == gpu_us and costs["s2"] == node_us
    assert costs["a2a"] == gpu_us  # the loop's sync all-to-all: priced too
    # bookkeeping costs nothing and stays out: XLA keeps its own estimate for it
    assert not {"x", "w", "y", "d", "d2", "z", "tup", "out"} & set(costs)
    assert "dot.1" not in costs  # the GEMM kernel's insides: never scheduled on their own


def test_scheduling_name_wins_over_a_later_rename():
    hlo = a2a_module().replace(
        'metadata={op_name="jit(f)/transpose(jvp(moe))/all_to_all"}',
        'metadata={op_name="jit(f)/transpose(jvp(moe))/all_to_all" '
        'scheduling_name="all-to-all-start.7"}',
    )
    costs = costs_us(Schedule(hlo, AXES))
    assert "all-to-all-start.7" in costs and "a2a" not in costs


def test_profile_text_is_one_cost_entry_per_instruction():
    costs = {"b.1": 2.5, "a": 1e-3}
    text = profile_text(costs)
    found = re.findall(r'^costs \{ name: "([^"]+)" cost_us: ([0-9.e+-]+) \}$', text, re.M)
    assert [(n, float(v)) for n, v in found] == sorted(costs.items())
