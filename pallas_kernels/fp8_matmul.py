"""Block-scaled FP8 GEMM (DeepSeek-V3 recipe) and its m-grouped contiguous variant.

out[M, N] = sum_g (a[:, g] . b[:, g]) * sa[:, g] * sb[:, g]^T, g = 128-wide K slices:
a [M, K] and b [N, K] are E4M3 and both K-major ("NT", what Hopper's FP8 wgmma needs for
B), sa [M, G] / sb [N, G] FP32 scales per row per K slice. Each slice is accumulated on
its own in FP32 and promoted into an FP32 accumulator with both scales (V3TR 3.3.2); a
weight's 128x128 block scale is passed repeated over its 128 rows (``fp8_quant.block_rows``).
The grouped variant takes rows sorted by expert, each expert's rows padded to a multiple
of 128, and one expert id per 128-row block (DeepGEMM's m-grouped contiguous layout).

Two implementations of one contract, plus the plain-jnp twin:
- ``pl.pallas_call`` kernels (``fp8_matmul_kernel``): grid (batch, M, N, K) blocks, run in
  interpret mode (CPU tests; the ``pallas`` backend off-GPU). The grouped kernel reads the
  block experts through scalar prefetch in its index maps.
- Mosaic GPU (``plgpu.kernel``, ``_mosaic_kernel``) for Hopper: a 128 x block_n CTA tile,
  two compute warpgroups of 64 rows each and a TMA producer warpgroup
  (``emit_pipeline_warp_specialized``, ``stages`` deep). Each step issues one wgmma over a
  128-wide K slice into a fresh accumulator, then scales and adds it into registers:
  promotion per 128 K. While one warpgroup promotes, the other's wgmma runs.
- ``fp8_matmul_reference`` / ``fp8_grouped_matmul_reference``.
Shapes need not be multiples of the blocks: the wrappers zero-pad and slice.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import tpu as pltpu

import deepseek_jax.backends as backends
from deepseek_jax.fp8_quant import TILE as SLICE  # promotion interval N_C, grouped row alignment
from deepseek_jax.fp8_quant import pad_to_multiple

# Max |out - reference| / max |reference| of the compiled Mosaic kernel (FP32 output): the
# tolerance of its GPU test and of ``experiments.gpu_check``. Hopper's FP8 wgmma keeps ~14
# bits while it sums one 128-wide K slice (V3TR 3.3.2; promotion to FP32 happens between
# slices), so a correct kernel measures 1.9e-4 to 2.8e-4 on an H200
# (results/gpu_check_h200.log; XLA's own FP8 dot: 2.8e-4); a wrong scale, tile or group is
# off by 1e-2 or more. The interpret kernel sums exactly as the reference does (1e-5).
MOSAIC_REL_TOL = 1e-3
_WG_ROWS = 64  # rows per compute warpgroup (one wgmma M)
_SMEM_BYTES = 220 * 1024  # of Hopper's 227 KiB per block, leaving room for barriers


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes. block_m is fixed at 128 (two 64-row warpgroups / one grouped block).

    block_k: K per grid step of the interpret kernel (a multiple of 128).
    stages: TMA pipeline depth of the Mosaic kernel (lowered to fit shared memory).
    """

    block_m: int = 128
    block_n: int = 128
    block_k: int = 128
    stages: int = 4

    def __post_init__(self):
        if self.block_m != 128:
            raise ValueError(f"block_m must be 128, got {self.block_m}")
        if self.block_k % SLICE or self.block_n % 64:
            raise ValueError(f"block_k must divide by 128 and block_n by 64: {self}")


# ------------------------------------------------------------------------ references


def fp8_matmul_reference(a8, sa, b8, sb, *, out_dtype=jnp.float32):
    """The plain-jnp twin: [(Bt,) M, K] x [(Bt,) N, K] -> [(Bt,) M, N], promotion per slice."""
    G = sa.shape[-1]
    a = pad_to_multiple(a8.astype(jnp.float32), -1, SLICE)
    b = pad_to_multiple(b8.astype(jnp.float32), -1, SLICE)
    a = a.reshape(*a.shape[:-1], G, SLICE)
    b = b.reshape(*b.shape[:-1], G, SLICE)
    part = jnp.einsum("...mgk,...ngk->...gmn", a, b, precision=lax.Precision.HIGHEST)
    sa_t, sb_t = jnp.swapaxes(sa, -1, -2), jnp.swapaxes(sb, -1, -2)
    out = jnp.sum(part * sa_t[..., :, :, None] * sb_t[..., :, None, :], axis=-3)
    return out.astype(out_dtype)


def fp8_grouped_matmul_reference(a8, sa, b8, sb, group_ids, *, out_dtype=jnp.float32):
    """Grouped twin: row block i of a [128 B, K] times expert group_ids[i] of b [E, N, K]."""
    B = group_ids.shape[0]
    a = a8.reshape(B, SLICE, -1)
    s = sa.reshape(B, SLICE, -1)
    out = fp8_matmul_reference(a, s, b8[group_ids], sb[group_ids], out_dtype=out_dtype)
    return out.reshape(B * SLICE, -1)


# ------------------------------------------------------------------------ interpret kernels


def fp8_matmul_kernel(a_ref, b_ref, sa_ref, sb_ref, o_ref, *, k_axis: int):
    """One grid step: o += sum over this step's 128-K slices of (a . b^T) sa sb^T.

    a_ref [BM, BK] e4m3, b_ref [BN, BK] e4m3 (K-major), sa_ref [BM, BK/128] f32,
    sb_ref [BN, BK/128] f32, o_ref [BM, BN] f32, resident over grid axis ``k_axis``.
    """

    @pl.when(pl.program_id(k_axis) == 0)
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

    acc = o_ref[...]
    for g in range(a_ref.shape[1] // SLICE):
        ks = slice(g * SLICE, (g + 1) * SLICE)
        part = lax.dot_general(
            a_ref[:, ks], b_ref[:, ks], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )  # [BM, BN], one slice
        acc = acc + part * sa_ref[:, g : g + 1] * sb_ref[:, g][None, :]  # promotion
    o_ref[...] = acc


def fp8_grouped_matmul_kernel(group_ids_ref, a_ref, b_ref, sa_ref, sb_ref, o_ref):
    """The dense step; the block's expert was chosen by the index maps (scalar prefetch)."""
    del group_ids_ref  # group_ids_ref [B] int32, read by the index maps
    fp8_matmul_kernel(a_ref, b_ref, sa_ref, sb_ref, o_ref, k_axis=2)


def _interpret_matmul(a8, sa, b8, sb, bs: BlockSizes):
    """[Bt, M, K] x [Bt, N, K] (block-aligned) -> f32 [Bt, M, N], pallas_call interpret."""
    Bt, M, K = a8.shape
    N = b8.shape[1]
    BM, BN, BK, sq = bs.block_m, bs.block_n, bs.block_k, pl.Squeezed()
    return pl.pallas_call(
        functools.partial(fp8_matmul_kernel, k_axis=3),
        grid=(Bt, M // BM, N // BN, K // BK),
        in_specs=[
            pl.BlockSpec((sq, BM, BK), lambda b, i, j, k: (b, i, k)),
            pl.BlockSpec((sq, BN, BK), lambda b, i, j, k: (b, j, k)),
            pl.BlockSpec((sq, BM, BK // SLICE), lambda b, i, j, k: (b, i, k)),
            pl.BlockSpec((sq, BN, BK // SLICE), lambda b, i, j, k: (b, j, k)),
        ],
        out_specs=pl.BlockSpec((sq, BM, BN), lambda b, i, j, k: (b, i, j)),
        out_shape=jax.ShapeDtypeStruct((Bt, M, N), jnp.float32),
        interpret=True,
    )(a8, b8, sa, sb)


def _interpret_grouped(a8, sa, b8, sb, group_ids, bs: BlockSizes):
    """[128 B, K] rows x [E, N, K] experts (block-aligned) -> f32 [128 B, N], interpret."""
    M, K = a8.shape
    N = b8.shape[1]
    BM, BN, BK, sq = bs.block_m, bs.block_n, bs.block_k, pl.Squeezed()
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(M // BM, N // BN, K // BK),
        in_specs=[
            pl.BlockSpec((BM, BK), lambda i, j, k, gid: (i, k)),
            pl.BlockSpec((sq, BN, BK), lambda i, j, k, gid: (gid[i], j, k)),
            pl.BlockSpec((BM, BK // SLICE), lambda i, j, k, gid: (i, k)),
            pl.BlockSpec((sq, BN, BK // SLICE), lambda i, j, k, gid: (gid[i], j, k)),
        ],
        out_specs=pl.BlockSpec((BM, BN), lambda i, j, k, gid: (i, j)),
    )
    return pl.pallas_call(
        fp8_grouped_matmul_kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((M, N), jnp.float32),
        interpret=True,
    )(group_ids, a8, b8, sa, sb)


# ------------------------------------------------------------------------ Mosaic GPU kernel


def _mosaic_kernel(*refs, block_n: int, stages: int, num_slices: int, grouped: bool):
    """One 128 x block_n output tile; grid ("b",) "m", "n"; warpgroups "wg" = 2 compute + TMA.

    refs: a [(Bt,) M, K] e4m3, b [Bt|E, N, K] e4m3 (K-major), saT [(Bt,) G, M] f32,
    sbT [Bt|E, G, N] f32, (group_ids [B] int32 if grouped), out [(Bt,) M, N].
    """
    if grouped:
        a_gmem, b_gmem, sa_gmem, sb_gmem, gid_gmem, o_gmem = refs
    else:
        a_gmem, b_gmem, sa_gmem, sb_gmem, o_gmem = refs
    BM, BN, WM = 128, block_n, _WG_ROWS
    i, j, wg = lax.axis_index("m"), lax.axis_index("n"), lax.axis_index("wg")
    if grouped:
        e = gid_gmem[i]
    else:
        e = lax.axis_index("b")
        a_gmem, sa_gmem, o_gmem = a_gmem.at[e], sa_gmem.at[e], o_gmem.at[e]
    rows = pl.ds(wg * WM, WM)  # this warpgroup's rows of the CTA tile

    def step(_, a_smem, b_smem, sa_smem, sb_smem, acc):
        # a_smem [128, 128] e4m3, b_smem [BN, 128] e4m3, sa_smem [1, 128], sb_smem [1, BN]
        def mma(acc_ref):
            plgpu.wgmma(acc_ref, a_smem.at[rows], b_smem.T)  # fp8 needs K-major B
            return acc_ref[...]

        part = pl.run_scoped(mma, plgpu.ACC((WM, BN), jnp.float32))  # one 128-K slice
        sa = lax.broadcast_in_dim(sa_smem[0, rows], (WM, BN), [0])
        sb = lax.broadcast_in_dim(sb_smem[0, :], (WM, BN), [1])
        return acc + part * sa * sb  # promotion into the FP32 register accumulator

    fp8_tiles = (plgpu.TilingTransform((8, SLICE)), plgpu.SwizzleTransform(SLICE))

    def pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(num_slices,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec((BM, SLICE), lambda k: (0, k), transforms=fp8_tiles),
                plgpu.BlockSpec((BN, SLICE), lambda k: (0, k), transforms=fp8_tiles),
                plgpu.BlockSpec((1, BM), lambda k: (k, 0)),
                plgpu.BlockSpec((1, BN), lambda k: (k, 0)),
            ],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=stages,
            compute_context=context,
        )

    operands = (
        a_gmem.at[pl.ds(i * BM, BM)],
        b_gmem.at[e, pl.ds(j * BN, BN)],
        sa_gmem.at[:, pl.ds(i * BM, BM)],
        sb_gmem.at[e, :, pl.ds(j * BN, BN)],
    )
    ignore = lambda *_, **__: None  # noqa: E731
    allocations = pipeline(ignore, ignore).get_allocations(*operands)

    def scope(allocations, o_smem):
        def context(run):
            acc = run(jnp.zeros((WM, BN), jnp.float32))
            o_smem[wg] = acc.astype(o_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(
                o_smem.at[wg], o_gmem.at[pl.ds(i * BM + wg * WM, WM), pl.ds(j * BN, BN)]
            )
            plgpu.wait_smem_to_gmem(0)

        pipeline(step, context)(*operands, allocations=allocations)

    pl.run_scoped(scope, allocations, plgpu.SMEM((2, WM, BN), o_gmem.dtype), collective_axes="wg")


def _stages(bs: BlockSizes, out_dtype, num_slices: int) -> int:
    """Pipeline depth that fits shared memory next to the epilogue tile."""
    per_stage = (bs.block_m + bs.block_n) * SLICE + 4 * (bs.block_m + bs.block_n)
    epilogue = 2 * _WG_ROWS * bs.block_n * jnp.dtype(out_dtype).itemsize
    fit = (_SMEM_BYTES - epilogue) // per_stage
    if fit < 1:
        raise ValueError(f"block_n={bs.block_n} leaves no shared memory for the pipeline")
    return max(1, min(bs.stages, fit, num_slices))


def _mosaic(a8, sa, b8, sb, group_ids, out_dtype, bs: BlockSizes, interpret: bool):
    """Block-aligned operands -> [(Bt,) M, N] through ``_mosaic_kernel``."""
    grouped = group_ids is not None
    M, K = a8.shape[-2:]
    N, G = b8.shape[-2], K // SLICE
    grid, names = (M // bs.block_m, N // bs.block_n), ("m", "n")
    if not grouped:
        grid, names = (a8.shape[0], *grid), ("b", *names)
    body = functools.partial(
        _mosaic_kernel,
        block_n=bs.block_n,
        num_slices=G,
        stages=_stages(bs, out_dtype, G),
        grouped=grouped,
    )
    kw = {"interpret": plgpu.InterpretGPUParams()} if interpret else {}
    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((*a8.shape[:-1], N), out_dtype),
        grid=grid,
        grid_names=names,
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        **kw,
    )
    args = (a8, b8, jnp.swapaxes(sa, -1, -2), jnp.swapaxes(sb, -1, -2))
    return kernel(*args, group_ids) if grouped else kernel(*args)


# ------------------------------------------------------------------------ wrappers


def _choose(impl, interpret):
    """Defaults (``backends``): Mosaic GPU compiled on a GPU; pallas_call in interpret mode
    elsewhere."""
    impl = impl or ("mosaic" if backends.on_gpu() else "pallas_call")
    if impl not in ("mosaic", "pallas_call"):
        raise ValueError(f"impl must be 'mosaic' or 'pallas_call', got {impl!r}")
    if interpret is None:
        interpret = backends.pallas_interpret(None) or impl != "mosaic"
    if impl == "pallas_call" and not interpret:
        raise ValueError(
            "the pallas_call kernel runs in interpret mode only; "
            "use impl='mosaic' for compiled Hopper code"
        )
    return impl, interpret


def _padded_operands(a8, sa, b8, sb, bs: BlockSizes, k_multiple: int):
    """Zero-pads M to block_m, N to block_n, K to ``k_multiple`` (scales alongside)."""
    pad = pad_to_multiple
    kg = k_multiple // SLICE  # scales: one per 128-K slice
    a8 = pad(pad(a8, -1, k_multiple), -2, bs.block_m)
    b8 = pad(pad(b8, -1, k_multiple), -2, bs.block_n)
    sa = pad(pad(sa, -1, kg), -2, bs.block_m)
    sb = pad(pad(sb, -1, kg), -2, bs.block_n)
    return a8, sa, b8, sb


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_sizes", "impl", "interpret"))
def fp8_matmul(
    a8, sa, b8, sb, *, out_dtype=jnp.float32, block_sizes=BlockSizes(), impl=None, interpret=None
):
    """Block-scaled NT GEMM, batched: [Bt, M, K] x [Bt, N, K] -> [Bt, M, N].

    Args:
      a8, b8: E4M3, K-major; sa [Bt, M, G], sb [Bt, N, G]: FP32, G = ceil(K / 128).
      impl: "mosaic" (Hopper wgmma) or "pallas_call"; default by platform.
      interpret: run in an interpreter (pallas_call: always; mosaic: Mosaic GPU's
        CPU interpreter). Default: compiled on a GPU, interpreted elsewhere.
    Returns:
      out_dtype [Bt, M, N], accumulated in FP32 with promotion every 128 K.
    """
    impl, interpret = _choose(impl, interpret)
    M, N = a8.shape[1], b8.shape[1]
    k_multiple = SLICE if impl == "mosaic" else block_sizes.block_k
    a8, sa, b8, sb = _padded_operands(a8, sa, b8, sb, block_sizes, k_multiple)
    if impl == "mosaic":
        out = _mosaic(a8, sa, b8, sb, None, out_dtype, block_sizes, interpret)
    else:
        out = _interpret_matmul(a8, sa, b8, sb, block_sizes)
    return out[:, :M, :N].astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_sizes", "impl", "interpret"))
def fp8_grouped_matmul(
    a8,
    sa,
    b8,
    sb,
    group_ids,
    *,
    out_dtype=jnp.float32,
    block_sizes=BlockSizes(),
    impl=None,
    interpret=None,
):
    """m-grouped contiguous NT GEMM: rows [128 B, K], experts [E, N, K] -> [128 B, N].

    Args:
      a8 [128 B, K], sa [128 B, G]: rows sorted by expert, groups padded to 128 rows.
      b8 [E, N, K], sb [E, N, G]: per-expert K-major weights and per-row scales.
      group_ids [B] int32: the expert of each 128-row block.
      impl, interpret: as ``fp8_matmul``.
    """
    impl, interpret = _choose(impl, interpret)
    M, N = a8.shape[0], b8.shape[1]
    if M % SLICE or group_ids.shape != (M // SLICE,):
        raise ValueError(f"rows ({M}) must be 128 x len(group_ids) ({group_ids.shape})")
    k_multiple = SLICE if impl == "mosaic" else block_sizes.block_k
    a8, sa, b8, sb = _padded_operands(a8, sa, b8, sb, block_sizes, k_multiple)
    group_ids = group_ids.astype(jnp.int32)
    if impl == "mosaic":
        out = _mosaic(a8, sa, b8, sb, group_ids, out_dtype, block_sizes, interpret)
    else:
        out = _interpret_grouped(a8, sa, b8, sb, group_ids, block_sizes)
    return out[:, :N].astype(out_dtype)
