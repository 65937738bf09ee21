"""deepseek_jax.backends: auto picks the measured-faster path, never the slower one.

Timings are injected (``backends.measure`` replaced), so each test knows which candidate
is faster and checks that auto picks it, caches it, logs it, and that the model's traced
program then really runs it.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from cpu_kernels import attention as cpu_attention
from cpu_kernels import grouped_gemm
from deepseek_jax import backends, causal_attention, host
from deepseek_jax.mesh import make_mesh
from deepseek_jax.model import Transformer
from deepseek_jax.moe import experts
from deepseek_jax.presets import get_preset
from tests.layouts import spec

ATTN_SHAPE = (2, 64, 4, 16, 8, 16)  # B, T, H, N, R, O
MOE_SHAPE = (64, 2, 8, 32, 16)  # T, K, E, D, F


def needs(kernel_available):
    return pytest.mark.skipif(not kernel_available(), reason="the C++ kernel does not build here")


@needs(cpu_attention.available)
@pytest.mark.parametrize("kernel_ms, xla_ms, want", [(5.0, 9.0, "cpu_kernel"), (9.0, 5.0, "xla")])
def test_attention_auto_picks_the_faster(fake_timings, kernel_ms, xla_ms, want, caplog):
    set_ms, calls = fake_timings
    set_ms({"cpu_kernel": kernel_ms, "xla": xla_ms})
    cfg = get_preset("tiny", ["dtype=float32"])
    with caplog.at_level(logging.INFO, logger="deepseek_jax.backends"):
        assert causal_attention.resolve_attention_backend(cfg, ATTN_SHAPE) == want
        assert causal_attention.resolve_attention_backend(cfg, ATTN_SHAPE) == want  # decided once
    rounds = 3 if want == "cpu_kernel" else 1  # a kernel's win is confirmed by two more
    assert sorted(calls) == sorted(["cpu_kernel", "xla"] * rounds)
    [line] = [r.getMessage() for r in caplog.records]
    assert f"attention 2x64x4x16x8x16 -> {want}" in line and "ms" in line


@needs(grouped_gemm.available)
@pytest.mark.parametrize(
    "grouped_ms, einsum_ms, want", [(1.0, 2.0, "grouped"), (3.0, 2.0, "einsum")]
)
def test_moe_auto_picks_the_faster(fake_timings, grouped_ms, einsum_ms, want):
    set_ms, calls = fake_timings
    set_ms({"grouped": grouped_ms, "einsum": einsum_ms})
    assert experts.resolve_backend("auto", MOE_SHAPE) == want
    assert sorted(calls) == sorted(["einsum", "grouped"] * (3 if want == "grouped" else 1))


@needs(cpu_attention.available)
def test_explicit_choice_wins_over_a_faster_twin(fake_timings):
    set_ms, calls = fake_timings
    set_ms({"cpu_kernel": 9.0, "xla": 1.0})
    cfg = get_preset("tiny", ["dtype=float32", "attention_backend=cpu_kernel"])
    assert causal_attention.resolve_attention_backend(cfg, ATTN_SHAPE) == "cpu_kernel"
    assert experts.resolve_backend("grouped", MOE_SHAPE) == "grouped"
    assert calls == []  # nothing measured


@needs(cpu_attention.available)
def test_decisions_persist_across_processes_and_shape_classes(fake_timings, monkeypatch):
    set_ms, calls = fake_timings
    set_ms({"cpu_kernel": 1.0, "xla": 2.0})
    cfg = get_preset("tiny", ["dtype=float32"])
    assert causal_attention.resolve_attention_backend(cfg, ATTN_SHAPE) == "cpu_kernel"
    monkeypatch.setattr(backends, "_decisions", {})  # a new process: only the disk cache
    set_ms({"cpu_kernel": 2.0, "xla": 1.0})
    same_class = (2, 60, 4, 16, 8, 16)  # T = 60 rounds up to 64 like T = 64
    assert causal_attention.resolve_attention_backend(cfg, same_class) == "cpu_kernel"  # cached
    assert len(calls) == 6  # the kernel's win took three rounds
    other_class = (2, 200, 4, 16, 8, 16)
    assert causal_attention.resolve_attention_backend(cfg, other_class) == "xla"  # measured anew
    assert len(calls) == 8


def test_ties_go_to_the_fallback_and_shape_classes_round_up(fake_timings):
    set_ms, _ = fake_timings
    set_ms({"a": 1.0, "b": 1.0})
    noop = lambda backward: lambda: None  # noqa: E731
    assert backends.measured("op", (3,), {"a": noop, "b": noop}, build_id="x", fallback="b") == "b"
    assert backends.shape_class((1, 3, 64, 65)) == (1, 4, 64, 128)


def test_a_kernel_that_does_not_build_is_logged_and_loses(monkeypatch, caplog):
    monkeypatch.setattr(backends, "_logged_failures", set())
    monkeypatch.setattr(
        type(cpu_attention.KERNEL), "build_error", lambda self, variant=None: "no g++ here"
    )
    cfg = get_preset("tiny", ["dtype=float32"])
    with caplog.at_level(logging.WARNING, logger="deepseek_jax.backends"):
        assert causal_attention.resolve_attention_backend(cfg, ATTN_SHAPE) == "xla"
        assert experts.resolve_backend("auto", MOE_SHAPE) == "einsum"
    messages = [r.getMessage() for r in caplog.records]
    assert any("C++ causal attention did not build" in m and "no g++ here" in m for m in messages)
    assert any("C++ grouped GEMM did not build" in m for m in messages)
    with pytest.raises(RuntimeError, match="use 'xla'"):
        causal_attention.resolve_attention_backend(
            cfg.with_overrides(["attention_backend=cpu_kernel"]), ATTN_SHAPE
        )


def _ffi_targets(cfg, mesh=None):
    """The FFI custom-call targets in the lowered forward pass of a tiny model."""
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.zeros((8, 64), jnp.int32)
    if mesh is not None:
        tokens = jax.device_put(tokens, NamedSharding(mesh, spec("batch")))
    graphdef, state = nnx.split(model)
    fwd = lambda s, t: nnx.merge(graphdef, s)(t)  # noqa: E731
    text = jax.jit(fwd).lower(state, tokens).as_text()
    return {n for n in ("Attention", "Gmm") if f"deepseek_jax_native_Dsj{n}" in text}


@needs(lambda: cpu_attention.available() and grouped_gemm.available())
@pytest.mark.parametrize("kernels_faster", [True, False])
def test_the_model_runs_what_was_chosen(fake_timings, kernels_faster):
    """The traced model calls our kernels exactly when they were measured faster."""
    set_ms, calls = fake_timings
    fast, slow = 1.0, 2.0
    k, x = (fast, slow) if kernels_faster else (slow, fast)
    set_ms({"cpu_kernel": k, "xla": x, "grouped": k, "einsum": x})
    cfg = get_preset("tiny", ["dtype=float32"])
    want = {"Attention", "Gmm"} if kernels_faster else set()
    assert _ffi_targets(cfg) == want
    assert {"cpu_kernel", "grouped"} <= set(calls)
    with jax.set_mesh(make_mesh(2, 4)):  # per-device shapes inside the sharded program
        assert _ffi_targets(cfg, make_mesh(2, 4)) == want


def test_local_shape_divides_by_the_sharded_axes():
    mesh = make_mesh(2, 4)
    x = jax.device_put(np.zeros((16, 6, 8)), NamedSharding(mesh, spec("batch", None, None)))
    assert backends.local_shape(x) == (2, 6, 8)
    assert backends.local_shape(np.zeros((3, 5))) == (3, 5)


def test_machine_names_the_cpu_and_its_vector_isa():
    info = host.machine()
    assert info["vector_isa"] in ("AVX-512", "AVX2+FMA", "AVX", "NEON", "SSE2", "none")
    assert info["cpu"] and info["platform"] == jax.default_backend()


def test_processes_measuring_at_once_adopt_the_first_stored_decision(fake_timings, monkeypatch):
    """A run and its concurrent twin may both measure; the one that stores second must run
    the first one's choice, or their losses stop being bitwise equal."""
    set_ms, _ = fake_timings
    noop = lambda backward: lambda: None  # noqa: E731
    set_ms({"a": 1.0, "b": 2.0})
    assert backends.measured("op", (8,), {"a": noop, "b": noop}, build_id="x", fallback="b") == "a"
    # Another process: found nothing on disk when it looked, then measured "b" faster.
    monkeypatch.setattr(backends, "_decisions", {})
    load = backends._load
    looks = iter([None])
    monkeypatch.setattr(backends, "_load", lambda key: next(looks, None) or load(key))
    set_ms({"a": 2.0, "b": 1.0})
    assert backends.measured("op", (8,), {"a": noop, "b": noop}, build_id="x", fallback="b") == "a"


def test_inference_races_forward_passes_and_training_races_both(fake_timings, monkeypatch):
    """A kernel whose backward wins the race but whose forward loses it is chosen for
    training and not for prefill/decode (forward-only programs), each decided apart."""
    monkeypatch.setattr(backends, "measure", lambda name, run, *limits: [run()])
    seconds = {"kernel": {True: 1.0, False: 3.0}, "xla": {True: 2.0, False: 2.0}}
    candidates = {n: (lambda backward, n=n: lambda: seconds[n][backward]) for n in seconds}
    assert backends.measured("op", (8,), candidates, build_id="x", fallback="xla") == "kernel"
    with backends.inference():
        assert backends.phase() == "fwd"
        assert backends.measured("op", (8,), candidates, build_id="x", fallback="xla") == "xla"
    assert backends.phase() == "fwd+bwd"
    assert (
        backends.measured("op", (8,), candidates, build_id="x", fallback="xla") == "kernel"
    )  # unchanged


@needs(grouped_gemm.available)
def test_the_models_decode_path_measures_forward_only(fake_timings):
    set_ms, _ = fake_timings
    set_ms({"cpu_kernel": 1.0, "xla": 2.0, "grouped": 1.0, "einsum": 2.0})
    cfg = get_preset("tiny", ["dtype=float32"])
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def decode(s, ids):
        m = nnx.merge(graphdef, s)
        return m.decode(ids, m.init_cache(2, 16), jnp.int32(0))[0]

    jax.jit(backends.forward_only(decode)).lower(state, jnp.zeros((2, 8), jnp.int32))
    reasons = [r for op, r in backends.decisions().items() if op.startswith("moe_experts")]
    assert reasons and all("measured fwd:" in r for r in reasons)


def _expert_reasons() -> list[str]:
    return [r for op, r in backends.decisions().items() if op.startswith("moe_experts")]


@needs(grouped_gemm.available)
def test_the_inference_programs_measure_forward_only(fake_timings, monkeypatch):
    """The serving engine's decode step and the generator's prefill, traced as built (no
    ``inference()`` around them here), race forward passes; the model traced outside them
    (training) races both."""
    from deepseek_jax.infer import generate, programs
    from deepseek_jax.infer.paged import PagedDecoder
    from deepseek_jax.infer.sampling import RowSampling

    set_ms, _ = fake_timings
    set_ms({"cpu_kernel": 1.0, "xla": 2.0, "grouped": 1.0, "einsum": 2.0})
    model = Transformer(get_preset("tiny", ["dtype=float32"]), rngs=nnx.Rngs(0))
    ids = jnp.zeros((2, 8), jnp.int32)
    g, st = nnx.split(model)
    jax.jit(lambda s, i: nnx.merge(g, s)(i).logits_BTV).trace(st, ids)  # the training forward
    assert _expert_reasons() and all("measured fwd+bwd:" in r for r in _expert_reasons())

    monkeypatch.setattr(backends, "_decisions", {})
    greedy = dict(temperature=0.0, top_k=0, top_p=1.0)
    generate._prefill.trace(g, st, ids, jax.random.key(0), max_len=16, **greedy)
    assert _expert_reasons() and all("measured fwd:" in r for r in _expert_reasons())

    monkeypatch.setattr(backends, "_decisions", {})
    dec = PagedDecoder(model, attention="xla")
    graphdef, state = nnx.split(dec)
    B, table, lens = 2, jnp.ones((2, 2), jnp.int32), jnp.zeros(2, jnp.int32)
    samp = RowSampling(jnp.zeros(B), jnp.zeros(B, jnp.int32), jnp.ones(B), jnp.zeros(B, jnp.int32))
    decode = jax.jit(programs.decode_step, static_argnums=0)
    decode.trace(graphdef, state, dec.init_cache(8, 4), lens, lens, table, samp)
    assert _expert_reasons() and all("measured fwd:" in r for r in _expert_reasons())


def _kernel_calls(fn, *args) -> list[tuple[str, object]]:
    """(primitive, interpret) of every Pallas call in fn's jaxpr, nested jaxprs included
    (``mpmd_map``: a compiled Mosaic GPU kernel)."""
    found = []

    def walk(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive.name in ("pallas_call", "mpmd_map"):
                found.append((e.primitive.name, e.params.get("interpret")))
            for v in e.params.values():
                inner = getattr(v, "jaxpr", v)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_target_platform_decides_kernel_modes_whatever_runs_the_trace():
    """The deviceless GPU compile traces on a CPU host: under ``targeting("gpu")`` the Pallas
    kernels are compiled ones (Triton, Mosaic GPU), not the interpreter, and no C++ CPU
    kernel is offered; before and after, the CPU's choices, with no trace reused across."""
    from deepseek_jax.fp8 import fp8_mode
    from deepseek_jax.moe.layer import MoE
    from pallas_kernels import dispatch as pd
    from pallas_kernels import fp8_matmul as fm

    cfg = get_preset("tiny")
    fp8_cfg = cfg.with_overrides({"fp8": "true"})
    assert cfg.run.ep.kernel == cfg.run.fp8_backend == "auto"
    ep_kernel = lambda: MoE(cfg, rngs=nnx.Rngs(0)).ep.kernel  # noqa: E731

    x, src = jnp.ones((32, 256)), jnp.arange(20, dtype=jnp.int32)
    a8 = jax.ShapeDtypeStruct((1, 128, 256), jnp.float8_e4m3fn)
    s = jax.ShapeDtypeStruct((1, 128, 2), jnp.float32)
    gather = lambda x, src: pd.permute_quantize(x, src)  # noqa: E731
    gemm = lambda a, sa, b, sb: fm.fp8_matmul(a, sa, b, sb)  # noqa: E731
    cpu = [("pallas_call", True)]
    assert backends.target_platform() == jax.default_backend() == "cpu"
    assert _kernel_calls(gather, x, src) == _kernel_calls(gemm, a8, s, a8, s) == cpu
    with backends.targeting("gpu"):
        assert backends.on_gpu() and not backends.pallas_interpret(None)
        assert not backends.kernel_available(grouped_gemm.KERNEL, "grouped GEMM")
        assert backends.layer_loop("auto", ("auto", "scan", "unroll")) == "scan"
        assert backends.default_dtype() == "bfloat16"
        assert _kernel_calls(gather, x, src) == [("pallas_call", False)]
        assert _kernel_calls(gemm, a8, s, a8, s) == [("mpmd_map", None)]
        # our kernels are the GPU defaults (they compile into the sm_90a train step)
        assert ep_kernel() == "pallas" == fp8_mode(fp8_cfg)
        assert backends.pallas_kernel("ep_kernel", "xla") == "xla"
        with backends.targeting("cpu"):
            assert backends.target_platform() == "cpu"
        assert backends.target_platform() == "gpu"
    assert backends.target_platform() == "cpu" and not backends.on_gpu()
    assert _kernel_calls(gather, x, src) == cpu
    assert ep_kernel() == "xla" == fp8_mode(fp8_cfg)
    with pytest.raises(ValueError, match="target platform 'cuda'"):
        with backends.targeting("cuda"):
            pass


@needs(grouped_gemm.available)
@pytest.mark.parametrize(
    "grouped_ms, want, rounds",
    [
        (0.97, "einsum", 3),  # a 3 % lead is noise: the XLA path stays
        (0.90, "grouped", 3),  # a 10 % lead wins, once two more rounds confirm it
        (0.50, "grouped", 3),
        (1.20, "einsum", 3),  # a close loss is rerun too
        (2.00, "einsum", 1),  # a clear loss is not
    ],
)
def test_a_kernel_must_beat_the_xla_path_by_the_margin(fake_timings, grouped_ms, want, rounds):
    set_ms, calls = fake_timings
    set_ms({"grouped": grouped_ms, "einsum": 1.0})
    assert experts.resolve_backend("auto", MOE_SHAPE) == want
    assert sorted(calls) == sorted(["einsum", "grouped"] * rounds)
    [decision] = backends._decisions.values()
    assert ("einsum kept" in decision.reason) == (want == "einsum" and grouped_ms < 1.0)


def test_a_spike_in_the_xla_paths_turn_does_not_hand_a_kernel_the_race(monkeypatch):
    monkeypatch.setattr(backends, "_decisions", {})
    monkeypatch.setattr(backends, "_load", lambda key: None)
    monkeypatch.setattr(backends, "_store", lambda key, decision: decision)
    # Rounds in turn: (kernel, xla), then reversed (xla, kernel), then (kernel, xla).
    turns = iter([1.0, 3.0, 0.9, 1.0, 1.0, 0.95])  # xla's first turn hit a load spike
    monkeypatch.setattr(backends, "measure", lambda name, run, *limits: [next(turns) / 1e3])
    cands = {"kernel": lambda backward: None, "xla": lambda backward: None}
    assert backends.measured("op", (4,), cands, build_id="b", fallback="xla") == "xla"
    with pytest.raises(ValueError, match="fallback 'slots' is not a candidate"):
        backends.measured("op2", (4,), cands, build_id="b", fallback="slots")
