// Causal softmax attention for XLA:CPU, called through the XLA FFI (see attention.py).
//
//   DsjAttentionFwd: o[B, T, H, Dv] and lse[B, H, T] (each row's log-sum-exp) from
//                    q[B, T, H, Dk] (already scaled), k[B, T, H, Dk], v[B, T, H, Dv];
//                    query t sees keys 0..t.
//   DsjAttentionBwd: dq, dk, dv from q, k, v, o, lse and do.
//
// Why: XLA:CPU runs the attention core as batched small dots with the mask, the exp and
// the reductions as separate passes over [B, H, T, T] scores: ~40 ms forward and backward
// per bench-small block for 4 GFLOP of causal work. Here one (batch, head) pair is one
// work item. A block of 64 query rows' scores against every key it sees ([64, t] floats)
// stays in L2, so each row's softmax is exact in one go (no online rescaling at these
// lengths), masked keys are never computed past the diagonal block, and every product runs
// in tiles.h's register tiles on the token-major layout read in place (strided rows).
// The backward recomputes the probabilities from the saved log-sum-exp and owns its
// pair's dk and dv, so no two items ever write the same row.

#include <cmath>
#include <vector>

#include "tiles.h"

namespace ffi = xla::ffi;

namespace {

using dsj::Gemm;
using dsj::load;
using dsj::ParallelFor;
using dsj::store;
using dsj::v16;
using dsj::Workers;

typedef int32_t vi16 __attribute__((vector_size(64)));

constexpr int64_t kQ = 64;  // query rows per block

// e^x for 16 floats (Cephes' expf polynomial after a split by powers of two, ~1 ulp);
// arguments below -87.3 give ~1e-38 (callers zero the masked entries themselves).
inline v16 Exp(v16 x) {
  const v16 lo = v16{} - 87.3365447504f, hi = v16{} + 88.3762626647949f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  v16 n = x * 1.44269504088896341f + 12582912.0f;  // round(x / ln 2): 1.5 * 2^23 trick
  n = n - 12582912.0f;
  x = x - n * 0.693359375f - n * -2.12194440e-4f;
  v16 y = v16{} + 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * (x * x) + x + 1.0f;
  const vi16 bits = (__builtin_convertvector(n, vi16) + 127) << 23;  // 2^n
  v16 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

// row[j] = e^(row[j] - m) for j < n, zero for n <= j < len; returns the sum of the first n.
float ExpShifted(float* row, int64_t n, int64_t len, float m) {
  v16 acc{};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const v16 e = Exp(load(row + j) - m);
    store(row + j, e);
    acc += e;
  }
  float sum = 0.0f;
  for (int i = 0; i < 16; ++i) sum += acc[i];
  if (j < n) {  // the last partial vector, through a padded copy
    float pad[16] = {};
    std::memcpy(pad, row + j, (n - j) * sizeof(float));
    const v16 e = Exp(load(pad) - m);
    for (int64_t i = 0; i < n - j; ++i) {
      row[j + i] = e[i];
      sum += e[i];
    }
    j = n;
  }
  std::memset(row + n, 0, (len - n) * sizeof(float));
  return sum;
}

float RowMax(const float* row, int64_t n) {
  v16 m = v16{} - INFINITY;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const v16 x = load(row + j);
    m = x > m ? x : m;
  }
  float r = -INFINITY;
  for (int i = 0; i < 16; ++i) r = std::max(r, m[i]);
  for (; j < n; ++j) r = std::max(r, row[j]);
  return r;
}

// Row stride for packed panels of n floats: a whole number of 64-byte lines, and an odd
// number of them, so the rows of a panel spread over every L1 set. (The token-major
// strides, H x 64 or H x 96 floats, put a panel's rows in 2 to 4 of the 64 sets, and the
// register tiles then miss L1 on most B rows.)
int64_t Ld(int64_t n) {
  const int64_t lines = (n + 15) / 16;
  return 16 * (lines % 2 ? lines : lines + 1);
}

// n rounded up to whole register tiles (tiles.h kCols): score blocks are computed that wide
// (the extra columns are masked keys, zeroed before use) so no block takes the scalar
// tail path of tiles.h.
int64_t Cols(int64_t n) { return (n + dsj::kCols - 1) / dsj::kCols * dsj::kCols; }

// xt[d * ld + s] = x[s * rs + d] for s < L, d < D: one head's [L, D] slice transposed, in
// 16 x 16 blocks so that reads and writes both stay in a few lines.
void PackTransposed(const float* x, int64_t rs, int64_t L, int64_t D, float* xt, int64_t ld) {
  for (int64_t s0 = 0; s0 < L; s0 += 16)
    for (int64_t d0 = 0; d0 < D; d0 += 16)
      for (int64_t s = s0; s < std::min(s0 + 16, L); ++s)
        for (int64_t d = d0; d < std::min(d0 + 16, D); ++d) xt[d * ld + s] = x[s * rs + d];
}

// out[s * ld + d] = x[s * rs + d] for s < L, d < D: rows copied to the padded stride.
void PackRows(const float* x, int64_t rs, int64_t L, int64_t D, float* out, int64_t ld) {
  for (int64_t s = 0; s < L; ++s) std::memcpy(out + s * ld, x + s * rs, D * sizeof(float));
}

struct Shape {
  int64_t B, T, H, Dk, Dv;
};

using Dims = ffi::Span<const int64_t>;

bool Same(Dims a, Dims b) { return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin()); }

// q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; returns false on any other shape.
bool ReadShape(Dims q, Dims k, Dims v, Shape& s) {
  if (q.size() != 4 || k.size() != 4 || v.size() != 4) return false;
  s = {q[0], q[1], q[2], q[3], v[3]};
  for (int i = 0; i < 4; ++i)
    if (k[i] != q[i] || (i < 3 && v[i] != q[i])) return false;
  return true;
}

// Per-worker scratch: one pair's keys and values (transposed and row-major), a block's
// queries and output gradients, two [kQ, T] score blocks, and the pair's dk and dv
// accumulators, all at padded strides.
struct Scratch {
  std::vector<float> kt, vt, k, v, q, dout, s, ds, dk, dv;
};

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> o,
                   ffi::ResultBuffer<ffi::F32> lse) {
  Shape d;
  if (!ReadShape(q.dimensions(), k.dimensions(), v.dimensions(), d))
    return ffi::Error::InvalidArgument(
        "dsj_attention_fwd: expected q[B, T, H, Dk], k[B, T, H, Dk], v[B, T, H, Dv]");
  const auto [B, T, H, Dk, Dv] = d;
  const int64_t qs = H * Dk, vs = H * Dv;  // row strides of the token-major layout
  std::vector<Scratch> scratch(Workers(pool, B * H));
  ParallelFor(pool, B * H, [&](int64_t item, int64_t worker) {
    const int64_t b = item / H, h = item % H;
    const float* qb = q.typed_data() + (b * T * H + h) * Dk;
    const float* kb = k.typed_data() + (b * T * H + h) * Dk;
    const float* vb = v.typed_data() + (b * T * H + h) * Dv;
    float* ob = o->typed_data() + (b * T * H + h) * Dv;
    float* lseb = lse->typed_data() + (b * H + h) * T;
    Scratch& w = scratch[worker];
    const int64_t lt = Ld(Cols(T)), lv = Ld(Dv);
    w.kt.resize(Dk * lt);
    w.v.resize(T * lv);
    w.s.resize(kQ * lt);
    PackTransposed(kb, qs, T, Dk, w.kt.data(), lt);
    PackRows(vb, vs, T, Dv, w.v.data(), lv);
    for (int64_t i0 = 0; i0 < T; i0 += kQ) {
      const int64_t rows = std::min(kQ, T - i0), L = i0 + rows;  // keys [0, L) are visible
      float* s = w.s.data();
      Gemm(qb + i0 * qs, qs, 1, w.kt.data(), lt, Dk, s, lt, false, rows, Cols(L));
      float inv[kQ];
      for (int64_t i = 0; i < rows; ++i) {
        float* row = s + i * lt;
        const int64_t n = i0 + i + 1;
        const float m = RowMax(row, n);
        const float sum = ExpShifted(row, n, L, m);
        inv[i] = 1.0f / sum;
        lseb[i0 + i] = m + std::log(sum);
      }
      float* oblk = ob + i0 * vs;
      Gemm(s, lt, 1, w.v.data(), lv, L, oblk, vs, false, rows, Dv);  // unnormalised
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t c = 0; c < Dv; ++c) oblk[i * vs + c] *= inv[i];
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse,
                    ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                    ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  Shape d;
  if (!ReadShape(q.dimensions(), k.dimensions(), v.dimensions(), d) ||
      !Same(o.dimensions(), v.dimensions()) || !Same(dout.dimensions(), v.dimensions()) ||
      lse.dimensions().size() != 3 || lse.dimensions()[0] != d.B ||
      lse.dimensions()[1] != d.H || lse.dimensions()[2] != d.T)
    return ffi::Error::InvalidArgument(
        "dsj_attention_bwd: expected q, k [B, T, H, Dk], v, o, do [B, T, H, Dv], lse[B, H, T]");
  const auto [B, T, H, Dk, Dv] = d;
  const int64_t qs = H * Dk, vs = H * Dv;
  std::vector<Scratch> scratch(Workers(pool, B * H));
  ParallelFor(pool, B * H, [&](int64_t item, int64_t worker) {
    const int64_t b = item / H, h = item % H;
    const int64_t qo = (b * T * H + h) * Dk, vo = (b * T * H + h) * Dv;
    const float *qb = q.typed_data() + qo, *kb = k.typed_data() + qo;
    const float *vb = v.typed_data() + vo, *ob = o.typed_data() + vo;
    const float* dob = dout.typed_data() + vo;
    const float* lseb = lse.typed_data() + (b * H + h) * T;
    float *dqb = dq->typed_data() + qo, *dkb = dk->typed_data() + qo;
    float* dvb = dv->typed_data() + vo;
    Scratch& w = scratch[worker];
    const int64_t lt = Ld(Cols(T)), lk = Ld(Dk), lv = Ld(Dv);
    w.kt.resize(Dk * lt);
    w.vt.resize(Dv * lt);
    w.k.resize(T * lk);
    w.q.resize(kQ * lk);
    w.dout.resize(kQ * lv);
    w.s.resize(kQ * lt);
    w.ds.resize(kQ * lt);
    PackTransposed(kb, qs, T, Dk, w.kt.data(), lt);
    PackTransposed(vb, vs, T, Dv, w.vt.data(), lt);
    PackRows(kb, qs, T, Dk, w.k.data(), lk);
    w.dk.assign(T * lk, 0.0f);
    w.dv.assign(T * lv, 0.0f);
    for (int64_t i0 = 0; i0 < T; i0 += kQ) {
      const int64_t rows = std::min(kQ, T - i0), L = i0 + rows;
      float *p = w.s.data(), *ds = w.ds.data(), *qp = w.q.data(), *dop = w.dout.data();
      PackRows(qb + i0 * qs, qs, rows, Dk, qp, lk);
      PackRows(dob + i0 * vs, vs, rows, Dv, dop, lv);
      Gemm(qp, lk, 1, w.kt.data(), lt, Dk, p, lt, false, rows, Cols(L));
      Gemm(dop, lv, 1, w.vt.data(), lt, Dv, ds, lt, false, rows, Cols(L));  // dp
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t r = i0 + i, n = r + 1;
        float *prow = p + i * lt, *dsrow = ds + i * lt;
        ExpShifted(prow, n, L, lseb[r]);  // the probabilities, recomputed
        float delta = 0.0f;  // sum_d do[r, d] o[r, d] = sum_j p[r, j] dp[r, j]
        for (int64_t c = 0; c < Dv; ++c) delta += dop[i * lv + c] * ob[r * vs + c];
        for (int64_t j = 0; j < L; ++j) dsrow[j] = prow[j] * (dsrow[j] - delta);
      }
      Gemm(ds, lt, 1, w.k.data(), lk, L, dqb + i0 * qs, qs, false, rows, Dk);  // dq = ds k
      Gemm(ds, 1, lt, qp, lk, rows, w.dk.data(), lk, true, L, Dk);           // dk += ds^T q
      Gemm(p, 1, lt, dop, lv, rows, w.dv.data(), lv, true, L, Dv);           // dv += p^T do
    }
    for (int64_t t = 0; t < T; ++t) {
      std::memcpy(dkb + t * qs, w.dk.data() + t * lk, Dk * sizeof(float));
      std::memcpy(dvb + t * vs, w.dv.data() + t * lv, Dv * sizeof(float));
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DsjAttentionFwd, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Ret<ffi::Buffer<ffi::F32>>()  // o
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(DsjAttentionBwd, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // o
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // do
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dv
);
