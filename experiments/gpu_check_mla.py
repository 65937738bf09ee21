"""The MLA decode sections of ``experiments.gpu_check``: our Pallas kernel
(``pallas_kernels/mla_decode.py``) against its jnp twin ``mla_decode_reference`` at
DeepSeek-V3 decode shapes, then microseconds per call and effective HBM GB/s of both.

The kernel runs as the engine runs it (``deepseek_jax/infer/paged.py``): compiled (Triton)
on a GPU, in the Pallas interpreter elsewhere (``backends.pallas_interpret``), default
``Blocks``, a bfloat16 page pool (the GPU's default dtype). Shapes: C=512 kv_lora_rank,
R=64 rope dim, pages of 16 positions (the engine's default); batches 1, 16, 64 x contexts
of 1024 and 8192 positions (the page table's width) with V3's H=128 heads, and batches 16
and 64 with 16 heads (V3's share of one GPU under 8-way tensor parallelism). The kernel
holds 64 heads per program (``Blocks.heads_per_block``): all 128 in one program ask for
346 KB of shared memory, over the 227 KB an H200 block may have (deviceless compile,
``experiments.gpu_compile_mla``).

Lengths are ragged: request 0 sees the whole context, request 1 a single key, the others
uniform in [T/4, T]; slots past a request's pages point at the trash page 0, as in the
engine, and its pages are scattered over the pool.

GB/s counts the bytes of the pages that hold visible keys, ceil(n_keys / P) pages of
P (C + R) values per request: what a decode step must read. Both implementations also
touch the trash slots (the kernel loads and masks them, the reference gathers them).
"""

from __future__ import annotations

import functools

from experiments.gpu_check_harness import Row, deadline, dims, elapsed, err, log, section, timed

LORA, ROPE, PAGE = 512, 64, 16  # DeepSeek-V3; the engine's page size
SHAPES = (  # (batch, context, heads)
    *((B, T, 128) for B in (1, 16, 64) for T in (1024, 8192)),
    *((B, T, 16) for B in (16, 64) for T in (1024, 8192)),
)
BUDGET_S = 60.0  # the timing section's share of the run (compiles happen in correctness)
# bf16 pages and queries are exact in TF32, so only the probabilities round (2^-11) in
# the kernel's second product on a GPU; the interpreter matches to ~1e-6.
REL_TOL = 1e-2
CASE = f"MLA decode (bf16 pages of {PAGE})"
_BROKEN: set[str] = set()  # shapes whose kernel raised in correctness: not timed again


def _shapes() -> list[tuple[int, int, int]]:
    """``SHAPES`` with ``dims`` applied; the dry run's capped contexts coincide, so
    deduplicated."""
    return list(dict.fromkeys((B, *dims(T, H)) for B, T, H in SHAPES))


def _label(B: int, T: int, H: int) -> str:
    C, R = dims(LORA, ROPE)
    return f"B{B} T{T} H{H} C{C}+{R}"


def _inputs(B: int, T: int, H: int, seed: int):
    """The kernel's arguments (qlat, qrope, ckv, krope, table, n_keys) for B requests of
    at most T positions and H heads; the bytes of their visible pages, of all table slots."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    C, R, P = dims(LORA, ROPE, PAGE)
    if T % P:
        raise ValueError(f"context {T} is not a multiple of the page size {P}")
    rng = np.random.default_rng(seed)
    n_keys_B = rng.integers(max(T // 4, 1), T + 1, B)
    n_keys_B[0] = T
    if B > 1:
        n_keys_B[1] = 1
    pages_B = -(-n_keys_B // P)
    N = 1 + int(pages_B.sum())  # page 0: the trash page
    ids = rng.permutation(np.arange(1, N))
    table_BM = np.zeros((B, T // P), np.int32)
    for b, (start, n) in enumerate(zip(np.cumsum(pages_B) - pages_B, pages_B, strict=True)):
        table_BM[b, :n] = ids[start : start + n]
    bf16 = jnp.bfloat16
    ks = jax.random.split(jax.random.key(seed), 4)
    q_scale = 1.0 / np.sqrt(C + R)  # scores ~ N(0, 1): a softmax neither flat nor one-hot
    args = (
        (q_scale * jax.random.normal(ks[0], (B, H, C))).astype(bf16),
        (q_scale * jax.random.normal(ks[1], (B, H, R))).astype(bf16),
        jax.random.normal(ks[2], (N, P, C), bf16),
        jax.random.normal(ks[3], (N, P, R), bf16),
        jnp.asarray(table_BM),
        jnp.asarray(n_keys_B, jnp.int32),
    )
    page_bytes = P * (C + R) * jnp.dtype(bf16).itemsize
    return args, int(pages_B.sum()) * page_bytes, table_BM.size * page_bytes


@functools.cache
def _reference():
    import jax

    from pallas_kernels.mla_decode import mla_decode_reference

    return jax.jit(mla_decode_reference)


def _kernel():
    """``mla_decode`` as the engine calls it: compiled on a GPU, interpreted elsewhere."""
    from deepseek_jax import backends
    from pallas_kernels.mla_decode import mla_decode

    return functools.partial(mla_decode, interpret=backends.pallas_interpret(None))


def correctness() -> None:
    import jax
    import jax.numpy as jnp

    @section("correctness: MLA decode kernel vs mla_decode_reference")
    def _():
        kernel = _kernel()
        mode = "interpreted" if kernel.keywords["interpret"] else "compiled"
        log(f"  kernel {mode}; reference at 'highest' matmul precision; OK: rel < {REL_TOL}")
        for i, (B, T, H) in enumerate(_shapes()):
            label = _label(B, T, H)
            if elapsed() > deadline():
                log(f"  {label}: skipped (time budget)")
                continue
            try:
                args, _, _ = _inputs(B, T, H, seed=i)
                try:
                    out = kernel(*args)
                except Exception:
                    _BROKEN.add(label)
                    raise
                with jax.default_matmul_precision("highest"):
                    want = _reference()(*args)
                abs_err = float(jnp.max(jnp.abs(out - want)))
                e = err(out, want)
                log(
                    f"  {label} n_keys {_summary(args[-1])}: max abs err {abs_err:.2e}, "
                    f"max rel err {e:.2e} {'OK' if e < REL_TOL else 'FAIL'}"
                )
            except Exception as ex:
                log(f"  {label}: ERROR {type(ex).__name__}: {str(ex)[:400]}")


def _summary(n_keys_B) -> str:
    n = [int(v) for v in n_keys_B]
    return f"[{n[0]}]" if len(n) == 1 else f"[{min(n)}..{max(n)}, mean {sum(n) // len(n)}]"


def timing(rows: list[Row]) -> None:
    """Both implementations per shape, within ``BUDGET_S`` (and the run's deadline)."""
    until = min(deadline(), elapsed() + BUDGET_S)

    @section(f"throughput: MLA decode, kernel vs jitted reference (budget {BUDGET_S:.0f} s)")
    def _():
        kernel = _kernel()
        for i, (B, T, H) in enumerate(_shapes()):
            label = _label(B, T, H)
            if elapsed() > until:
                log(f"  {label}: skipped (time budget)")
                continue
            args, nbytes, slots = _inputs(B, T, H, seed=i)
            log(f"  {label}: {nbytes / 1e6:.1f} MB of visible pages ({slots / 1e6:.1f} MB slots)")
            row = functools.partial(timed, rows, CASE, label, until=until)
            row("jnp reference (jit)", nbytes, "GB/s", _reference(), *args, base=True)
            if label in _BROKEN:  # a failed compile costs seconds; its error is logged above
                rows.append(Row(CASE, label, "pallas mla_decode", None, None, "GB/s", False))
                log(f"  {CASE} {label} pallas mla_decode: not timed (failed in correctness)")
            else:
                row("pallas mla_decode", nbytes, "GB/s", kernel, *args)
            del args  # the next shape's pool replaces this one
