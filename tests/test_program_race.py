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
    run = program_race.raced(
        "test", build, enter=contextlib.nullcontext, shape=jnp.shape, carry=lambda a, out: (out,)
    )
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


@pytest.mark.parametrize(
    "program_ms, want, value",
    [  # best-of would pick BOTH (1 ms); its median step is 12 ms against XLA's 10
        ({BOTH: [12.0, 12.0, 1.0, 12.0], XLA: [10.0] * 4, ATTN_ONLY: [11.0] * 4}, XLA, 23.0),
        # one slow XLA step (40 ms) must not hand the race to a kernel 2 % faster
        ({BOTH: [9.8] * 4, XLA: [10.0, 40.0, 10.0, 10.0], ATTN_ONLY: [11.0] * 4}, XLA, 23.0),
        ({BOTH: [8.0, 30.0, 8.0, 8.0], XLA: [10.0] * 4, ATTN_ONLY: [11.0] * 4}, BOTH, 12.0),
    ],
)
def test_the_median_step_decides_and_one_outlier_does_not_flip_it(timings, program_ms, want, value):
    set_ms, _ = timings
    set_ms({**KERNELS_WIN_OPS, MOE_ONLY: [13.0] * 4, **program_ms})
    assert _run() == value
    [decision] = [d for d in backends._decisions.values() if d.op == "program test"]
    assert decision.choice == want and program_race.RULE in decision.reason


def test_timing_runs_donate_a_copy_and_chain_their_steps(timings, monkeypatch):
    """Each timing run is a donating step on a private copy, fed the previous step's output
    (x -> 2x + 10 with both kernels); the real argument survives the race untouched."""
    set_ms, calls = timings
    set_ms(KERNELS_WIN_OPS)
    outputs = []

    def measure(name, run, runs=5, budget_s=0.5):
        calls.append(name)
        if "=" in name:  # a program: warm-up and timed steps really run
            for _ in range(1 + runs):
                run()
        return [{**KERNELS_WIN_OPS, BOTH: 1.0, XLA: 2.0}.get(name, 3.0)] * runs

    def carry(args, out):
        outputs.append(float(out))
        return (out,)

    monkeypatch.setattr(backends, "measure", measure)
    run = program_race.raced(
        "test", _program(), enter=contextlib.nullcontext, shape=jnp.shape, carry=carry
    )
    # from the real x = 1, which a timing run that donated it would have deleted
    assert float(run(jnp.ones(()))) == 12.0
    assert outputs[:3] == [12.0, 34.0, 78.0]  # BOTH, raced first: 1 -> 12 -> 34 -> 78


def test_a_cached_program_decision_is_reused_without_timing(timings, monkeypatch, caplog):
    set_ms, calls = timings
    set_ms({**KERNELS_WIN_OPS, BOTH: 12.0, XLA: 10.0, ATTN_ONLY: 8.0, MOE_ONLY: 13.0})
    with caplog.at_level("INFO", logger="deepseek_jax.backends"):
        assert _run() == 22.0
    racing = [r.getMessage() for r in caplog.records if "racing" in r.getMessage()]
    assert len(racing) == 1 and "4 backend combinations" in racing[0], racing  # said first
    caplog.clear()
    monkeypatch.setattr(backends, "_decisions", {})  # a new process: only the disk cache
    set_ms({BOTH: 1.0, XLA: 10.0, ATTN_ONLY: 10.0, MOE_ONLY: 10.0})
    before = len(calls)
    with caplog.at_level("INFO", logger="deepseek_jax.backends"):
        assert _run() == 22.0
    assert calls[before:] == []
    assert not [r for r in caplog.records if "racing" in r.getMessage()]  # nothing to wait for


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
    """Timing runs really run, donating steps on a copy of the real state; the real step
    then gives, bit for bit, the loss and state of the same step built without the race,
    and the listeners hear that it calls no C++ kernel. (One dense layer: the attention
    kernel is the family raced, and the step compiles fast.)"""
    from deepseek_jax.mesh import make_mesh
    from deepseek_jax.train.config import TrainConfig
    from deepseek_jax.train.state import init_state, plan
    from deepseek_jax.train.step import jit_train_step

    _, calls = timings
    ms = {"cpu_kernel": 1.0, "xla": 2.0, "attention=cpu_kernel": 12.0, "attention=xla": 9.0}

    def measure(name, run, runs=5, budget_s=0.5):
        calls.append(name)
        if name == "attention=xla":
            run()  # timing runs: two chained donating steps on a copy of the state
            run()
        return [ms[name] / 1e3]

    told = []
    monkeypatch.setattr(backends, "measure", measure)
    monkeypatch.setattr(program_race, "listeners", [lambda *a: told.append(a)])
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
    assert told == [("train_step", ())]  # the step that runs calls no C++ kernel
    # unraced: the same choice given explicitly, from a host copy of the same state
    ref_cfg = cfg.with_overrides(["attention_backend=xla"])
    ref_graphdef, _, ref_layout, ref_tx = plan(ref_cfg, tcfg, mesh)
    fresh = jax.device_put(before, ref_layout.state)
    ref, ref_m = jit_train_step(ref_graphdef, ref_tx, tcfg, ref_layout, mesh)(fresh, ids)
    assert float(m["loss"]) == float(ref_m["loss"])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(raced), jax.device_get(ref))


def test_kernels_called_names_the_ffi_targets_of_a_traced_program():
    x, w, sizes = jnp.ones((8, 4)), jnp.ones((2, 4, 3)), jnp.array([3, 5], jnp.int32)
    loss = lambda x, w: grouped_gemm.grouped_matmul(x, w, sizes).sum()  # noqa: E731
    text = str(jax.jit(jax.grad(loss, argnums=(0, 1))).trace(x, w).jaxpr)
    called = program_race.kernels_called(text)
    assert {k.split("_")[-1] for k in called} == {"DsjGmm", "DsjTgmm"}  # forward, backward
    assert program_race.kernels_called(str(jax.make_jaxpr(jnp.sin)(x))) == ()


def test_forcing_an_unknown_choice_is_a_clear_error(timings):
    with (
        backends.forcing(moe_experts="fast"),
        pytest.raises(ValueError, match="moe_experts='fast'"),
    ):
        experts.resolve_backend("auto", MOE_SHAPE)
