// Register-tiled float32 GEMM blocks and a deadlock-free parallel loop over XLA's
// intra-op thread pool, shared by the FFI kernels of this folder.
//
// Tile<M>: an M x kCols output tile held in M x kVecs vector registers, A strided (any
// row and column stride), B read in place row by row (contiguous columns) with software
// prefetch. The tile shape follows the instruction set the library is compiled for
// (build.py builds one library per variant), so the accumulators, one B row and the
// broadcast A value always fit the register file:
//
//   target                  vector   tile (rows x cols)   accumulators / registers
//   AVX-512                 16 f32   14 x 32              28 / 32 zmm
//   AVX2 (+FMA) or AVX      8 f32    6 x 16               12 / 16 ymm
//   NEON (aarch64)          4 f32    6 x 16               24 / 32 q
//   portable (SSE2, other)  4 f32    4 x 8                8 / 16 xmm
//
// (A tile of 14 x 32 compiled for AVX2 needs 56 ymm registers for 16 and spills on every
// product: 10-30x slower than XLA there.) Software prefetches may point past an operand's
// end near its last rows; prefetches never fault (they are hints, on x86 and Arm alike).
//
// ParallelFor hands items out through an atomic counter to the calling thread and the
// pool's. The caller never waits on a helper task that has not started (two kernels may
// run at once on a two-thread pool): it waits only for items, and a helper that starts
// late finds none.

#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace dsj {

namespace ffi = xla::ffi;

#if defined(DSJ_PORTABLE)  // build.py's "portable" variant: no ISA-specific tile
constexpr int kLanes = 4, kVecs = 2, kRows = 4;
#define DSJ_ISA "portable"
#elif defined(__AVX512F__)
constexpr int kLanes = 16, kVecs = 2, kRows = 14;
#define DSJ_ISA "avx512"
#elif defined(__AVX__)
constexpr int kLanes = 8, kVecs = 2, kRows = 6;
#if defined(__FMA__)
#define DSJ_ISA "avx2"
#else
#define DSJ_ISA "avx"
#endif
#elif defined(__ARM_NEON) || defined(__aarch64__)
constexpr int kLanes = 4, kVecs = 4, kRows = 6;
#define DSJ_ISA "neon"
#else
constexpr int kLanes = 4, kVecs = 2, kRows = 4;
#define DSJ_ISA "portable"
#endif

constexpr int kCols = kLanes * kVecs;  // output columns per tile
constexpr int kPrefetch = 40;          // rows of B ahead (measured best between 32 and 48)

// One register of the target (the tile's unit).
typedef float vec __attribute__((vector_size(4 * kLanes)));
// 16 floats for element-wise loops (exp, max): one AVX-512 register, or several narrower
// ones; width does not matter there, register pressure does not arise.
typedef float v16 __attribute__((vector_size(64)));

template <typename V>
inline V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline v16 load(const float* p) { return load<v16>(p); }
template <typename V>
inline void store(float* p, V v) { std::memcpy(p, &v, sizeof v); }

// x in every lane: one broadcast. (``vec{} + x`` adds +0.0, a scalar add per product that
// the compiler must keep because it turns -0.0 into +0.0; ``x - 0.0`` is x for every x,
// so it folds away.)
inline vec splat(float x) { return x - vec{}; }

// c[i, 0:kCols] (+)= sum_p a(i, p) b(p, 0:kCols) for i < M, where a(i, p) = a[i ars + p acs]
// and b(p, :) = b + p brs (contiguous); ``add`` adds to c instead of overwriting it.
// Accumulates in float32 in p order.
template <int M>
inline void Tile(const float* a, int64_t ars, int64_t acs, const float* b, int64_t brs, int64_t P,
          float* c, int64_t crs, bool add) {
  vec acc[M][kVecs];
  for (int i = 0; i < M; ++i)
    for (int v = 0; v < kVecs; ++v)
      acc[i][v] = add ? load<vec>(c + i * crs + v * kLanes) : vec{};
  for (int64_t p = 0; p < P; ++p) {
    const float* bp = b + p * brs;
    // kPrefetch rows ahead; past the last row, the next column panel's first rows
    const float* pf = p + kPrefetch < P ? bp + kPrefetch * brs : b + (p + kPrefetch - P) * brs + kCols;
    for (int l = 0; l < kCols; l += 16) __builtin_prefetch(pf + l);  // each 64-byte line
    __builtin_prefetch(a + (p + kPrefetch) * acs);
    vec bv[kVecs];
    for (int v = 0; v < kVecs; ++v) bv[v] = load<vec>(bp + v * kLanes);
    const float* ap = a + p * acs;
#pragma GCC unroll 16
    for (int i = 0; i < M; ++i) {
      const vec ai = splat(ap[i * ars]);
      for (int v = 0; v < kVecs; ++v) acc[i][v] += ai * bv[v];
    }
  }
  for (int i = 0; i < M; ++i)
    for (int v = 0; v < kVecs; ++v) store(c + i * crs + v * kLanes, acc[i][v]);
}

// The same product for the last N % kCols columns, one scalar at a time (rare shapes).
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

template <int... I>
constexpr std::array<TileFn, sizeof...(I) + 1> TileTable(std::integer_sequence<int, I...>) {
  return {nullptr, Tile<I + 1>...};
}
// kTiles[m] computes an m-row tile, 1 <= m <= kRows.
constexpr auto kTiles = TileTable(std::make_integer_sequence<int, kRows>{});

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

// c[0:M, 0:N] (+)= a b over P, a strided as in Tile, b and c row-major with row strides
// brs and crs: any M and N, in kRows x kCols tiles.
inline void Gemm(const float* a, int64_t ars, int64_t acs, const float* b, int64_t brs,
                 int64_t P, float* c, int64_t crs, bool add, int64_t M, int64_t N) {
  for (int64_t col0 = 0; col0 < N; col0 += kCols)
    for (int64_t r = 0; r < M; r += kRows)
      Block(a + r * ars, ars, acs, b, brs, P, c + r * crs, crs, add,
            std::min<int64_t>(kRows, M - r), col0, std::min<int64_t>(kCols, N - col0));
}

}  // namespace dsj

// The instruction set the tiles were compiled for ("avx512", "avx2", "neon", "portable")
// and the tile shape, for logs and tests: e.g. "avx2 6x16".
extern "C" const char* DsjTileConfig() {
  static const std::string s =
      std::string(DSJ_ISA) + " " + std::to_string(dsj::kRows) + "x" + std::to_string(dsj::kCols);
  return s.c_str();
}
