"""One prepared check of our FP8 GEMM on a Hopper GPU: ``python -m experiments.gpu_check``.

Sections (each guarded, so one failure still prints the rest):
1. environment: versions, device, SM count;
2. lowering: the Mosaic GPU kernels cross-lowered for CUDA (also the only part on a CPU);
3. correctness on the GPU: compiled kernels (dense, ragged edges, bf16 output, grouped
   over ragged experts, two tile configs) against the plain-jnp reference; the xla
   backend; ``fp8_linear`` forward and gradients, pallas vs xla backend;
4. throughput: TFLOP/s of our FP8 GEMM at 4096^3 and at MoE expert shapes
   (M = 4096 rows; K = 7168, N = 2048 and K = 2048, N = 7168), against ``jnp.dot`` in
   BF16 on the same GPU, plus XLA's per-tensor FP8 dot (cuBLASLt) and our xla backend as
   context, the grouped kernel against ``lax.ragged_dot`` in BF16, and ``fp8_linear``'s
   forward + backward against a BF16 linear;
5. a table of section 4. The full log goes to $OUT/gpu_check.log if $OUT is set, else
   ./gpu_check.log. Sized to finish within about 5 minutes on an H200; a watchdog
   ($GPU_CHECK_TIMEOUT_S, default 300 s) writes the table and log and exits if a kernel
   hangs.

``--dry-run`` (for CPUs) runs every section with all sizes capped at 256 and the kernels in
their interpreters: a smoke test of this script, with meaningless timings.
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

_LOG = []
_DEADLINE_S = 240.0  # skip remaining timings past this, leaving time for the table
_T0 = time.time()
_DRY = {"on": False}  # --dry-run: shrink every size (a smoke test on a CPU)


def dims(*sizes: int) -> tuple[int, ...]:
    return tuple(min(s, 256) for s in sizes) if _DRY["on"] else sizes


def log(*parts) -> None:
    line = " ".join(str(p) for p in parts)
    print(line, flush=True)
    _LOG.append(line)


def section(name: str):
    """Runs the decorated function now, logging its exception instead of raising."""

    def run(fn):
        log(f"\n== {name} ({time.time() - _T0:.0f} s)")
        try:
            fn()
        except Exception:  # one failing section must not stop the others
            log(f"!! section '{name}' failed:\n{traceback.format_exc()}")
        return fn

    return run


def _mosaic_bf16(kernel, block_kw: dict):
    """Our Mosaic GPU ``kernel`` (dense or grouped), jitted, with BF16 output and blocks."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels import fp8_matmul as fm

    return jax.jit(
        functools.partial(
            kernel, out_dtype=jnp.bfloat16, impl="mosaic", block_sizes=fm.BlockSizes(**block_kw)
        )
    )


def _err(out, ref) -> float:
    import jax.numpy as jnp

    out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.max(jnp.abs(out - ref)) / jnp.maximum(jnp.max(jnp.abs(ref)), 1e-30))


def _operands(seed, a_shape, b_shape):
    import jax
    import jax.numpy as jnp

    ks = jax.random.split(jax.random.key(seed), 4)
    G = -(-a_shape[-1] // 128)
    a8 = (jax.random.normal(ks[0], a_shape) * 50).astype(jnp.float8_e4m3fn)
    b8 = (jax.random.normal(ks[1], b_shape) * 50).astype(jnp.float8_e4m3fn)
    sa = jnp.exp2(jax.random.uniform(ks[2], (*a_shape[:-1], G), minval=-4, maxval=4))
    sb = jnp.exp2(jax.random.uniform(ks[3], (*b_shape[:-1], G), minval=-4, maxval=4))
    return a8, sa, b8, sb


def bench(fn, *args, iters: int = 20, repeats: int = 5) -> float:
    """Median seconds per call of a jitted ``fn`` (compile and warm-up excluded)."""
    import jax

    if _DRY["on"]:
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


CONFIGS = {  # name -> BlockSizes kwargs; the table keeps every one that compiles
    "bn128": {"block_n": 128, "stages": 4},
    "bn256": {"block_n": 256, "stages": 4},
}
SHAPES = {  # name -> (M, N, K)
    "square 4096^3": (4096, 4096, 4096),
    "MoE up/gate (K=7168, N=2048)": (4096, 2048, 7168),
    "MoE down (K=2048, N=7168)": (4096, 7168, 2048),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _DRY["on"] = "--dry-run" in argv
    out_dir = Path(os.environ.get("OUT") or ".")
    log_path = out_dir / "gpu_check.log"
    rows: list[tuple] = []
    done = threading.Lock()

    def finish(note: str = "") -> None:
        if not done.acquire(blocking=False):
            return
        if note:
            log(note)
        _table(rows)
        log(f"\ntotal {time.time() - _T0:.0f} s; log: {log_path}")
        out_dir.mkdir(parents=True, exist_ok=True)
        log_path.write_text("\n".join(_LOG) + "\n")

    def watchdog() -> None:
        finish(f"\n!! watchdog: still running after {limit:.0f} s (a hung kernel?); exiting")
        os._exit(3)

    limit = float(os.environ.get("GPU_CHECK_TIMEOUT_S", "300"))
    timer = threading.Timer(limit, watchdog)
    timer.daemon = True
    timer.start()
    try:
        _run(rows)
    finally:
        timer.cancel()
        finish()
    return 0


def _run(rows: list[tuple]) -> None:
    import jax
    import jax.numpy as jnp

    from pallas_kernels import fp8_matmul as fm

    on_gpu = jax.default_backend() == "gpu"

    @section("environment")
    def _():
        log(
            "python",
            sys.version.split()[0],
            "| jax",
            jax.__version__,
            "| backend",
            jax.default_backend(),
        )
        for d in jax.devices():
            log(" ", d, "| kind:", d.device_kind, "| SMs:", getattr(d, "core_count", "?"))

    @section("lowering for CUDA (Mosaic GPU)")
    def _():
        S, f8, f32 = jax.ShapeDtypeStruct, jnp.float8_e4m3fn, jnp.float32
        for name, kw in CONFIGS.items():
            f = functools.partial(
                fm.fp8_matmul,
                impl="mosaic",
                interpret=False,
                out_dtype=jnp.bfloat16,
                block_sizes=fm.BlockSizes(**kw),
            )
            specs = (
                S((1, 512, 1024), f8),
                S((1, 512, 8), f32),
                S((1, 512, 1024), f8),
                S((1, 512, 8), f32),
            )
            text = jax.export.export(jax.jit(f), platforms=["cuda"])(*specs).mlir_module()
            log(f"  dense {name}: lowered, mosaic_gpu custom call: {'mosaic_gpu' in text}")
        g = functools.partial(fm.fp8_grouped_matmul, impl="mosaic", interpret=False)
        specs = (
            S((512, 1024), f8),
            S((512, 8), f32),
            S((4, 256, 1024), f8),
            S((4, 256, 8), f32),
            S((4,), jnp.int32),
        )
        text = jax.export.export(jax.jit(g), platforms=["cuda"])(*specs).mlir_module()
        log(f"  grouped: lowered, mosaic_gpu custom call: {'mosaic_gpu' in text}")

    if not on_gpu and not _DRY["on"]:
        log(
            "\nno GPU found: only the CPU-safe sections ran (environment, lowering); "
            "--dry-run runs the rest shrunk, in the interpreters."
        )
        return

    _correctness(fm)
    _throughput(fm, rows)


def _correctness(fm) -> None:
    import jax
    import jax.numpy as jnp

    from deepseek_jax import fp8, fp8_gemm

    @section("correctness: compiled Mosaic kernel vs reference")
    def _():
        cases = [
            ((1, 256, 256, 512), jnp.float32),
            ((2, 384, 256, 1024), jnp.float32),
            ((1, 200, 136, 300), jnp.float32),
            ((1, 512, 2048, 7168), jnp.bfloat16),
        ]
        cases = [((Bt, *dims(M, N, K)), od) for (Bt, M, N, K), od in cases]
        for name, kw in CONFIGS.items():
            for (Bt, M, N, K), od in cases:
                try:
                    a8, sa, b8, sb = _operands(0, (Bt, M, K), (Bt, N, K))
                    out = fm.fp8_matmul(
                        a8, sa, b8, sb, out_dtype=od, impl="mosaic", block_sizes=fm.BlockSizes(**kw)
                    )
                    e = _err(out, fm.fp8_matmul_reference(a8, sa, b8, sb))
                    tol = fm.MOSAIC_REL_TOL if od == jnp.float32 else 8e-3
                    log(
                        f"  {name} {Bt}x{M}x{N}x{K} -> {jnp.dtype(od).name}: max rel err "
                        f"{e:.2e} {'OK' if e < tol else 'FAIL'}"
                    )
                except Exception as ex:
                    log(f"  {name} {Bt}x{M}x{N}x{K}: ERROR {type(ex).__name__}: {str(ex)[:400]}")

    @section("correctness: grouped kernel over ragged experts")
    def _():
        sizes = jnp.array(dims(300, 0, 17, 640, 129), jnp.int32)
        A, (N, K) = int(sizes.sum()), dims(256, 1024)
        row_P, gid = fp8_gemm.contiguous_layout(sizes, A)
        x8, sx, b8, sb = _operands(1, (A, K), (5, N, K))
        take = lambda v: jnp.take(v, row_P, axis=0, mode="fill", fill_value=0)  # noqa: E731
        a8, sa = take(x8), take(sx)
        ref = fm.fp8_grouped_matmul_reference(a8, sa, b8, sb, gid)
        for name, kw in CONFIGS.items():
            out = fm.fp8_grouped_matmul(
                a8, sa, b8, sb, gid, impl="mosaic", block_sizes=fm.BlockSizes(**kw)
            )
            e = _err(out, ref)
            log(
                f"  {name} groups {sizes.tolist()}: max rel err {e:.2e} "
                f"{'OK' if e < fm.MOSAIC_REL_TOL else 'FAIL'}"
            )

    @section("correctness: xla backend on the GPU vs reference")
    def _():
        (M, K) = dims(512, 4096)
        a8, sa, b8, sb = _operands(2, (M, K), (M, K))
        e = _err(
            fp8_gemm.scaled_matmul(a8, sa, b8, sb, backend="xla"),
            fp8_gemm.scaled_matmul_reference(a8, sa, b8, sb),
        )
        log(f"  {M}x{M}x{K}: max rel err {e:.2e} (XLA's own FP8 dot accumulation)")

    @section("correctness: fp8_linear, pallas vs xla backend (value and grads)")
    def _():
        k1, k2 = jax.random.split(jax.random.key(3))
        x = jax.random.normal(k1, dims(1024, 2048), jnp.bfloat16)
        w = 0.02 * jax.random.normal(k2, dims(2048, 768), jnp.float32)

        def vg(backend):
            def f(x, w):
                return jnp.sum(fp8.fp8_linear(x, w, backend=backend).astype(jnp.float32) ** 2)

            return jax.jit(jax.value_and_grad(f, (0, 1)))(x, w)

        (vx, (dx_x, dw_x)), (vp, (dx_p, dw_p)) = vg("xla"), vg("pallas")
        log(
            f"  loss rel diff {abs(float(vp - vx)) / abs(float(vx)):.2e}, dx max rel err "
            f"{_err(dx_p, dx_x):.2e}, dW max rel err {_err(dw_p, dw_x):.2e}"
        )


def _throughput(fm, rows: list[tuple]) -> None:
    import jax
    import jax.numpy as jnp

    from deepseek_jax import fp8, fp8_gemm

    def add(case, shape, impl, secs, flops):
        rows.append((case, shape, impl, secs, flops / secs / 1e12 if secs else None))
        log(f"  {case} {shape} {impl}: {1e3 * secs:.3f} ms, {flops / secs / 1e12:.1f} TFLOP/s")

    def timed(case, shape, impl, flops, fn, *args):
        if time.time() - _T0 > _DEADLINE_S:
            log(f"  {case} {impl}: skipped (time budget)")
            return
        try:
            add(case, shape, impl, bench(fn, *args), flops)
        except Exception as ex:
            rows.append((case, shape, impl, None, None))
            log(f"  {case} {impl}: ERROR {type(ex).__name__}: {str(ex)[:400]}")

    for case, (M, N, K) in SHAPES.items():

        @section(f"throughput: {case}, M={M} N={N} K={K}")
        def _(case=case, M=M, N=N, K=K):
            M, N, K = dims(M, N, K)
            flops = 2 * M * N * K
            shape = f"{M}x{N}x{K}"
            ka, kb = jax.random.split(jax.random.key(4))
            a16 = jax.random.normal(ka, (M, K), jnp.bfloat16)
            b16 = jax.random.normal(kb, (K, N), jnp.bfloat16)
            timed(case, shape, "bf16 jnp.dot", flops, jax.jit(jnp.dot), a16, b16)
            a8, sa, b8, sb = _operands(5, (1, M, K), (1, N, K))
            for name, kw in CONFIGS.items():
                f = _mosaic_bf16(fm.fp8_matmul, kw)
                timed(case, shape, f"fp8 ours {name}", flops, f, a8, sa, b8, sb)
            per_tensor = jax.jit(
                lambda a, b: jax.lax.dot_general(
                    a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.bfloat16
                )
            )
            timed(case, shape, "fp8 XLA per-tensor dot", flops, per_tensor, a8[0], b8[0])
            xla = jax.jit(
                functools.partial(fp8_gemm.scaled_matmul, backend="xla", out_dtype=jnp.bfloat16)
            )
            timed(case, shape, "fp8 xla backend", flops, xla, a8, sa, b8, sb)

    @section("throughput: grouped, 8 experts x 512 rows, K=7168, N=2048")
    def _():
        E, (rows_e, N, K) = 8, dims(512, 2048, 7168)
        M, flops, shape = E * rows_e, 2 * E * rows_e * N * K, f"{E}x{rows_e}x{N}x{K}"
        gid = jnp.repeat(jnp.arange(E, dtype=jnp.int32), rows_e // 128)
        a8, sa, b8, sb = _operands(6, (M, K), (E, N, K))
        sizes = jnp.full((E,), rows_e, jnp.int32)
        ka, kb = jax.random.split(jax.random.key(7))
        a16 = jax.random.normal(ka, (M, K), jnp.bfloat16)
        b16 = jax.random.normal(kb, (E, K, N), jnp.bfloat16)
        timed(
            "grouped",
            shape,
            "bf16 lax.ragged_dot",
            flops,
            jax.jit(lambda a, b, s: jax.lax.ragged_dot(a, b, s)),
            a16,
            b16,
            sizes,
        )
        for name, kw in CONFIGS.items():
            f = _mosaic_bf16(fm.fp8_grouped_matmul, kw)
            timed("grouped", shape, f"fp8 ours {name}", flops, f, a8, sa, b8, sb, gid)

    @section("throughput: fp8_linear forward + backward, M=4096 K=7168 N=2048")
    def _():
        M, K, N = dims(4096, 7168, 2048)
        flops, shape = 3 * 2 * M * N * K, f"{M}x{N}x{K} fwd+bwd"
        k1, k2 = jax.random.split(jax.random.key(8))
        x = jax.random.normal(k1, (M, K), jnp.bfloat16)
        w = 0.02 * jax.random.normal(k2, (K, N), jnp.float32)

        def step(lin):
            loss = lambda x, w: jnp.sum(lin(x, w).astype(jnp.float32))  # noqa: E731
            return jax.jit(jax.grad(loss, (0, 1)))

        timed(
            "linear",
            shape,
            "bf16 linear",
            flops,
            step(lambda x, w: x @ w.astype(jnp.bfloat16)),
            x,
            w,
        )
        for backend in ("pallas", "xla"):
            timed(
                "linear",
                shape,
                f"fp8_linear {backend}",
                flops,
                step(functools.partial(fp8.fp8_linear, backend=backend)),
                x,
                w,
            )


def _table(rows: list[tuple]) -> None:
    if not rows:
        return
    base = {r[0]: r[3] for r in rows if r[2].startswith("bf16") and r[3]}
    log("\n== table (median of 5 x 20 calls; vs bf16 = bf16 time / this time)")
    log(f"{'case':30s} {'M x N x K':22s} {'impl':24s} {'ms':>9s} {'TFLOP/s':>8s} {'vs bf16':>8s}")
    for case, shape, impl, secs, tflops in rows:
        if secs is None:
            log(f"{case:30s} {shape:22s} {impl:24s} {'error':>9s}")
            continue
        ratio = base[case] / secs if case in base else float("nan")
        log(f"{case:30s} {shape:22s} {impl:24s} {1e3 * secs:9.3f} {tflops:8.1f} {ratio:8.2f}")


if __name__ == "__main__":
    sys.exit(main())
