"""Every ``auto`` backend choice, made in one place, by measurement where speed decides.

- attention core (``attention_backend``): ``cpu_kernel`` or ``xla``; measured on CPU
  (the kernel is float32 only), ``xla`` elsewhere.
- expert GEMMs (``moe_backend``): ``grouped`` or ``einsum``; measured on CPU, ``einsum``
  elsewhere (``ragged_dot`` lost to the capacity slots on an H200).
- layer loop (``--layer-loop``): ``unroll`` on CPU, ``scan`` elsewhere: compile time and
  memory against copies, not a kernel race.
- Pallas kernels (FP8 GEMM, dispatch): compiled on a GPU, interpreted elsewhere.
- the run's compute dtype when ``--dtype`` is not given: bfloat16 on a GPU.

Why measure: a kernel tuned on one CPU can run far slower than XLA on another (AVX-512
register tiles compiled for AVX2: README, 'Per machine class'). So on CPU a C++ kernel wins
only where it was timed faster than its XLA twin *here*, by at least ``MARGIN``: on first
use per (CPU model and flags, kernel build, operation, shape class, phase) both run on the
real per-device shapes, best of a few runs (more, interleaved, before a kernel wins), in
a worker thread (outside any trace and mesh). The phase is what the
program runs: forward and backward when training, the forward alone inside ``inference()``
(prefill, decode: the programs built with ``forward_only``), where a kernel whose backward
wins the race may lose it. The decision is cached as JSON beside the kernel cache, so later
processes reuse it, and logged once per process on the ``deepseek_jax.backends`` logger. An
explicit config value always wins; a kernel that does not build is logged once and loses.

The operation race is a pre-filter for whole programs: a kernel that wins alone can lose
inside the program (fusions broken, layouts pinned), so the train step's combination is
then raced as a program (``program_race.py``, built with ``forcing``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import functools
import logging
import math
import time
from collections.abc import Callable

import jax

import cpu_kernels.build as build
import deepseek_jax.decision_store as store
from deepseek_jax.decision_store import Decision

_log = logging.getLogger(__name__)

# A candidate: given ``backward`` (time the backward pass too), builds (compiles) and
# returns a zero-argument callable that runs the operation once on the real shapes and
# blocks until done.
Candidate = Callable[[bool], Callable[[], object]]


_decisions: dict[str, Decision] = {}  # this process's decisions, by cache key
_load, _store = store.load, store.store  # tests replace them
_logged_failures: set[str] = set()
_forward_only = contextvars.ContextVar("deepseek_jax_forward_only", default=False)
_forced = contextvars.ContextVar("deepseek_jax_forced", default=None)  # family -> choice
_seen = contextvars.ContextVar("deepseek_jax_seen", default=None)  # see ``recording``


@contextlib.contextmanager
def forcing(**choices: str):
    """Within the block, a measured choice of family ``f`` (``attention``, ``moe_experts``)
    is ``choices[f]``, unmeasured: how the program race (``program_race.py``) builds each
    combination. Explicit config values never reach ``measured``, so they still win."""
    token = _forced.set({**(_forced.get() or {}), **choices})
    try:
        yield
    finally:
        _forced.reset(token)


@contextlib.contextmanager
def recording():
    """Yields ``{family: (fallback, {choices}, build_id)}``, filled with the measured (or
    forced) choices made within: which kernels a traced program runs."""
    seen: dict[str, tuple[str, set[str], str]] = {}
    token = _seen.set(seen)
    try:
        yield seen
    finally:
        _seen.reset(token)


@contextlib.contextmanager
def inference():
    """Marks what is traced inside as a forward-only program (prefill, decode): measured
    choices made there time the forward pass alone."""
    token = _forward_only.set(True)
    try:
        yield
    finally:
        _forward_only.reset(token)


def forward_only(program: Callable) -> Callable:
    """``program`` traced inside ``inference()``. Put it where a forward-only program
    (prefill, decode, verify) is built, under its ``jax.jit``, so that every path into the
    model it traces is marked, whatever layer functions it calls."""

    @functools.wraps(program)
    def traced(*args, **kwargs):
        with inference():
            return program(*args, **kwargs)

    return traced


def phase() -> str:
    """What a measured choice made now times: ``"fwd"`` inside ``inference()``, else
    ``"fwd+bwd"``."""
    return "fwd" if _forward_only.get() else "fwd+bwd"


def decisions() -> dict[str, str]:
    """This process's choices, measured or not: ``{"attention 4x512x8x64x32x64":
    "cpu_kernel (measured fwd+bwd: ...)"}``."""
    return {f"{d.op} {_dims(d.shape)}": f"{d.choice} ({d.reason})" for d in _decisions.values()}


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def note(op: str, shape: tuple[int, ...], choice: str, reason: str) -> str:
    """Records (and logs once) a choice that needed no measurement; returns ``choice``."""
    key = f"{op}|{shape_class(shape)}|{choice}"
    if key not in _decisions:
        _decisions[key] = Decision(op, tuple(shape), choice, reason)
        _log.info("backends: %s %s -> %s (%s)", op, _dims(shape), choice, reason)
    return choice


# ------------------------------------------------------------------ availability


def kernel_available(kernel: build.Kernel, what: str) -> bool:
    """Whether ``kernel`` builds and loads here; the first failure is logged with its
    reason (never a silent fallback)."""
    if target_platform() != "cpu":
        return False
    error = kernel.build_error()
    if error is not None and what not in _logged_failures:
        _logged_failures.add(what)
        _log.warning("backends: %s did not build, using the XLA path: %s", what, error)
    return error is None


_targets: list[str] = []  # platforms named by ``targeting``, innermost last
PLATFORMS = ("cpu", "gpu", "tpu")


def target_platform() -> str:
    """The platform programs are compiled for: ``jax.default_backend()``, unless a
    deviceless compile (``codesign.gpu_compile``) names another with ``targeting``. Every
    platform-decided choice reads this, so a GPU program compiled on a CPU host gets the
    GPU's choices (compiled Pallas kernels, no C++ CPU kernels, bf16, scan)."""
    return _targets[-1] if _targets else jax.default_backend()


@contextlib.contextmanager
def targeting(platform: str):
    """Within the block, choices are made for ``platform`` (``cpu``, ``gpu`` or ``tpu``)
    whatever runs the trace. JAX's trace caches do not know this setting, so they are
    cleared when the target changes (on entry and exit): no trace made for one target is
    reused for another."""
    if platform not in PLATFORMS:
        raise ValueError(f"target platform {platform!r}: choose one of {PLATFORMS}")
    before = target_platform()
    _targets.append(platform)
    if platform != before:
        jax.clear_caches()
    try:
        yield platform
    finally:
        _targets.pop()
        if platform != before:
            jax.clear_caches()


def on_gpu() -> bool:
    """Whether programs are compiled for a GPU (``target_platform``)."""
    return target_platform() == "gpu"


def pallas_kernel(op: str, requested: str) -> str:
    """``auto`` for our Pallas kernels (``fp8_backend``, ``ep_kernel``): ``pallas`` when
    compiling for a GPU (both compile into the sm_90a train step: README, "Deviceless GPU
    compile"), else ``xla`` (off-GPU they run in the interpreter: for tests, not speed)."""
    if requested != "auto":
        return requested
    return note(op, (), "pallas" if on_gpu() else "xla", f"auto: {target_platform()}")


def default_dtype() -> str | None:
    """The compute dtype a run gets when none is asked for: bfloat16 on a GPU (tensor
    cores), else None: the config's own (float32 in every preset; CPUs have no fast bf16
    GEMM in XLA)."""
    return "bfloat16" if on_gpu() else None


def pallas_interpret(interpret: bool | None) -> bool:
    """Pallas kernels: compiled on a GPU, the interpreter elsewhere, unless told."""
    return (not on_gpu()) if interpret is None else interpret


def layer_loop(requested: str, choices: tuple[str, ...]) -> str:
    """``auto``: unrolled on CPU, scanned elsewhere.

    A scan stacks every residual the backward needs into [L, ...] buffers and slices the
    parameters and residuals back out layer by layer; XLA:CPU performs each of those as a
    copy (~0.2 s of a bench-small step). Unrolled, each layer keeps its own buffers, at
    the price of compile time linear in depth, which is what GPU pods with 61 layers
    avoid. Neither is a kernel whose speed depends on the CPU's vectors, so this one is
    decided by platform.
    """
    if requested not in choices:
        raise ValueError(f"layer loop: unknown {requested!r}; choose from {list(choices)}")
    if requested == "auto":
        on_cpu = target_platform() == "cpu"
        why = "auto: residual copies on CPU" if on_cpu else "auto: compile time flat in depth"
        return note("layer_loop", (), "unroll" if on_cpu else "scan", why)
    return note("layer_loop", (), requested, "requested")


# ------------------------------------------------------------------ measured choices


def local_shape(x) -> tuple[int, ...]:
    """x's per-device shape: each dimension divided by the mesh axes its type shards it
    over (inside ``shard_map`` the shape is already local)."""
    t = jax.typeof(x)
    sharding = getattr(t, "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty:
        return tuple(t.shape)
    spec = tuple(sharding.spec) + (None,) * len(t.shape)
    out = []
    for n, entry in zip(t.shape, spec, strict=False):
        axes = () if entry is None else entry if isinstance(entry, tuple) else (entry,)
        out.append(n // math.prod(mesh.shape[a] for a in axes))
    return tuple(out)


def shape_class(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Each size rounded up to a power of two: shapes of one class share a decision."""
    return tuple(1 << max(0, math.ceil(math.log2(max(n, 1)))) for n in shape)


def measure(
    name: str, run: Callable[[], object], runs: int = 5, budget_s: float = 0.5
) -> list[float]:
    """Seconds of each of up to ``runs`` consecutive runs of ``run`` after one warm-up run,
    fewer once they exceed ``budget_s``. Tests replace this function to inject timings."""
    run()
    samples: list[float] = []
    while len(samples) < runs and sum(samples) <= budget_s:
        t = time.perf_counter()
        run()
        samples.append(time.perf_counter() - t)
    return samples


# A kernel must beat the XLA path by this fraction to replace it: on a noisy machine a
# near-tie is noise, and the default must never run slower than the XLA fallback.
MARGIN = 0.05
# A race that a kernel wins, or loses by less than this, is run twice more (candidates in
# turn, the order reversed every other round) and each candidate keeps its best: a load
# spike during the XLA path's turn cannot hand the race to a kernel.
CLOSE = 0.25
CLOSE_ROUNDS = 3


def measured(
    op: str,
    shape: tuple[int, ...],
    candidates: dict[str, Candidate],
    *,
    build_id: str,
    fallback: str,
) -> str:
    """The fastest of ``candidates`` (name -> Candidate) for ``op`` at ``shape``, where
    ``fallback`` (the XLA path) wins unless another beats it by ``MARGIN``.

    Decided once per (machine, ``build_id``, op, shape class, ``phase()``) and cached on
    disk. ``build_id`` names the kernel build (variant and tiles), so a rebuilt kernel is
    measured again. Inside ``forcing`` the forced choice is returned unmeasured.
    """
    if fallback not in candidates:
        raise ValueError(f"fallback {fallback!r} is not a candidate of {op}: {list(candidates)}")
    family = op.split("[")[0]
    choice = (_forced.get() or {}).get(family)
    if choice is None:
        backward = phase() == "fwd+bwd"
        run = lambda: race(op, shape, candidates, fallback, backward=backward)  # noqa: E731
        choice = decided(op, shape, f"{op}|{phase()}", build_id, run).choice
    elif choice not in candidates:
        raise ValueError(f"forced {family}={choice!r}: choose one of {list(candidates)}")
    seen = _seen.get()
    if seen is not None:
        seen.setdefault(family, (fallback, set(), build_id))[1].add(choice)
    return choice


def decided(
    op: str, shape: tuple[int, ...], what: str, build_id: str, race: Callable[[], Decision]
) -> Decision:
    """The decision for ``what`` (op, phase, ...) at ``shape``'s class: this process's,
    else the disk cache's, else ``race()``'s (then stored); logged once per process."""
    key = _cache_key(what, shape_class(shape), build_id)
    if key in _decisions:
        return _decisions[key]
    decision = _load(key)
    cached = decision is not None
    if decision is None:
        decision = _store(key, race())
    _decisions[key] = decision
    _log.info(
        "backends: %s %s -> %s (%s%s)",
        op,
        _dims(shape),
        decision.choice,
        decision.reason,
        ", cached" if cached else "",
    )
    return decision


def _lead(seconds: dict[str, float], fallback: str) -> tuple[str, float]:
    """The fastest candidate and how much faster than ``fallback`` it is (a fraction)."""
    best = min(seconds, key=lambda n: (seconds[n], n != fallback))
    return best, 1.0 - seconds[best] / seconds[fallback]


def race(
    op: str,
    shape: tuple[int, ...],
    candidates: dict[str, Candidate],
    fallback: str,
    *,
    backward: bool,
    runs: int = 5,
    budget_s: float = 0.5,
    reduce: Callable[[list[float]], float] = min,
    how: str = "",
) -> Decision:
    """Times each candidate in a worker thread (a fresh trace and mesh context, so the
    caller may be in the middle of tracing a sharded program); a kernel's win is rerun.
    Each candidate's samples, over all rounds, are reduced by ``reduce`` (``how`` names
    another than the best in the reason): the best for an operation, the median for a
    whole program."""

    def time_all() -> dict[str, float]:
        made = {name: make(backward) for name, make in candidates.items()}
        samples = {name: list(measure(name, run, runs, budget_s)) for name, run in made.items()}
        seconds = {n: reduce(s) for n, s in samples.items()}
        rivals = [n for n in seconds if n != fallback]
        if any(seconds[n] < (1 + CLOSE) * seconds[fallback] for n in rivals):
            for r in range(1, CLOSE_ROUNDS):  # reversed order every other round
                for name in list(made)[:: -1 if r % 2 else 1]:
                    samples[name] += measure(name, made[name], runs, budget_s)
        return {n: reduce(s) for n, s in samples.items()}

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        seconds = pool.submit(time_all).result()
    best, lead = _lead(seconds, fallback)
    choice = best if lead >= MARGIN else fallback
    ms = {n: round(s * 1e3, 3) for n, s in seconds.items()}
    timings = ", ".join(f"{n} {ms[n]:.2f} ms" for n in sorted(ms, key=ms.get))
    what = "fwd+bwd" if backward else "fwd"
    reason = f"measured {what}{', ' + how if how else ''}: {timings}"
    if best != choice:
        reason += f"; {best} leads by {lead:.0%} < {MARGIN:.0%}: {fallback} kept"
    return Decision(op, tuple(shape), choice, reason, ms)


def _cache_key(what: str, shape: tuple[int, ...], build_id: str) -> str:
    return store.key(what, shape, build_id, f"margin {MARGIN}, close {CLOSE} x{CLOSE_ROUNDS}")
