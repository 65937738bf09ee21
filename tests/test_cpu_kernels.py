"""The C++ grouped GEMM (cpu_kernels/) against jax.lax.ragged_dot, values and gradients,
for every build variant (instruction set) this machine can execute."""

import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpu_kernels import build, grouped_gemm
from tests.numerics import rel_err

pytestmark = pytest.mark.skipif(
    not grouped_gemm.available(), reason="the C++ grouped GEMM does not build here"
)


def problem(A, K, N, sizes, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k[0], (A, K), jnp.float32) / np.sqrt(K)  # y ~ N(0, 1)
    w = jax.random.normal(k[1], (len(sizes), K, N), jnp.float32)
    dy = jax.random.normal(k[2], (A, N), jnp.float32)
    return x, w, dy, jnp.asarray(sizes, jnp.int32)


# Every instruction-set build this CPU runs (native, avx512, avx2, portable on x86 with
# AVX-512): each has its own register tile, so each is held to the reference.
VARIANTS = build.runnable_variants()

# (A, K, N, group sizes): the register tiles' row and column tails (14 x 32, 6 x 16,
# 4 x 8), groups longer than a 112-row work item, empty groups, rows past sum(sizes)
# (must come out zero).
CASES = [
    (64, 32, 32, [64]),
    (300, 40, 70, [0, 120, 1, 113, 0, 59]),
    (257, 33, 31, [100, 0, 150]),
    (500, 512, 256, [13, 250, 0, 7, 200]),
    (40, 16, 96, [0, 0]),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("A, K, N, sizes", CASES)
def test_gmm_equals_ragged_dot(A, K, N, sizes, variant):
    x, w, _, s = problem(A, K, N, sizes)
    y = jax.jit(functools.partial(grouped_gemm.gmm, variant=variant))(x, w, s)
    assert rel_err(y, grouped_gemm.grouped_matmul_reference(x, w, s)) < 1e-6
    np.testing.assert_array_equal(y[sum(sizes) :], 0.0)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("A, K, N, sizes", CASES)
def test_tgmm_is_the_per_group_weight_gradient(A, K, N, sizes, variant):
    x, _, dy, s = problem(A, K, N, sizes)
    dw = jax.jit(functools.partial(grouped_gemm.tgmm, variant=variant))(x, dy, s)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    want = np.stack(
        [
            np.asarray(x[a:b]).T @ np.asarray(dy[a:b])
            for a, b in zip(starts[:-1], starts[1:], strict=True)
        ]
    )
    assert rel_err(dw, want) < 1e-6
    for g, n in enumerate(sizes):
        if n == 0:
            np.testing.assert_array_equal(dw[g], 0.0)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("A, K, N, sizes", CASES[1:4])
def test_grouped_matmul_vjp_equals_reference(A, K, N, sizes, variant):
    x, w, dy, s = problem(A, K, N, sizes)

    def loss(f):
        return lambda x, w: jnp.sum(dy * jnp.sin(f(x, w, s)))

    kernel = functools.partial(grouped_gemm.grouped_matmul, variant=variant)
    got = jax.jit(jax.grad(loss(kernel), (0, 1)))(x, w)
    want = jax.grad(loss(grouped_gemm.grouped_matmul_reference), (0, 1))(x, w)
    for g, r in zip(got, want, strict=True):
        assert rel_err(g, r) < 1e-6


def test_bfloat16_inputs_compute_in_float32():
    x, w, _, s = problem(96, 64, 64, [40, 56])
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    y = grouped_gemm.grouped_matmul(xb, wb, s)
    assert y.dtype == jnp.float32
    assert rel_err(y, grouped_gemm.grouped_matmul_reference(xb, wb, s)) < 1e-6


def test_two_kernels_at_once_do_not_deadlock():
    # Independent calls in one program may run concurrently on XLA's two-thread pool;
    # each must finish even when its helper task never gets a thread. The program runs in
    # a daemon thread so that a deadlock fails the test (after a generous 120 s: it takes
    # well under a second) instead of hanging the suite.
    x, w, _, s = problem(512, 64, 64, [200, 312])
    both = jax.jit(lambda x, w: [grouped_gemm.gmm(x * i, w, s) for i in range(1, 5)])
    both.lower(x, w).compile()  # compile outside the timed part
    result = []
    runner = threading.Thread(
        target=lambda: result.append(jax.block_until_ready(both(x, w))), daemon=True
    )
    runner.start()
    runner.join(timeout=120)
    assert not runner.is_alive(), "four concurrent grouped GEMMs did not finish: deadlock"
    for i, y in enumerate(result[0], start=1):
        assert rel_err(y, grouped_gemm.grouped_matmul_reference(x * i, w, s)) < 1e-6


def test_bad_shapes_name_the_problem():
    x, w, _, s = problem(32, 16, 32, [32])
    with pytest.raises(ValueError, match="disagree on K or G"):
        grouped_gemm.gmm(x[:, :8], w, s)
    with pytest.raises(ValueError, match=r"expected x\[A, K\]"):
        grouped_gemm.gmm(x[None], w, s)


def test_build_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPSEEK_JAX_KERNEL_CACHE", str(tmp_path))
    src = tmp_path / "broken.cc"
    src.write_text("this is not C++\n")
    with pytest.raises(build.KernelBuildError, match="compiling broken.cc failed"):
        build.load(src, ("Nothing",), "test_")
    assert not list(tmp_path.glob("*.so"))  # no half-written library left behind
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    src.write_text("int x;\n")
    with pytest.raises(build.KernelBuildError):
        build.load(src, ("Nothing",), "test_")


def test_unwritable_cache_is_a_build_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("DEEPSEEK_JAX_KERNEL_CACHE", str(blocker / "cache"))  # under a file
    src = tmp_path / "ok.cc"
    src.write_text("int x;\n")
    with pytest.raises(build.KernelBuildError, match="building ok.cc"):
        build.load(src, ("Nothing",), "test_")


def test_tgmm_column_shares_of_few_groups_are_exact():
    # With fewer groups than twice the workers the kernel splits each group's dw columns
    # into shares (splits = min(column blocks, ceil(2 threads / G)): >= 2 for one group on
    # any pool). N = 200 is 7 column blocks of 32, the last partial, so the shares are
    # uneven; every column must be written exactly once, an empty group's shares zeroed.
    # (Which worker runs which share is not observable from here: the values are.)
    for sizes in ([300], [0, 300], [150, 150]):
        x, _, dy, s = problem(300, 40, 200, sizes)
        dw = jax.jit(grouped_gemm.tgmm)(x, dy, s)
        for g, n in enumerate(sizes):
            a = sum(sizes[:g])
            want = np.asarray(x[a : a + n]).T @ np.asarray(dy[a : a + n])
            assert rel_err(dw[g], want) < 1e-6 if n else not np.any(dw[g])


# The tile each fixed instruction set must compile to (tiles.h): the accumulators fit the
# register file (28 of 32 zmm, 12 of 16 ymm, 8 of 16 xmm).
EXPECTED_TILES = {"avx512": "avx512 14x32", "avx2": "avx2 6x16", "portable": "portable 4x8"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_compiles_its_own_register_tile(variant):
    config = grouped_gemm.KERNEL.tile_config(variant)
    if variant in EXPECTED_TILES:
        assert config == EXPECTED_TILES[variant]
    else:  # native: one of the instruction sets above, or NEON on Arm
        assert config.split()[0] in ("avx512", "avx2", "avx", "neon", "portable")


def test_an_unknown_variant_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("DEEPSEEK_JAX_KERNEL_VARIANT", "sse9")
    with pytest.raises(build.KernelBuildError, match="DEEPSEEK_JAX_KERNEL_VARIANT='sse9'"):
        build.default_variant()
    with pytest.raises(build.KernelBuildError, match="unknown kernel variant 'avx9'"):
        grouped_gemm.KERNEL.load("avx9")
