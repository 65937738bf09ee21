"""The FP8 GEMM sections of ``experiments.gpu_check``: cross-lowering of the Mosaic GPU
kernels for CUDA, their correctness (compiled, dense, ragged edges, bf16 output, grouped
over ragged experts, two tile configs) against the plain-jnp reference, the xla backend and
``fp8_linear``'s gradients, then TFLOP/s at 4096^3 and MoE expert shapes against BF16
``jnp.dot``, XLA's per-tensor FP8 dot and ``lax.ragged_dot``.
"""

from __future__ import annotations

import functools

from experiments.gpu_check_harness import Row, dims, err, log, section, timed


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


CONFIGS = {  # name -> BlockSizes kwargs; the table keeps every one that compiles
    "bn128": {"block_n": 128, "stages": 4},
    "bn256": {"block_n": 256, "stages": 4},
}
SHAPES = {  # name -> (M, N, K)
    "square 4096^3": (4096, 4096, 4096),
    "MoE up/gate (K=7168, N=2048)": (4096, 2048, 7168),
    "MoE down (K=2048, N=7168)": (4096, 7168, 2048),
}


def lowering() -> None:
    """CPU-safe: the Mosaic GPU kernels cross-lowered for CUDA."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels import fp8_matmul as fm

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


def correctness() -> None:
    import jax
    import jax.numpy as jnp

    from deepseek_jax import fp8, fp8_gemm
    from pallas_kernels import fp8_matmul as fm

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
                    e = err(out, fm.fp8_matmul_reference(a8, sa, b8, sb))
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
            e = err(out, ref)
            log(
                f"  {name} groups {sizes.tolist()}: max rel err {e:.2e} "
                f"{'OK' if e < fm.MOSAIC_REL_TOL else 'FAIL'}"
            )

    @section("correctness: xla backend on the GPU vs reference")
    def _():
        (M, K) = dims(512, 4096)
        a8, sa, b8, sb = _operands(2, (M, K), (M, K))
        e = err(
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
            f"{err(dx_p, dx_x):.2e}, dW max rel err {err(dw_p, dw_x):.2e}"
        )


def throughput(rows: list[Row], until: float) -> None:
    import jax
    import jax.numpy as jnp

    from deepseek_jax import fp8, fp8_gemm
    from pallas_kernels import fp8_matmul as fm

    def gemm(case, shape, impl, flops, fn, *args, base=False):
        timed(rows, case, shape, impl, flops, "TFLOP/s", fn, *args, until=until, base=base)

    for case, (M, N, K) in SHAPES.items():

        @section(f"throughput: {case}, M={M} N={N} K={K}")
        def _(case=case, M=M, N=N, K=K):
            M, N, K = dims(M, N, K)
            flops = 2 * M * N * K
            shape = f"{M}x{N}x{K}"
            ka, kb = jax.random.split(jax.random.key(4))
            a16 = jax.random.normal(ka, (M, K), jnp.bfloat16)
            b16 = jax.random.normal(kb, (K, N), jnp.bfloat16)
            gemm(case, shape, "bf16 jnp.dot", flops, jax.jit(jnp.dot), a16, b16, base=True)
            a8, sa, b8, sb = _operands(5, (1, M, K), (1, N, K))
            for name, kw in CONFIGS.items():
                f = _mosaic_bf16(fm.fp8_matmul, kw)
                gemm(case, shape, f"fp8 ours {name}", flops, f, a8, sa, b8, sb)
            per_tensor = jax.jit(
                lambda a, b: jax.lax.dot_general(
                    a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.bfloat16
                )
            )
            gemm(case, shape, "fp8 XLA per-tensor dot", flops, per_tensor, a8[0], b8[0])
            xla = jax.jit(
                functools.partial(fp8_gemm.scaled_matmul, backend="xla", out_dtype=jnp.bfloat16)
            )
            gemm(case, shape, "fp8 xla backend", flops, xla, a8, sa, b8, sb)

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
        ragged = jax.jit(lambda a, b, s: jax.lax.ragged_dot(a, b, s))
        gemm("grouped", shape, "bf16 lax.ragged_dot", flops, ragged, a16, b16, sizes, base=True)
        for name, kw in CONFIGS.items():
            f = _mosaic_bf16(fm.fp8_grouped_matmul, kw)
            gemm("grouped", shape, f"fp8 ours {name}", flops, f, a8, sa, b8, sb, gid)

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

        bf16 = step(lambda x, w: x @ w.astype(jnp.bfloat16))
        gemm("linear", shape, "bf16 linear", flops, bf16, x, w, base=True)
        for backend in ("pallas", "xla"):
            lin = step(functools.partial(fp8.fp8_linear, backend=backend))
            gemm("linear", shape, f"fp8_linear {backend}", flops, lin, x, w)
