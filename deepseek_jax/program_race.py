"""The program race: which C++ kernels a whole jitted program runs, decided by timing it.

Why: an operation raced alone does not predict its cost inside the program. A custom call
ends XLA's fusions around it and pins its operands' layouts: on the AVX-512 machine our
grouped GEMM won its operation race by 8 % and made the train step slower than XLA only
(README, 'Per machine class'). So on CPU the operation race (``backends.measured``) is a
cheap pre-filter; when the program it chose runs any C++ kernel, the program itself is
compiled with each candidate combination and timed on its real arguments:

- the pre-filter's combination;
- XLA only (the fallback: it wins ties);
- each kernel family alone, the others on their XLA twins.

Each candidate is timed as the real loop runs it: compiled with donation, on its own copy
of the arguments (a train state and a batch), ``STEPS`` consecutive steps after a warm-up
step, each step's outputs fed to the next (``carry``); the arguments themselves are
untouched, so the real run starts from them and its results are those of the same program
built without the race, bit for bit. The rule is the operation race's (``backends.race``:
interleaved rounds when close; a combination must beat XLA only by ``MARGIN``) on the
*median* step of each: a program's steps can be bimodal (a slow step every other one),
which a best-of sees in its fast mode only. The decision is cached beside the operation
decisions, keyed by the machine, the kernel builds, the program's name, phase and shape
class, the pre-filter's choice, the timing rule, ``XLA_FLAGS`` and a hash of the traced
program (its config, shapes and mesh), and logged in one line. Explicit config values never
reach the race (``forcing``).

Once a program's backends are decided, each of ``listeners`` is told which C++ kernels the
program that will run calls (how an entry point picks its malloc: ``experiments/runtime.py``).

Not raced (the pre-filter's choice stands, noted in ``backends.decisions()``): with
``DEEPSEEK_JAX_PROGRAM_RACE=off`` (the test suite: a race compiles a program up to four
times), and in multi-process runs (the processes would have to time in lockstep to agree).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import statistics
from collections.abc import Callable
from contextlib import AbstractContextManager

import jax

import cpu_kernels.build as kernel_build
import deepseek_jax.backends as backends

ENV = "DEEPSEEK_JAX_PROGRAM_RACE"
_log = logging.getLogger("deepseek_jax.backends")
Forcing = dict[str, str]  # op family -> choice (``backends.forcing``)
Carry = Callable[[tuple, object], tuple]  # (arguments, outputs) -> the next step's arguments
STEPS = 4  # timed consecutive steps per candidate and round (even: a bimodal median shows)
RULE = f"median of {STEPS} donated steps"
# Called as listener(program name, C++ FFI targets it calls) once its backends are decided.
listeners: list[Callable[[str, tuple[str, ...]], None]] = []


def kernels_called(jaxpr_text: str) -> tuple[str, ...]:
    """The C++ kernels (FFI target names) a traced program's jaxpr calls."""
    return tuple(sorted(set(re.findall(re.escape(kernel_build.PREFIX) + r"\w+", jaxpr_text))))


def _name(forced: Forcing) -> str:
    return " ".join(f"{f}={c}" for f, c in sorted(forced.items()))


def combinations(seen: dict[str, tuple[str, set[str], str]]) -> tuple[dict[str, Forcing], str]:
    """The combinations to race, by name, and the fallback's (XLA only) name, given what a
    trace chose (``backends.recording``); none when it chose no kernel. The pre-filter's
    own comes first: all its families' choices where each family made one, else unforced
    (``op race (...)``, its per-shape choices)."""
    xla = {f: fallback for f, (fallback, _, _) in seen.items()}
    if all(chosen <= {xla[f]} for f, (_, chosen, _) in seen.items()):
        return {}, _name(xla)
    if all(len(chosen) == 1 for _, chosen, _ in seen.values()):
        pre = {f: next(iter(chosen)) for f, (_, chosen, _) in seen.items()}
        combos = {_name(pre): pre}
    else:
        each = ", ".join(f"{f}={'/'.join(sorted(c))}" for f, (_, c, _) in sorted(seen.items()))
        combos = {f"op race ({each})": {}}
    combos.setdefault(_name(xla), xla)
    for f, (fallback, chosen, _) in sorted(seen.items()):
        for kernel in sorted(chosen - {fallback}):
            mix = {**xla, f: kernel}
            combos.setdefault(_name(mix), mix)
    return combos, _name(xla)


def raced(
    name: str,
    build: Callable[[bool], Callable],
    *,
    enter: Callable[[], AbstractContextManager],
    shape: Callable[..., tuple[int, ...]],
    carry: Carry,
    phase: str = "fwd+bwd",
) -> Callable:
    """The program ``build(donate)`` (a fresh ``jax.jit`` each call) as a function of its
    arguments which, on its first call, decides its backends on those arguments
    (``decide``) and from then on runs the winner. ``enter()``: the context each call runs
    in (the mesh); ``shape(*args)``: the shape whose class keys the decision;
    ``carry(args, outputs)``: the next step's arguments (the loop's state passing)."""
    chosen: list[tuple[Forcing, Callable]] = []

    def run(*args):
        if not chosen:
            chosen.append(decide(name, build, enter, shape(*args), args, phase, carry))
        forced, program = chosen[0]
        with enter(), backends.forcing(**forced):
            return program(*args)

    return run


def decide(
    name: str,
    build: Callable[[bool], Callable],
    enter: Callable[[], AbstractContextManager],
    shape: tuple[int, ...],
    args: tuple,
    phase: str,
    carry: Carry,
) -> tuple[Forcing, Callable]:
    """(the forced choices, the donating program to run with them) for ``args``; tells
    ``listeners`` which C++ kernels that program calls."""
    program = build(True)
    if backends.target_platform() != "cpu":
        _tell(name, "")
        return {}, program  # no C++ kernels to race
    with enter(), backends.recording() as seen:
        traced = program.trace(*args)  # the call reuses this trace
    text = re.sub(r"0x[0-9a-f]+", "", str(traced.jaxpr))  # no addresses: stable across runs
    forced = _choose(name, build, enter, shape, args, phase, carry, seen, text)
    if forced is not None:  # another combination than the traced one
        program = build(True)
        with enter(), backends.forcing(**forced):
            text = str(program.trace(*args).jaxpr)  # the call reuses this trace
    _tell(name, text)
    return forced or {}, program


def _tell(name: str, jaxpr_text: str) -> None:
    for listener in listeners:
        listener(name, kernels_called(jaxpr_text))


def _choose(name, build, enter, shape, args, phase, carry, seen, text) -> Forcing | None:
    """The forced choices to rebuild the program with, or None: the traced program (the
    pre-filter's choices) stands."""
    op = f"program {name}"
    if os.environ.get(ENV, "on") == "off" or jax.process_count() > 1:
        why = f"{ENV}=off" if jax.process_count() == 1 else f"{jax.process_count()} processes"
        backends.note(op, shape, "op race", f"program not raced: {why}")
        return None
    combos, xla = combinations(seen)
    if not combos:
        backends.note(op, shape, "op race", "program not raced: the op race chose no kernel")
        return None
    pre = next(iter(combos))
    what = "|".join([op, phase, pre, RULE, os.environ.get("XLA_FLAGS", ""), _digest(text)])
    build_id = " + ".join(sorted({b for _, _, b in seen.values()}))

    def race() -> backends.Decision:
        _log.info(  # a first run's pause (one compile per combination), said before it
            "backends: racing %s over %d backend combinations (%s); the choice is cached",
            op,
            len(combos),
            RULE,
        )
        candidates = {n: _timed(build, enter, f, args, carry) for n, f in combos.items()}
        d = backends.race(
            op,
            shape,
            candidates,
            xla,
            backward=phase == "fwd+bwd",
            runs=STEPS,
            budget_s=float("inf"),
            reduce=statistics.median,
            how=RULE,
        )
        return dataclasses.replace(d, reason=f"program {d.reason}; the op race chose {pre}")

    choice = backends.decided(op, shape, what, build_id, race).choice
    if choice not in combos:  # a cache file from elsewhere: keep the pre-filter's choice
        backends.note(op, shape, "op race", f"cached program choice {choice!r} unknown here")
        return None
    return None if choice == pre else combos[choice]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _timed(
    build: Callable[[bool], Callable],
    enter: Callable[[], AbstractContextManager],
    forced: Forcing,
    args: tuple,
    carry: Carry,
) -> backends.Candidate:
    """One combination as a race candidate: each run is one step of the donating program
    on a private copy of ``args`` (made on the first run), fed the previous step's outputs
    like the real loop, so donation and buffer reuse are what the real steps see."""

    def make(backward: bool):
        program = build(True)
        current: list[tuple] = []

        def run():
            if not current:
                current.append(jax.tree.map(_copy, args))
            with enter(), backends.forcing(**forced):
                out = program(*current[0])
            current[0] = carry(current[0], out)
            jax.block_until_ready(out)

        return run

    return make


def _copy(x):
    """A fresh buffer with ``x``'s sharding (the donated program consumes it)."""
    return jax.device_put(x, x.sharding, may_alias=False) if isinstance(x, jax.Array) else x
