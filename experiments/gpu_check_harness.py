"""The plumbing of ``experiments.gpu_check``: its log, guarded sections, timings, time
budget, results table and watchdog. Kernel-free, so each check module
(``gpu_check_fp8``, ``gpu_check_mla``) holds only what it checks.

Time budget: the watchdog fires at ``limit`` seconds ($GPU_CHECK_TIMEOUT_S, default 300);
timings stop at ``deadline()`` = 80 % of it (240 s by default), leaving time for the table.
A slow CPU dry run can raise the limit and every deadline moves with it.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

_LOG: list[str] = []
_T0 = time.time()
_STATE = {"dry": False, "limit": 300.0}  # set once by ``guarded``


def dry() -> bool:
    """--dry-run: every size shrunk and the kernels in their interpreters (a CPU smoke test)."""
    return bool(_STATE["dry"])


def dims(*sizes: int) -> tuple[int, ...]:
    return tuple(min(s, 256) for s in sizes) if dry() else sizes


def elapsed() -> float:
    return time.time() - _T0


def deadline(reserve_s: float = 0.0) -> float:
    """Seconds since the start past which timings are skipped, ``reserve_s`` earlier to
    leave that much to a later section."""
    return 0.8 * float(_STATE["limit"]) - reserve_s


def log(*parts) -> None:
    line = " ".join(str(p) for p in parts)
    print(line, flush=True)
    _LOG.append(line)


def section(name: str):
    """Runs the decorated function now, logging its exception instead of raising."""

    def run(fn):
        log(f"\n== {name} ({elapsed():.0f} s)")
        try:
            fn()
        except Exception:  # one failing section must not stop the others
            log(f"!! section '{name}' failed:\n{traceback.format_exc()}")
        return fn

    return run


def err(out, ref) -> float:
    """Max abs error over the max abs reference (a NaN anywhere gives NaN, never OK)."""
    import jax.numpy as jnp

    out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.max(jnp.abs(out - ref)) / jnp.maximum(jnp.max(jnp.abs(ref)), 1e-30))


def bench(fn, *args, iters: int = 20, repeats: int = 5) -> float:
    """Median seconds per call of a jitted ``fn`` (compile and warm-up excluded)."""
    import jax

    if dry():
        iters, repeats = 1, 1
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / iters)
    return statistics.median(times)


class Row(NamedTuple):
    """One timing of the results table; ``rate`` = work / secs in ``unit``; the ``base``
    row of a (case, shape) is what the others are compared with."""

    case: str
    shape: str
    impl: str
    secs: float | None
    rate: float | None
    unit: str
    base: bool


_UNIT_SCALE = {"TFLOP/s": 1e12, "GB/s": 1e9}


def timed(rows: list[Row], case, shape, impl, work, unit, fn, *args, until, base=False):
    """Times ``fn(*args)`` into ``rows`` (``work`` FLOPs or bytes per call, per ``unit``),
    unless past ``until`` (seconds since the start); an error becomes an error row."""
    if elapsed() > until:
        log(f"  {case} {shape} {impl}: skipped (time budget)")
        return
    try:
        secs = bench(fn, *args)
    except Exception as ex:
        rows.append(Row(case, shape, impl, None, None, unit, base))
        log(f"  {case} {shape} {impl}: ERROR {type(ex).__name__}: {str(ex)[:400]}")
        return
    rate = work / secs / _UNIT_SCALE[unit]
    rows.append(Row(case, shape, impl, secs, rate, unit, base))
    log(f"  {case} {shape} {impl}: {1e6 * secs:.1f} us, {rate:.1f} {unit}")


def table(rows: list[Row]) -> None:
    if not rows:
        return
    base = {(r.case, r.shape): r.secs for r in rows if r.base and r.secs}
    log("\n== table (median of 5 x 20 calls; vs base = the bf16 or jnp row's time / this time)")
    log(f"{'case':30s} {'shape':24s} {'impl':24s} {'us':>10s} {'rate':>8s} {'':7s} {'vs base':>8s}")
    for r in rows:
        if r.secs is None:
            log(f"{r.case:30s} {r.shape:24s} {r.impl:24s} {'error':>10s}")
            continue
        ratio = base[(r.case, r.shape)] / r.secs if (r.case, r.shape) in base else float("nan")
        log(
            f"{r.case:30s} {r.shape:24s} {r.impl:24s} {1e6 * r.secs:10.1f} {r.rate:8.1f} "
            f"{r.unit:7s} {ratio:8.2f}"
        )


def guarded(body: Callable[[list[Row]], None], *, dry_run: bool, out_dir: Path) -> int:
    """Runs ``body(rows)`` under the watchdog, then writes the table and the log to
    ``out_dir/gpu_check.log``; if ``body`` outlives the limit (a hung kernel), the watchdog
    writes them and exits with status 3."""
    _STATE["dry"] = dry_run
    _STATE["limit"] = limit = float(os.environ.get("GPU_CHECK_TIMEOUT_S", "300"))
    log_path = out_dir / "gpu_check.log"
    rows: list[Row] = []
    done = threading.Lock()

    def finish(note: str = "") -> None:
        if not done.acquire(blocking=False):
            return
        if note:
            log(note)
        table(rows)
        log(f"\ntotal {elapsed():.0f} s; log: {log_path}")
        out_dir.mkdir(parents=True, exist_ok=True)
        log_path.write_text("\n".join(_LOG) + "\n")

    def watchdog() -> None:
        finish(f"\n!! watchdog: still running after {limit:.0f} s (a hung kernel?); exiting")
        os._exit(3)

    timer = threading.Timer(limit, watchdog)
    timer.daemon = True
    timer.start()
    try:
        body(rows)
    finally:
        timer.cancel()
        finish()
    return 0
