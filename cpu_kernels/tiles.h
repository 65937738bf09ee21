// Register-tiled float32 GEMM blocks and a deadlock-free parallel loop over XLA's
// intra-op thread pool, shared by the FFI kernels of this folder.
//
// Tile<M>: an M x 32 output tile (M <= 14) in 2M vector registers, A strided (any row and
// column stride), B read in place row by row (contiguous columns) with software prefetch.
// Software prefetches may point past an operand's end near its last rows; prefetches
// never fault (they are hints, on x86 and Arm alike).
//
// ParallelFor hands items out through an atomic counter to the calling thread and the
// pool's. The caller never waits on a helper task that has not started (two kernels may
// run at once on a two-thread pool): it waits only for items, and a helper that starts
// late finds none.

#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace dsj {

namespace ffi = xla::ffi;

typedef float v16 __attribute__((vector_size(64)));  // AVX-512 register, or two AVX2

inline v16 load(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }

constexpr int kCols = 32;       // output columns per tile: two vectors
constexpr int kRows = 14;       // output rows per tile: 28 accumulators
constexpr int kPrefetch = 40;   // rows of B ahead (measured best between 32 and 48)

// c[i, 0:32] (+)= sum_p a(i, p) b(p, 0:32) for i < M, where a(i, p) = a[i ars + p acs] and
// b(p, :) = b + p brs (contiguous); ``add`` adds to c instead of overwriting it.
// Accumulates in float32 in p order.
template <int M>
inline void Tile(const float* a, int64_t ars, int64_t acs, const float* b, int64_t brs, int64_t P,
          float* c, int64_t crs, bool add) {
  v16 lo[M], hi[M];
  for (int i = 0; i < M; ++i) {
    lo[i] = add ? load(c + i * crs) : v16{};
    hi[i] = add ? load(c + i * crs + 16) : v16{};
  }
  for (int64_t p = 0; p < P; ++p) {
    const float* bp = b + p * brs;
    // kPrefetch rows ahead; past the last row, the next column panel's first rows
    const float* pf = p + kPrefetch < P ? bp + kPrefetch * brs : b + (p + kPrefetch - P) * brs + kCols;
    __builtin_prefetch(pf);
    __builtin_prefetch(pf + 16);
    __builtin_prefetch(a + (p + kPrefetch) * acs);
    const v16 b0 = load(bp), b1 = load(bp + 16);
    const float* ap = a + p * acs;
#pragma GCC unroll 14
    for (int i = 0; i < M; ++i) {
      const v16 ai = v16{} + ap[i * ars];
      lo[i] += ai * b0;
      hi[i] += ai * b1;
    }
  }
  for (int i = 0; i < M; ++i) {
    store(c + i * crs, lo[i]);
    store(c + i * crs + 16, hi[i]);
  }
}

// The same product for the last N % 32 columns, one scalar at a time (rare shapes).
inline void TailColumns(const float* a, int64_t ars, int64_t acs, const float* b, int64_t brs,
                 int64_t P, float* c, int64_t crs, bool add, int64_t M, int64_t cols) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      float s = add ? c[i * crs + j] : 0.0f;
      for (int64_t p = 0; p < P; ++p) s += a[i * ars + p * acs] * b[p * brs + j];
      c[i * crs + j] = s;
    }
}

using TileFn = void (*)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, float*,
                        int64_t, bool);
constexpr TileFn kTiles[kRows + 1] = {
    nullptr,  Tile<1>,  Tile<2>,  Tile<3>,  Tile<4>,  Tile<5>,  Tile<6>, Tile<7>,
    Tile<8>,  Tile<9>,  Tile<10>, Tile<11>, Tile<12>, Tile<13>, Tile<14>};

// c[0:M, col0:col0 + cols] (+)= a b over P for any M <= kRows and cols <= kCols (a, b, c
// strided as in Tile).
inline void Block(const float* a, int64_t ars, int64_t acs, const float* b, int64_t brs, int64_t P,
           float* c, int64_t crs, bool add, int64_t M, int64_t col0, int64_t cols) {
  if (cols == kCols)
    kTiles[M](a, ars, acs, b + col0, brs, P, c + col0, crs, add);
  else
    TailColumns(a, ars, acs, b + col0, brs, P, c + col0, crs, add, M, cols);
}

struct Work {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// Workers ParallelFor uses for n items: this thread (worker 0) and up to num_threads - 1
// of the pool's. It runs f(item, worker) for every item in [0, n).
inline int64_t Workers(ffi::ThreadPool& pool, int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), n));
}

inline void ParallelFor(ffi::ThreadPool& pool, int64_t n,
                 const std::function<void(int64_t, int64_t)>& f) {
  auto work = std::make_shared<Work>();
  const int64_t workers = Workers(pool, n);
  for (int64_t t = 1; t < workers; ++t) {
    pool.Schedule([work, n, t, &f] {
      for (int64_t i; (i = work->next.fetch_add(1)) < n;) {
        f(i, t);  // only reached while the caller still waits, so f is alive
        work->done.fetch_add(1, std::memory_order_release);
      }
    });
  }
  for (int64_t i; (i = work->next.fetch_add(1)) < n;) {
    f(i, 0);
    work->done.fetch_add(1, std::memory_order_release);
  }
  while (work->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// Row offsets of the groups, clipped to the A rows there are.

// c[0:M, 0:N] (+)= a b over P, a strided as in Tile, b and c row-major with row strides
// brs and crs: any M and N, in 14 x 32 tiles.
inline void Gemm(const float* a, int64_t ars, int64_t acs, const float* b, int64_t brs,
                 int64_t P, float* c, int64_t crs, bool add, int64_t M, int64_t N) {
  for (int64_t col0 = 0; col0 < N; col0 += kCols)
    for (int64_t r = 0; r < M; r += kRows)
      Block(a + r * ars, ars, acs, b, brs, P, c + r * crs, crs, add,
            std::min<int64_t>(kRows, M - r), col0, std::min<int64_t>(kCols, N - col0));
}

}  // namespace dsj
