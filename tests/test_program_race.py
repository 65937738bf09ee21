"""deepseek_jax.program_race: a program runs the backend combination timed fastest as a
whole program, never one slower than XLA only, whatever the operation race chose.

Timings are injected (``backends.measure`` replaced, by candidate name). The programs
are small jitted functions whose trace resolves the real ``auto`` backends
(``resolve_attention_backend``, ``experts.resolve_backend``) and whose result says which
choices their trace made; the last test races a real (one-layer) train step.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpu_kernels import attention as cpu_attention
from cpu_kernels import grouped_gemm
from deepseek_jax import backends, causal_attention, program_race
from deepseek_jax.moe import experts
from deepseek_jax.presets import get_preset

ATTN_SHAPE = (2, 64, 4, 16, 8, 16)  # B, T, H, N, R, O
MOE_SHAPE = (64, 2, 8, 32, 16)  # T, K, E, D, F
KERNELS_WIN_OPS = {"cpu_kernel": 1.0, "xla": 2.0, "grouped": 1.0, "einsum": 2.0}
BOTH = "attention=cpu_kernel moe_experts=grouped"
XLA = "attention=xla moe_experts=einsum"
ATTN_ONLY = "attention=cpu_kernel moe_experts=einsum"
MOE_ONLY = "attention=xla moe_experts=grouped"

pytestmark = pytest.mark.skipif(
    not (cpu_attention.available() and grouped_gemm.available()),
    reason="the C++ kernels do not build here",
)


@pytest.fixture
def timings(fake_timings, monkeypatch):
    """``fake_timings`` (conftest) with the program race on: each candidate, operation or
    program combination, takes the milliseconds set for its name."""
    monkeypatch.setenv(program_race.ENV, "on")
    return fake_timings


def _program(attention="auto", moe="auto"):
    """``build(donate)`` of a program whose output codes the choices its trace made:
    x * (2 if the attention kernel else 3) + (10 if the grouped GEMM else 20)."""
    cfg = get_preset("tiny", ["dtype=float32", f"attention_backend={attention}"])

    def body(x):
        kernel = causal_attention.resolve_attention_backend(cfg, ATTN_SHAPE) == "cpu_kernel"
        grouped = experts.resolve_backend(moe, MOE_SHAPE) == "grouped"
        return x * (2.0 if kernel else 3.0) + (10.0 if grouped else 20.0)

    def build(donate: bool):
        return jax.jit(lambda x: body(x), donate_argnums=0 if donate else ())

    return build


def _run(attention="auto", moe="auto") -> float:
    build = _program(attention, moe)
    run = program_race.raced("test", build, enter=contextlib.nullcontext, shape=jnp.shape)
    return float(run(jnp.ones(())))


def _program_calls(calls) -> list[str]:
    return [c for c in calls if "=" in c]


@pytest.mark.parametrize(
    "program_ms, want, value",
    [
        ({BOTH: 12.0, XLA: 10.0, ATTN_ONLY: 11.0, MOE_ONLY: 13.0}, XLA, 23.0),  # kernels lose
        ({BOTH: 12.0, XLA: 10.0, ATTN_ONLY: 8.0, MOE_ONLY: 13.0}, ATTN_ONLY, 22.0),
        ({BOTH: 8.0, XLA: 10.0, ATTN_ONLY: 9.0, MOE_ONLY: 9.0}, BOTH, 12.0),
        ({BOTH: 10.0, XLA: 10.0, ATTN_ONLY: 10.0, MOE_ONLY: 10.0}, XLA, 23.0),  # tie: XLA
        ({BOTH: 9.7, XLA: 10.0, ATTN_ONLY: 10.0, MOE_ONLY: 10.0}, XLA, 23.0),  # 3 % < MARGIN
    ],
)
def test_the_program_runs_the_fastest_combination_never_one_slower_than_xla(
    timings, program_ms, want, value
):
    set_ms, calls = timings
    set_ms({**KERNELS_WIN_OPS, **program_ms})
    assert _run() == value  # what the program that ran traced
    assert sorted(set(_program_calls(calls))) == sorted(program_ms)  # every combination raced
    [decision] = [d for d in backends._decisions.values() if d.op == "program test"]
    assert decision.choice == want and f"the op race chose {BOTH}" in decision.reason
    assert any(k.startswith("program test") and want in v for k, v in backends.decisions().items())


def test_a_cached_program_decision_is_reused_without_timing(timings, monkeypatch):
    set_ms, calls = timings
    set_ms({**KERNELS_WIN_OPS, BOTH: 12.0, XLA: 10.0, ATTN_ONLY: 8.0, MOE_ONLY: 13.0})
    assert _run() == 22.0
    monkeypatch.setattr(backends, "_decisions", {})  # a new process: only the disk cache
    set_ms({BOTH: 1.0, XLA: 10.0, ATTN_ONLY: 10.0, MOE_ONLY: 10.0})
    before = len(calls)
    assert _run() == 22.0
    assert calls[before:] == []


def test_explicit_backends_skip_the_race(timings):
    set_ms, calls = timings
    set_ms(KERNELS_WIN_OPS)
    assert _run(attention="cpu_kernel", moe="grouped") == 12.0
    assert _run(attention="xla", moe="einsum") == 23.0
    assert calls == []  # neither operations nor programs timed
    # only the family left on auto is raced; the explicit kernel stays
    set_ms({"moe_experts=grouped": 12.0, "moe_experts=einsum": 10.0})
    assert _run(attention="cpu_kernel") == 22.0
    assert set(_program_calls(calls)) == {"moe_experts=grouped", "moe_experts=einsum"}


def test_no_race_when_the_op_race_chose_no_kernel_or_when_off(timings, monkeypatch, tmp_path):
    set_ms, calls = timings
    set_ms({"cpu_kernel": 3.0, "xla": 2.0, "grouped": 3.0, "einsum": 2.0})
    assert _run() == 23.0
    assert _program_calls(calls) == []
    monkeypatch.setenv(program_race.ENV, "off")
    monkeypatch.setenv("DEEPSEEK_JAX_KERNEL_CACHE", str(tmp_path / "other"))
    monkeypatch.setattr(backends, "_decisions", {})
    set_ms(KERNELS_WIN_OPS)
    assert _run() == 12.0  # the op race's choice stands
    assert _program_calls(calls) == []
    assert any("DEEPSEEK_JAX_PROGRAM_RACE=off" in v for v in backends.decisions().values())


def test_combinations_of_a_mixed_pre_filter():
    seen = {"attention": ("xla", {"xla", "cpu_kernel"}, "a"), "moe_experts": ("einsum", set(), "g")}
    seen["moe_experts"][1].add("einsum")
    combos, xla = program_race.combinations(seen)
    assert xla == XLA
    assert combos == {
        "op race (attention=cpu_kernel/xla, moe_experts=einsum)": {},
        XLA: {"attention": "xla", "moe_experts": "einsum"},
        ATTN_ONLY: {"attention": "cpu_kernel", "moe_experts": "einsum"},
    }
    assert program_race.combinations({"attention": ("xla", {"xla"}, "a")}) == ({}, "attention=xla")


def test_a_raced_train_step_leaves_the_state_alone_and_equals_the_unraced_step(
    timings, monkeypatch
):
    """A timing run really runs on the real state and batch; the real step then gives, bit
    for bit, the loss and state of the same step built without the race. (One dense layer:
    the attention kernel is the family raced, and the step compiles fast.)"""
    from deepseek_jax.mesh import make_mesh
    from deepseek_jax.train.config import TrainConfig
    from deepseek_jax.train.state import init_state, plan
    from deepseek_jax.train.step import jit_train_step

    _, calls = timings
    ms = {"cpu_kernel": 1.0, "xla": 2.0, "attention=cpu_kernel": 12.0, "attention=xla": 9.0}

    def measure(name, run):
        calls.append(name)
        if name == "attention=xla":
            run()  # a timing run, on the caller's state
        return ms[name] / 1e3

    monkeypatch.setattr(backends, "measure", measure)
    small = ["dtype=float32", "num_hidden_layers=1", "first_k_dense_replace=1"]
    cfg = get_preset("tiny", [*small, "num_nextn_predict_layers=0"])
    tcfg = TrainConfig(steps=2, batch_size=2, seq_len=16)
    mesh = make_mesh(1, 1, devices=jax.devices()[:1])
    graphdef, state, layout, tx = init_state(cfg, tcfg, mesh)
    before = jax.device_get(state)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 17), np.int32)
    raced, m = jit_train_step(graphdef, tx, tcfg, layout, mesh)(state, ids)
    assert "attention=xla" in calls
    [decision] = [d for d in backends._decisions.values() if d.op == "program train_step"]
    assert decision.choice == "attention=xla"  # overturns the op race's kernel
    # unraced: the same choice given explicitly, from a host copy of the same state
    ref_cfg = cfg.with_overrides(["attention_backend=xla"])
    ref_graphdef, _, ref_layout, ref_tx = plan(ref_cfg, tcfg, mesh)
    fresh = jax.device_put(before, ref_layout.state)
    ref, ref_m = jit_train_step(ref_graphdef, ref_tx, tcfg, ref_layout, mesh)(fresh, ids)
    assert float(m["loss"]) == float(ref_m["loss"])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(raced), jax.device_get(ref))


def test_forcing_an_unknown_choice_is_a_clear_error(timings):
    with (
        backends.forcing(moe_experts="fast"),
        pytest.raises(ValueError, match="moe_experts='fast'"),
    ):
        experts.resolve_backend("auto", MOE_SHAPE)
