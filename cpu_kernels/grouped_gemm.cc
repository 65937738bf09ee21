// Grouped GEMMs for XLA:CPU, called through the XLA FFI (see grouped_gemm.py).
//
// Rows are sorted by group (expert); group g owns rows [start_g, start_g + size_g).
//   DsjGmm:  y[A, N]     = x[rows of g, K] @ w[g][K, N]      (forward, and dx with w^T)
//   DsjTgmm: dw[G, K, N] = x[rows of g, K]^T @ dy[rows of g, N]  (weight gradient)
// Rows past the last group are left zero, as jax.lax.ragged_dot does.
//
// Why: XLA:CPU has no fast grouped GEMM. Its batched dot over dense capacity slots pays
// for padding and reads each expert's weights into packed panels, which small groups
// (64 rows per expert at E = 256) cannot amortise. Here each output tile lives in vector
// registers (tiles.h: 14 x 32 on AVX-512, 6 x 16 on AVX2, ...); the weight panel is read
// in place with software prefetch, so each expert's weights stream from memory once per
// ~112-row chunk and the rows of a group are never padded.
//
// Work items (gmm: a chunk of one group's rows; tgmm: one group's column block) run through
// tiles.h's ParallelFor over XLA's intra-op pool.

#include <vector>

#include "tiles.h"

namespace ffi = xla::ffi;

namespace {

using dsj::Block;
using dsj::Gemm;
using dsj::kCols;
using dsj::kRows;
using dsj::ParallelFor;
using dsj::Workers;

// Whole row tiles of about 112 rows per gmm work item (the x chunk stays in L2 while the
// weights stream past) and about 224 rows per tgmm pass (packed x and dy rows in L2).
constexpr int64_t kChunk = (112 + kRows - 1) / kRows * kRows;
constexpr int64_t kChunkT = (224 + kRows - 1) / kRows * kRows;

std::vector<int64_t> Starts(const int32_t* sizes, int64_t G, int64_t A) {
  std::vector<int64_t> start(G + 1, 0);
  for (int64_t g = 0; g < G; ++g)
    start[g + 1] = std::min(A, start[g] + std::max<int64_t>(sizes[g], 0));
  return start;
}

int64_t ColumnBlocks(int64_t N) { return (N + kCols - 1) / kCols; }

ffi::Error Gmm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
               ffi::Buffer<ffi::S32> sizes, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || sizes.dimensions().size() != 1 ||
      sizes.dimensions()[0] != wd[0] || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("dsj_gmm: expected x[A, K], w[G, K, N], sizes[G]");
  const int64_t A = xd[0], K = xd[1], G = wd[0], N = wd[2];
  const std::vector<int64_t> start = Starts(sizes.typed_data(), G, A);
  const float *xp = x.typed_data(), *wp = w.typed_data();
  float* yp = y->typed_data();
  std::memset(yp + start[G] * N, 0, (A - start[G]) * N * sizeof(float));
  // Items: chunks of kChunk rows of one group, each swept over all column blocks, so
  // its rows stay in L2 while the group's weight panels stream past.
  std::vector<int64_t> first(G + 1, 0);  // first item of each group
  for (int64_t g = 0; g < G; ++g)
    first[g + 1] = first[g] + (start[g + 1] - start[g] + kChunk - 1) / kChunk;
  ParallelFor(pool, first[G], [&](int64_t item, int64_t) {
    const int64_t g = std::upper_bound(first.begin(), first.end(), item) - first.begin() - 1;
    const int64_t r0 = start[g] + (item - first[g]) * kChunk;
    const int64_t r1 = std::min(start[g + 1], r0 + kChunk);
    Gemm(xp + r0 * K, K, 1, wp + g * K * N, N, K, yp + r0 * N, N, false, r1 - r0, N);
  });
  return ffi::Error::Success();
}

ffi::Error Tgmm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                ffi::Buffer<ffi::S32> sizes, ffi::ResultBuffer<ffi::F32> dw) {
  const auto xd = x.dimensions(), dd = dy.dimensions(), wd = dw->dimensions();
  if (xd.size() != 2 || dd.size() != 2 || wd.size() != 3 || xd[0] != dd[0] ||
      sizes.dimensions().size() != 1 || sizes.dimensions()[0] != wd[0] || wd[1] != xd[1] ||
      wd[2] != dd[1])
    return ffi::Error::InvalidArgument("dsj_tgmm: expected x[A, K], dy[A, N], sizes[G]");
  const int64_t A = xd[0], K = xd[1], N = dd[1], G = wd[0];
  const std::vector<int64_t> start = Starts(sizes.typed_data(), G, A);
  const float *xp = x.typed_data(), *dyp = dy.typed_data();
  float* dwp = dw->typed_data();
  // Items: a group's dw columns, all of them (or a share when there are fewer groups than
  // twice the workers). Each pass over kChunkT rows first packs x's rows as K/kRows panels
  // [rows][kRows] (contiguous, in L2), then sweeps every (K row tile, column block) of the
  // item with the pass's dy rows: x is read from memory once per item, dy once per pass.
  const int64_t nk = (K + kRows - 1) / kRows, nc = ColumnBlocks(N);
  const int64_t splits =
      std::min(nc, (2 * std::max<int64_t>(pool.num_threads(), 1) + G - 1) / G);
  const int64_t workers = Workers(pool, G * splits);
  std::vector<std::vector<float>> packs(workers);
  ParallelFor(pool, G * splits, [&](int64_t item, int64_t worker) {
    const int64_t g = item / splits, j = item % splits;
    const int64_t c0 = j * nc / splits * kCols, c1 = std::min(N, (j + 1) * nc / splits * kCols);
    float* dwg = dwp + g * K * N;
    const int64_t r0 = start[g], r1 = start[g + 1];
    if (r1 == r0) {
      for (int64_t k = 0; k < K; ++k) std::memset(dwg + k * N + c0, 0, (c1 - c0) * sizeof(float));
      return;
    }
    std::vector<float>& pack = packs[worker];
    pack.resize(nk * kChunkT * kRows);
    for (int64_t p0 = r0; p0 < r1; p0 += kChunkT) {
      const int64_t rows = std::min(r1 - p0, kChunkT);
      for (int64_t p = 0; p < rows; ++p) {
        const float* xr = xp + (p0 + p) * K;
        for (int64_t t = 0; t < nk; ++t) {
          const int64_t k0 = t * kRows, m = std::min<int64_t>(kRows, K - k0);
          std::memcpy(pack.data() + (t * rows + p) * kRows, xr + k0, m * sizeof(float));
        }
      }
      for (int64_t t = 0; t < nk; ++t) {
        const int64_t k0 = t * kRows;
        // a(i, p) = x[p0 + p, k0 + i], packed at (t rows + p) kRows + i
        for (int64_t col0 = c0; col0 < c1; col0 += kCols)
          Block(pack.data() + t * rows * kRows, 1, kRows, dyp + p0 * N, N, rows, dwg + k0 * N, N,
                p0 > r0, std::min<int64_t>(kRows, K - k0), col0,
                std::min<int64_t>(kCols, N - col0));
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

// Both kernels take two float32 matrices and the int32 group sizes, and write one matrix.
static auto Signature() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DsjGmm, Gmm, Signature());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DsjTgmm, Tgmm, Signature());
