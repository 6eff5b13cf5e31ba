// Mamba-2's SSD on the CPU for training: forward and backward of the chunked form, float32 and float64 (the
// math: docs/math/mamba2.md, "The chunked form on the CPU"; why: docs/design.md, "CPU references (issue 14)").
//
// Inputs arrive packed, all in the compute dtype (the caller converts): x, z [L, H, P], dt [L, H] (before bias,
// softplus and clamp), B, C [L, G, N], A, D, dt_bias [H], the initial state h0 [Nseq, H, P, N], the sequence
// boundaries cu_seqlens [Nseq + 1] and each sequence's first chunk chunk_offsets (int64). Everything is
// contiguous but the rows of x and of B and C, which may be ld_x and ld_bc apart: Mamba-2's layer hands the
// column blocks of its conv's output [L, H P + 2 G N] as they are, and the backward can write dx, dB and dC
// into one tensor of that layout (ssd_bwd's `packed`), so neither direction copies them.
//
// With conv_weight [H P + 2 G N, W] (and conv_bias), those column blocks are the layer's short conv's input
// instead: each chunk computes its own x, B and C, silu(bias + sum_j weight[:, j] pre[t - (W-1) + j]) with zeros
// before a sequence's first token, into a local buffer, and the backward turns their gradients into the
// pre-activations' gradient (written into the packed layout) and the conv's dweight and dbias. Neither the
// conv's output nor its gradient exists as a tensor (docs/design.md, "Seventh round").
//
// One task owns one (sequence, group of B and C) and walks the sequence's chunks in order with the state of
// the group's heads, [Hg P, N], where the forward keeps it (the stored entering states' rows, the final state's)
// or in a local buffer. A chunk's products are matrix products of the chunk's rows in place (the heads of a
// group are side by side in every token's row, so [c, Hg P] blocks need no copy):
// C B^T once per chunk, the decay-masked scores per head, C S^T and the state's update U^T B. The
// elementwise work around them (dt', the cumulative log decays, the masks, D, the gate) runs on the chunk's
// rows while they are in cache. Every gradient of a token belongs to one task; the per-head parameters'
// gradients are summed per task and then in task order: no atomics, and the result does not depend on the
// schedule.
#include "../torch_cpu.h"

#include <dlfcn.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "../args_cpu.h"
#include "../rows_cpu.h"
#include "../vec_cpu.h"

namespace {

using namespace seqmix_cpu;

// A matrix operand: rows ld apart; a transposed one is stored as the rows of its transpose.
template <typename T>
struct Mat {
  const T* data;
  int64_t ld;
  bool t = false;
};

// BLAS's column-major sgemm_ / dgemm_ (LP64 ints) as libtorch_cpu exports them (torch's x86 builds link MKL
// into it), or null where it has none by that name. Looked up at run time: the module must load without them.
template <typename T>
using BlasGemm = void (*)(const char*, const char*, const int*, const int*, const int*, const T*, const T*,
                          const int*, const T*, const int*, const T*, T*, const int*);

template <typename T>
BlasGemm<T> blas_gemm() {
  static const BlasGemm<T> f = [] {
    void* torch_cpu = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);  // loaded already: torch's own copy
    void* sym = torch_cpu ? dlsym(torch_cpu, std::is_same_v<T, float> ? "sgemm_" : "dgemm_") : nullptr;
    return reinterpret_cast<BlasGemm<T>>(sym);
  }();
  return f;
}

// c = beta c + a b for a [m, k] and b [k, n] (c's rows ldc apart), read and written in place: BLAS called
// directly, row-major as the column-major c^T = b^T a^T. ATen's product on views of the buffers (its
// fallback) costs a few microseconds of tensors and dispatch a call, and a training step of Mamba-2 at
// T = 2048 makes ~750 of these [64, 128] x [128, 256] products (docs/design.md, "Twenty-seventh round").
template <typename T>
void gemm(int64_t m, int64_t n, int64_t k, Mat<T> a, Mat<T> b, T beta, T* c, int64_t ldc) {
  if (const BlasGemm<T> f = blas_gemm<T>()) {
    const int M = static_cast<int>(m), N = static_cast<int>(n), K = static_cast<int>(k);
    const int lda = static_cast<int>(a.ld), ldb = static_cast<int>(b.ld), ldC = static_cast<int>(ldc);
    const T one = 1;
    f(b.t ? "T" : "N", a.t ? "T" : "N", &N, &M, &K, &one, b.data, &ldb, a.data, &lda, &beta, c, &ldC);
    return;
  }
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const Mat<T>& x, int64_t rows, int64_t cols) {
    const std::array<int64_t, 2> strides = x.t ? std::array<int64_t, 2>{1, x.ld} : std::array<int64_t, 2>{x.ld, 1};
    return at::from_blob(const_cast<T*>(x.data), {rows, cols}, strides, options);
  };
  at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, options);
  if (beta == T(0)) {
    at::mm_out(out, view(a, m, k), view(b, k, n));
  } else {
    out.addmm_(view(a, m, k), view(b, k, n), beta, T(1));
  }
}

// The per-head products of a chunk's masked scores W [len, len] (lower triangular) with [len, P] rows,
// written here rather than left to BLAS: they skip W's upper half, and a head's product is a few
// microseconds, about what a library call costs by itself. Columns go in blocks of up to kBlock vectors
// held in registers; a row of a block is read whole (kFull) or, at the end of an odd width, in part.
constexpr int kBlock = 4;
// Tokens of the conv inside the chunks taken together, for widths up to it (conv_tokens).
constexpr int kConvBlock = 4;

// token(t) for the chunk's first `lead` tokens (whose windows reach before their sequence) and for the last
// ones, block(t, width) for the blocks of kConvBlock tokens between (width: the conv's W as a constant). A
// block reads each of its K + W - 1 input rows once rather than W times, and its K sums are independent chains;
// a wider conv goes token by token.
template <typename Token, typename Block>
void conv_tokens(int64_t lead, int64_t len, int64_t W, const Token& token, const Block& block) {
  int64_t t = 0;
  for (; t < lead; ++t) token(t);
  if (W <= kConvBlock)
    as_constant<kConvBlock>(W, [&](auto width) {
      for (; t + kConvBlock <= len; t += kConvBlock) block(t, width);
    });
  for (; t < len; ++t) token(t);
}

// Prefetches the column's rows first .. first + n - 1 (up to row last): the next block's input, which the
// hardware's prefetcher, following rows a few KiB apart, fetches too late (docs/design.md, "Fourteenth round").
template <typename T>
inline void prefetch_rows(const T* col, int64_t ld, int64_t first, int64_t n, int64_t last) {
  for (int64_t i = first; i < std::min(first + n, last + 1); ++i) __builtin_prefetch(col + i * ld);
}

template <typename T, bool kFull>
inline Vec<T> load_cols(const T* p, int64_t v, int64_t width) {
  constexpr int W = Lanes<T>::W;
  if (kFull) return load(p + v * W);
  const int64_t m = std::clamp<int64_t>(width - v * W, 0, W);
  return m == W ? load(p + v * W) : load_part(p + v * W, m);
}

template <typename T, bool kFull>
inline void store_cols(T* p, Vec<T> x, int64_t v, int64_t width) {
  constexpr int W = Lanes<T>::W;
  if (kFull) return store(p + v * W, x);
  const int64_t m = std::clamp<int64_t>(width - v * W, 0, W);
  if (m > 0) store_part(p + v * W, x, m);
}

// f(column offset, block width, full) over the blocks of P columns.
template <typename T, typename F>
inline void by_blocks(int64_t P, const F& f) {
  constexpr int64_t B = kBlock * Lanes<T>::W;
  for (int64_t k = 0; k < P; k += B) {
    if (P - k >= B) f(k, B, std::true_type{});
    else f(k, P - k, std::false_type{});
  }
}

// Rows of a product go kRows at a time: each vector of the other operand read from memory then serves kRows
// multiply-adds instead of one. One row at a time, the loads bounded these products at 33-55 GFLOP/s on one
// Zen 4 core (a head's block is 1 KiB-strided rows of the chunk, which L1 does not keep); four at a time
// they reach 64-100 (docs/design.md, "Twelfth round").
constexpr int kRows = 4;
// The triangular products' rows a block: with AVX-512's 32 registers, 6 rows of kBlock accumulators and the
// kBlock vectors of the other operand fit; with AVX2's 16 they would spill.
constexpr int kTriangleRows = kVectorBytes == 64 ? 6 : kRows;

// f(first row, rows as a constant) over [0, len) in blocks of kMax rows (the last one shorter).
template <int kMax, typename F>
inline void by_rows(int64_t len, const F& f) {
  for (int64_t i0 = 0; i0 < len; i0 += kMax)
    as_constant<kMax>(std::min<int64_t>(kMax, len - i0), [&](auto rows) { f(i0, rows); });
}

// y[i] (+)= sum over j <= i of w[i, j] x[j], i < len (rows of w, x and y ldw, ldx, ldy apart). w must hold
// zeros above its diagonal (in its first len columns): a block's rows all run to its last row's diagonal, and
// the terms past their own add w's zeros, leaving each sum as the row alone would have it.
template <typename T>
void lower_times(int64_t len, int64_t P, const T* w, int64_t ldw, const T* x, int64_t ldx, T* y, int64_t ldy,
                 bool add) {
  by_blocks<T>(P, [&](int64_t k, int64_t width, auto full) {
    constexpr bool F = decltype(full)::value;
    by_rows<kTriangleRows>(len, [&](int64_t i0, auto rows_constant) {
      constexpr int R = decltype(rows_constant)::value;
      Vec<T> acc[R][kBlock];
      for (int r = 0; r < R; ++r)
        for (int v = 0; v < kBlock; ++v)
          acc[r][v] = add ? load_cols<T, F>(y + (i0 + r) * ldy + k, v, width) : Vec<T>{};
      for (int64_t j = 0; j < i0 + R; ++j) {
        Vec<T> xv[kBlock];
        for (int v = 0; v < kBlock; ++v) xv[v] = load_cols<T, F>(x + j * ldx + k, v, width);
        for (int r = 0; r < R; ++r) {
          const Vec<T> s = splat<T>(w[(i0 + r) * ldw + j]);
          for (int v = 0; v < kBlock; ++v) acc[r][v] += s * xv[v];
        }
      }
      for (int r = 0; r < R; ++r)
        for (int v = 0; v < kBlock; ++v) store_cols<T, F>(y + (i0 + r) * ldy + k, acc[r][v], v, width);
    });
  });
}

// y[j] = sum over i >= j of w[i, j] x[i] (w^T x), j < len; w with zeros above its diagonal, as above (a
// block's rows all start at its first row).
template <typename T>
void lower_t_times(int64_t len, int64_t P, const T* w, int64_t ldw, const T* x, int64_t ldx, T* y, int64_t ldy) {
  by_blocks<T>(P, [&](int64_t k, int64_t width, auto full) {
    constexpr bool F = decltype(full)::value;
    by_rows<kTriangleRows>(len, [&](int64_t j0, auto rows_constant) {
      constexpr int R = decltype(rows_constant)::value;
      Vec<T> acc[R][kBlock] = {};
      for (int64_t i = j0; i < len; ++i) {
        Vec<T> xv[kBlock];
        for (int v = 0; v < kBlock; ++v) xv[v] = load_cols<T, F>(x + i * ldx + k, v, width);
        for (int r = 0; r < R; ++r) {
          const Vec<T> s = splat<T>(w[i * ldw + j0 + r]);
          for (int v = 0; v < kBlock; ++v) acc[r][v] += s * xv[v];
        }
      }
      for (int r = 0; r < R; ++r)
        for (int v = 0; v < kBlock; ++v) store_cols<T, F>(y + (j0 + r) * ldy + k, acc[r][v], v, width);
    });
  });
}

#if defined(__AVX512F__)
// The transpose of a 16 x 16 block of floats (rows ls apart) into dst (rows ld apart): pairs of rows
// interleaved by lanes, then by pairs of lanes, then by 128-bit quarters twice.
inline void transpose_block(const float* src, int64_t ls, float* dst, int64_t ld) {
  constexpr int K = 16;
  __m512 r[K], t[K];
  for (int i = 0; i < K; ++i) r[i] = _mm512_loadu_ps(src + i * ls);
  for (int i = 0; i < K; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < K; i += 4)
    for (int k = 0; k < 2; ++k) {
      const __m512d a = _mm512_castps_pd(t[i + k]), b = _mm512_castps_pd(t[i + k + 2]);
      r[i + 2 * k] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      r[i + 2 * k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    }
  for (int i = 0; i < K; i += 8)
    for (int k = 0; k < 4; ++k) {
      t[i + k] = _mm512_shuffle_f32x4(r[i + k], r[i + k + 4], 0x88);
      t[i + k + 4] = _mm512_shuffle_f32x4(r[i + k], r[i + k + 4], 0xdd);
    }
  for (int k = 0; k < 8; ++k) {
    r[k] = _mm512_shuffle_f32x4(t[k], t[k + 8], 0x88);
    r[k + 8] = _mm512_shuffle_f32x4(t[k], t[k + 8], 0xdd);
  }
  for (int i = 0; i < K; ++i) _mm512_storeu_ps(dst + i * ld, r[i]);
}
#elif defined(__AVX2__)
// The transpose of an 8 x 8 block of floats (rows ls apart) into dst (rows ld apart).
inline void transpose_block(const float* src, int64_t ls, float* dst, int64_t ld) {
  constexpr int K = 8;
  __m256 r[K], t[K];
  for (int i = 0; i < K; ++i) r[i] = _mm256_loadu_ps(src + i * ls);
  for (int i = 0; i < K; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < K; i += 4)
    for (int k = 0; k < 2; ++k) {
      r[i + 2 * k] = _mm256_shuffle_ps(t[i + k], t[i + k + 2], 0x44);
      r[i + 2 * k + 1] = _mm256_shuffle_ps(t[i + k], t[i + k + 2], 0xee);
    }
  for (int k = 0; k < 4; ++k) {
    t[k] = _mm256_permute2f128_ps(r[k], r[k + 4], 0x20);
    t[k + 4] = _mm256_permute2f128_ps(r[k], r[k + 4], 0x31);
  }
  for (int i = 0; i < K; ++i) _mm256_storeu_ps(dst + i * ld, t[i]);
}
#endif

// bt[q, j] = b[j, q] for j < len, q < P (rows of b ld apart, of bt ldd apart). Element by element the stores
// of a row of b go to P rows of bt, a cache line each: at P = 128 the rows 512 bytes apart share L1's sets,
// and Mamba-2's [128, 128] B^T took 28 us on an Intel core, 3.2 in blocks transposed in registers
// (docs/design.md, "Twenty-seventh round").
template <typename T>
void transpose(int64_t len, int64_t P, const T* b, int64_t ld, T* bt, int64_t ldd) {
  int64_t j0 = 0, q0 = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    constexpr int64_t K = Lanes<float>::W;
    j0 = len / K * K;
    q0 = P / K * K;
    for (int64_t j = 0; j < j0; j += K)
      for (int64_t q = 0; q < q0; q += K) transpose_block(b + j * ld + q, ld, bt + q * ldd + j, ldd);
  }
#endif
  for (int64_t j = 0; j < j0; ++j)  // the columns past the blocks
    for (int64_t q = q0; q < P; ++q) bt[q * ldd + j] = b[j * ld + q];
  for (int64_t j = j0; j < len; ++j)  // the rows past the blocks
    for (int64_t q = 0; q < P; ++q) bt[q * ldd + j] = b[j * ld + q];
}

// d[i, j] = a[i] . b[j] for j <= i (rows of a and b [len, P] ld apart, of d ldd apart). b^T [P, len] goes
// through bt (P rows ldd apart) so that a row of d is a sum of bt's rows times a[i]'s values, vectors along
// j. Whole vectors only: ldd is a multiple of the lanes, so a row's last vector stays inside the row; its
// entries past i are left as computed (from values of bt past len, whatever they hold) and never read. A
// block's rows lie in one vector's span (its row count divides the lanes), so they all take the same vectors.
template <typename T>
void lower_dots(int64_t len, int64_t P, const T* a, const T* b, int64_t ld, T* bt, T* d, int64_t ldd) {
  constexpr int W = Lanes<T>::W, kDotRows = std::min(kRows, W);
  static_assert(W % kDotRows == 0, "a block of rows must lie in one vector's span");
  transpose(len, P, b, ld, bt, ldd);
  // nv vectors from vector v0 on of the block's R rows from i0 on, the accumulators in registers.
  auto vectors_of_rows = [&](int64_t i0, int64_t v0, auto rows_constant, auto nv_constant) {
    constexpr int R = decltype(rows_constant)::value, nv = decltype(nv_constant)::value;
    Vec<T> acc[R][nv] = {};
    for (int64_t q = 0; q < P; ++q) {
      Vec<T> bv[nv];
      for (int v = 0; v < nv; ++v) bv[v] = load(bt + q * ldd + (v0 + v) * W);
      for (int r = 0; r < R; ++r) {
        const Vec<T> s = splat<T>(a[(i0 + r) * ld + q]);
        for (int v = 0; v < nv; ++v) acc[r][v] += s * bv[v];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < nv; ++v) store(d + (i0 + r) * ldd + (v0 + v) * W, acc[r][v]);
  };
  by_rows<kDotRows>(len, [&](int64_t i0, auto rows_constant) {
    const int64_t vectors = i0 / W + 1;  // d[i, 0..i] for each row i of the block
    for (int64_t v0 = 0; v0 < vectors; v0 += kBlock)
      as_constant<kBlock>(std::min<int64_t>(kBlock, vectors - v0),
                          [&](auto nv) { vectors_of_rows(i0, v0, rows_constant, nv); });
  });
}

// dst[j] = exp(x - v[j]) for j < n (the decays from the tokens j of a chunk to a later point).
template <typename T>
inline void exp_from(T x, const T* v, T* dst, int64_t n) {
  constexpr int W = Lanes<T>::W;
  int64_t j = 0;
  for (; j + W <= n; j += W) store(dst + j, exp_v<T>(splat<T>(x) - load(v + j)));
  if (j < n) store_part(dst + j, exp_v<T>(splat<T>(x) - load_part(v + j, n - j)), n - j);
}

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// f(i, m, full) over the n values of a row in vectors: whole ones (full, m = W lanes), then the m < W left.
template <typename T, typename F>
inline void by_vectors(int64_t n, const F& f) {
  constexpr int W = Lanes<T>::W;
  int64_t i = 0;
  for (; i + W <= n; i += W) f(i, int64_t{W}, std::true_type{});
  if (i < n) f(i, n - i, std::false_type{});
}

// y silu(z) with sg = sigmoid(z): the gated output, as the forward writes it and the norm's backward rebuilds it.
template <typename T>
inline Vec<T> gated(Vec<T> y, Vec<T> z, Vec<T> sg) {
  return y * z * sg;
}

template <typename T>
inline Vec<T> gated(Vec<T> y, Vec<T> z) {
  return gated<T>(y, z, sigmoid_v<T>(z));
}

// The gate of a row of n outputs, o *= silu(z), keeping the ungated values in pre (when given).
template <typename T>
inline void gate_row(T* o, T* pre, const T* z, int64_t n) {
  by_vectors<T>(n, [&](int64_t i, int64_t m, auto full) {
    constexpr bool F = decltype(full)::value;
    const Vec<T> zv = load_cols<T, F>(z + i, 0, m), ov = load_cols<T, F>(o + i, 0, m);
    if (pre) store_cols<T, F>(pre + i, ov, 0, m);
    store_cols<T, F>(o + i, gated<T>(ov, zv), 0, m);
  });
}

// The gate's backward on a row: dy = dout silu(z), dz = dout y silu'(z) with y the ungated output; sigmoid(z)
// from sgs when given (the norm's backward computed it), else computed here.
template <typename T>
inline void gate_row_bwd(const T* dout, const T* y, const T* z, const T* sgs, T* dy, T* dz, int64_t n) {
  by_vectors<T>(n, [&](int64_t i, int64_t m, auto full) {
    constexpr bool F = decltype(full)::value;
    const Vec<T> zv = load_cols<T, F>(z + i, 0, m), dv = load_cols<T, F>(dout + i, 0, m);
    const Vec<T> sg = sgs ? load_cols<T, F>(sgs + i, 0, m) : sigmoid_v<T>(zv);
    store_cols<T, F>(dy + i, dv * zv * sg, 0, m);
    store_cols<T, F>(dz + i, dv * load_cols<T, F>(y + i, 0, m) * sg * (T(1) + zv * (T(1) - sg)), 0, m);
  });
}

// The output's RMSNorm on a row of n values in place: o = o / rms(o) * weight.
template <typename T>
inline void norm_row(T* o, const T* weight, T eps, int64_t n) {
  const Vec<T> r = splat<T>(rms_scale(o, n, T(1) / T(n), eps));
  by_vectors<T>(n, [&](int64_t i, int64_t m, auto full) {
    constexpr bool F = decltype(full)::value;
    store_cols<T, F>(o + i, load_cols<T, F>(o + i, 0, m) * r * load_cols<T, F>(weight + i, 0, m), 0, m);
  });
}

// The RMSNorm's backward on a row: n = g r weight with r = 1 / rms(g), gradient dn. Returns dg = r dn weight -
// g r^3 sum(dn weight g) / n (into dg, which may be dn's row) and adds dn g r to dweight. g's row is the
// forward's pre-norm output: y_pre, gated by z as gate_row gated it (when z is given), rebuilt in g, with
// sigmoid(z) kept in sg for the gate's backward (one sigmoid a value, not two).
template <typename T>
inline void norm_row_bwd(const T* dn, const T* y_pre, const T* z, const T* weight, T eps, T* g, T* sg, T* dg,
                         T* dweight, int64_t n) {
  by_vectors<T>(n, [&](int64_t i, int64_t m, auto full) {
    constexpr bool F = decltype(full)::value;
    const Vec<T> yv = load_cols<T, F>(y_pre + i, 0, m);
    if (!z) return store_cols<T, F>(g + i, yv, 0, m);
    const Vec<T> zv = load_cols<T, F>(z + i, 0, m), s = sigmoid_v<T>(zv);
    store_cols<T, F>(sg + i, s, 0, m);
    store_cols<T, F>(g + i, gated<T>(yv, zv, s), 0, m);
  });
  const T r = rms_scale(g, n, T(1) / T(n), eps);
  Vec<T> acc{};
  by_vectors<T>(n, [&](int64_t i, int64_t m, auto full) {
    constexpr bool F = decltype(full)::value;
    acc += load_cols<T, F>(dn + i, 0, m) * load_cols<T, F>(weight + i, 0, m) * load_cols<T, F>(g + i, 0, m);
  });
  const Vec<T> rv = splat<T>(r), cv = splat<T>(r * r * r * lane_sum<T>(acc) / static_cast<T>(n));
  by_vectors<T>(n, [&](int64_t i, int64_t m, auto full) {
    constexpr bool F = decltype(full)::value;
    const Vec<T> dv = load_cols<T, F>(dn + i, 0, m), gv = load_cols<T, F>(g + i, 0, m);
    store_cols<T, F>(dweight + i, load_cols<T, F>(dweight + i, 0, m) + dv * gv * rv, 0, m);
    store_cols<T, F>(dg + i, rv * dv * load_cols<T, F>(weight + i, 0, m) - gv * cv, 0, m);
  });
}

// Everything a task reads, with the problem's sizes.
template <typename T>
struct Problem {
  const T *x, *dt, *B, *C, *z, *A, *D, *dt_bias, *h0;
  const int64_t *cu, *chunk_offsets;
  int64_t H, P, G, N, chunk;
  int64_t ld_x, ld_bc, ld_z, ld_dt;  // the row strides of x, of B and C, of z, of dt
  int64_t ld_dx, ld_dbc, ld_dz, ld_ddt;  // the backward's: of dx, of dB and dC, of dz, of ddt
  const T *conv_w, *conv_b;  // the short conv inside the chunks: [H P + 2 G N, W] and [H P + 2 G N], or null
  int64_t W;
  const T* norm_w;  // the output's RMSNorm over each token's H P values (G = 1): its weight [H P], or null
  T norm_eps;
  bool has_h0;  // the backward has no h0, only whether there was one
  bool softplus;
  T lo, hi;
  int64_t Hg() const { return H / G; }
  int64_t width() const { return Hg() * P; }  // a token's row of the group's heads
  bool conv() const { return conv_w != nullptr; }
  int64_t group_cols() const { return width() + 2 * N; }  // a group's columns of x, B and C
};

// The three column blocks of group g in a token's row of [H P + 2 G N] (x of its heads, its B, its C), as
// (first column there, first column in the group's own [Hg P + 2 N] row, count).
struct Cols {
  int64_t global, local, count;
};

std::array<Cols, 3> group_cols(int64_t H, int64_t P, int64_t G, int64_t N, int64_t g) {
  const int64_t w = H / G * P;
  return {Cols{g * w, 0, w}, Cols{H * P + g * N, w, N}, Cols{H * P + G * N + g * N, w + N, N}};
}

template <typename T>
std::array<Cols, 3> group_cols(const Problem<T>& p, int64_t g) {
  return group_cols(p.H, p.P, p.G, p.N, g);
}

// f(k, v, m, full) for each vector of the group's three column blocks: k the block, v the vector's first column
// in it, m the block's columns from v on, full (a constant) whether the vector lies inside the block (else its
// first m lanes do). (Walking a vector's column down the chunk's rows instead, taps and sums in registers, was
// twice as slow: each row is a cache line apart.)
template <typename T, typename F>
void over_vectors(const Problem<T>& p, int64_t g, const F& f) {
  constexpr int64_t V = Lanes<T>::W;
  for (const Cols& k : group_cols(p, g)) {
    int64_t v = 0;
    for (; v + V <= k.count; v += V) f(k, v, k.count - v, std::true_type{});
    if (v < k.count) f(k, v, k.count - v, std::false_type{});
  }
}

template <typename T, bool kFull>
inline Vec<T> load_m(const T* p, int64_t m) {
  return kFull ? load(p) : load_part(p, m);
}

template <typename T, bool kFull>
inline void store_m(T* p, Vec<T> x, int64_t m) {
  if (kFull) store(p, x);
  else store_part(p, x, m);
}

// A task's view of one chunk: its tokens, the group's columns, and the per-chunk values recomputed by the
// forward and the backward alike.
template <typename T>
struct Chunk {
  const Problem<T>& p;
  int64_t g, t0, len;
  int64_t seq_start;  // the first token of the chunk's sequence
  // dt' [c, Hg], its raw derivative d dt' / d dt [c, Hg], the in-chunk cumulative log decays [Hg, c]
  // (head-major: a head's decays are contiguous for the masks), dt' x [c, Hg P].
  std::vector<T> dtp, ddtp, lcum;
  Scratch<T> xdt;
  // With the conv: the group's taps transposed [W, cg] and bias [cg], and the chunk's sigmoid(pre-activation)
  // and x, B and C = pre-activation * that [c, cg] (cg = Hg P + 2 N; a vector more at the end).
  int64_t cg;
  std::vector<T> taps, cbias;
  Scratch<T> csig, act;

  Chunk(const Problem<T>& p, int64_t c)
      : p(p), g(0), t0(0), len(0), seq_start(0), dtp(c * p.Hg()), ddtp(c * p.Hg()), lcum(p.Hg() * c),
        xdt(c * p.width()), cg(p.group_cols()) {
    if (!p.conv()) return;
    const int64_t padded = cg + Lanes<T>::W;
    taps.resize(p.W * padded);
    cbias.resize(padded);
    csig.resize(c * cg + Lanes<T>::W);
    act.resize(c * cg + Lanes<T>::W);
  }

  // The group's taps and bias, once per task.
  void set_group(int64_t group) {
    g = group;
    if (!p.conv()) return;
    const int64_t padded = cg + Lanes<T>::W;
    for (const Cols& k : group_cols(p, g))
      for (int64_t i = 0; i < k.count; ++i) {
        for (int64_t j = 0; j < p.W; ++j) taps[j * padded + k.local + i] = p.conv_w[(k.global + i) * p.W + j];
        cbias[k.local + i] = p.conv_b ? p.conv_b[k.global + i] : T(0);
      }
  }

  // The first tap that reads a token of the sequence for the chunk's token t (the ones before read zeros).
  int64_t first_tap(int64_t t) const { return std::max<int64_t>(0, seq_start - (t0 + t - (p.W - 1))); }
  // The chunk's tokens whose first taps read before the sequence (first_tap > 0).
  int64_t lead() const { return std::clamp<int64_t>(seq_start - t0 + p.W - 1, 0, len); }

  // The chunk's conv: pre = bias + sum_j taps[j] xs[t - (W-1) + j] (zeros before the sequence), act = silu(pre),
  // row by row over the group's three column blocks; the sigmoids are kept for the backward's silu' only.
  void convolve(bool keep_sigmoid) {
    conv_tokens(
        lead(), len, p.W, [&](int64_t t) { convolve_token(t, keep_sigmoid); },
        [&](int64_t t, auto width) { convolve_block<decltype(width)::value>(t, keep_sigmoid); });
  }

  // Token t alone: its taps j < first_tap(t) read before the sequence (zeros) and are skipped.
  void convolve_token(int64_t t, bool keep_sigmoid) {
    const int64_t padded = cg + Lanes<T>::W, j0 = first_tap(t), first = t0 + t - (p.W - 1);
    over_vectors(p, g, [&](const Cols& k, int64_t v, int64_t m, auto full) {
      constexpr bool F = decltype(full)::value;
      const int64_t l = k.local + v;
      const T* col = p.x + k.global + v;  // the column's values at token r: col[r * ld_x]
      Vec<T> acc = seqmix_cpu::load(cbias.data() + l);
      for (int64_t j = j0; j < p.W; ++j)  // taps j >= j0 read inside the sequence
        acc += seqmix_cpu::load(taps.data() + j * padded + l) * load_m<T, F>(col + (first + j) * p.ld_x, m);
      activate(t, l, acc, keep_sigmoid, m, full);
    });
  }

  // Tokens t .. t + kConvBlock - 1 (past the lead) with W taps: the same sums in the same order as
  // convolve_token's.
  template <int W>
  void convolve_block(int64_t t, bool keep_sigmoid) {
    constexpr int K = kConvBlock;
    const int64_t padded = cg + Lanes<T>::W, first = t0 + t - (W - 1);
    over_vectors(p, g, [&](const Cols& k, int64_t v, int64_t m, auto full) {
      constexpr bool F = decltype(full)::value;
      const int64_t l = k.local + v;
      const T* col = p.x + k.global + v;
      Vec<T> rows[K + W - 1], tap[W];
      for (int i = 0; i < K + W - 1; ++i) rows[i] = load_m<T, F>(col + (first + i) * p.ld_x, m);
      prefetch_rows(col, p.ld_x, first + K + W - 1, K, t0 + len - 1);
      for (int j = 0; j < W; ++j) tap[j] = seqmix_cpu::load(taps.data() + j * padded + l);
      for (int q = 0; q < K; ++q) {
        Vec<T> acc = seqmix_cpu::load(cbias.data() + l);
        for (int j = 0; j < W; ++j) acc += tap[j] * rows[q + j];
        activate(t + q, l, acc, keep_sigmoid, m, full);
      }
    });
  }

  // act (and with keep_sigmoid csig) of token t's lanes l.. from its pre-activation.
  template <bool F>
  void activate(int64_t t, int64_t l, Vec<T> pre, bool keep_sigmoid, int64_t m, std::integral_constant<bool, F>) {
    const Vec<T> sg = sigmoid_v<T>(pre);
    if (keep_sigmoid) store_m<T, F>(csig.data() + t * cg + l, sg, m);
    store_m<T, F>(act.data() + t * cg + l, pre * sg, m);
  }

  // Offsets of token t's row of the group's heads in the contiguous [L, H, P] tensors (out, z, dout, ...), in
  // x (dx with grad), and in B and C (dB and dC with grad).
  int64_t row(int64_t t) const { return (t0 + t) * p.H * p.P + g * p.width(); }
  int64_t z_row(int64_t t, bool grad = false) const { return (t0 + t) * (grad ? p.ld_dz : p.ld_z) + g * p.width(); }
  int64_t x_row(int64_t t, bool grad = false) const { return (t0 + t) * (grad ? p.ld_dx : p.ld_x) + g * p.width(); }
  int64_t bc_row(int64_t t, bool grad = false) const { return (t0 + t) * (grad ? p.ld_dbc : p.ld_bc) + g * p.N; }
  // Token t's x of the group's heads, and the chunk's B and C: in place, or the conv's output.
  const T* xr(int64_t t) const { return p.conv() ? act.data() + t * cg : p.x + x_row(t); }
  Mat<T> Bm() const { return p.conv() ? Mat<T>{act.data() + p.width(), cg} : Mat<T>{p.B + bc_row(0), p.ld_bc}; }
  Mat<T> Cm() const {
    return p.conv() ? Mat<T>{act.data() + p.width() + p.N, cg} : Mat<T>{p.C + bc_row(0), p.ld_bc};
  }
  T last(int64_t hl) const { return lcum[hl * p.chunk + len - 1]; }

  void load(int64_t start, int64_t n, bool for_backward) {
    t0 = start;
    len = n;
    if (p.conv()) convolve(for_backward);
    const int64_t Hg = p.Hg(), P = p.P, c = p.chunk;
    for (int64_t hl = 0; hl < Hg; ++hl) {
      const int64_t h = g * Hg + hl;
      T run = 0;
      for (int64_t t = 0; t < len; ++t) {
        T v = p.dt[(t0 + t) * p.ld_dt + h] + (p.dt_bias ? p.dt_bias[h] : T(0));
        T d = 1;
        if (p.softplus) {  // torch's softplus: the identity above 20
          d = v > T(20) ? T(1) : sigmoid(v);
          v = v > T(20) ? v : std::log1p(std::exp(v));
        }
        if (v < p.lo || v > p.hi) {
          v = std::clamp(v, p.lo, p.hi);
          d = 0;
        }
        dtp[t * Hg + hl] = v;
        ddtp[t * Hg + hl] = d;
        run += v * p.A[h];
        lcum[hl * c + t] = run;
      }
    }
    for (int64_t t = 0; t < len; ++t) {
      const T* xt = xr(t);
      T* out = xdt.data() + t * p.width();
      for (int64_t hl = 0; hl < Hg; ++hl) {
        const T d = dtp[t * Hg + hl];
        for (int64_t q = 0; q < P; ++q) out[hl * P + q] = d * xt[hl * P + q];
      }
    }
  }

  // M = C B^T [len, len] (rows c apart), shared by the group's heads: its lower triangle, the one the masks
  // keep (lower_dots; bt [N, c] its buffer). Entries above the diagonal are left as computed, never read.
  void scores(T* M, T* bt) const {
    const Mat<T> c = Cm(), b = Bm();
    lower_dots(len, p.N, c.data, b.data, c.ld, bt, M, p.chunk);
  }

  // Per head hl, the decay mask L_ij = exp(lcum_i - lcum_j) for j <= i (0 above) and W = L * M, into
  // [Hg, c, c] buffers (W's zeros above the diagonal are lower_times' and lower_t_times'; L only where given:
  // the forward needs W alone). A row goes in whole vectors up to the one holding len - 1 (c is a multiple of
  // the lanes); the lanes past the diagonal are set to 0 by a select, whatever lcum and M hold there (scalar
  // tails of a varying length took 6% of the backward, docs/design.md, "Twenty-seventh round").
  void masked(const T* M, T* L, T* Wm) const {
    constexpr int64_t V = Lanes<T>::W;
    const int64_t c = p.chunk;
    const Vec<T> zero{}, lane = lane_indices<T>();
    for (int64_t hl = 0; hl < p.Hg(); ++hl) {
      const T* lc = lcum.data() + hl * c;
      for (int64_t i = 0; i < len; ++i) {
        const Vec<T> from = splat<T>(lc[i]), diagonal = splat<T>(static_cast<T>(i));
        T* l = L ? L + hl * c * c + i * c : nullptr;
        T* w = Wm + hl * c * c + i * c;
        for (int64_t j = 0; j < len; j += V) {
          if (j > i) {
            if (l) store(l + j, zero);
            store(w + j, zero);
            continue;
          }
          const auto keep = lane + static_cast<T>(j) <= diagonal;
          const Vec<T> e = keep ? exp_v<T>(from - seqmix_cpu::load(lc + j)) : zero;
          if (l) store(l + j, e);
          store(w + j, keep ? e * seqmix_cpu::load(M + i * c + j) : zero);
        }
      }
    }
  }

  // U = dt' x exp(last - lcum) [len, Hg P]: each token's write to the state leaving the chunk; to_end holds
  // exp(last - lcum) [Hg, c].
  void writes(T* U, T* to_end) const {
    const int64_t Hg = p.Hg(), P = p.P, c = p.chunk, w = p.width();
    for (int64_t hl = 0; hl < Hg; ++hl) exp_from(last(hl), lcum.data() + hl * c, to_end + hl * c, len);
    for (int64_t t = 0; t < len; ++t)
      for (int64_t hl = 0; hl < Hg; ++hl) {
        const T e = to_end[hl * c + t];
        for (int64_t q = 0; q < P; ++q) U[t * w + hl * P + q] = xdt[t * w + hl * P + q] * e;
      }
  }

  // rows *= exp(lcum) per token and head, over a [len, Hg P] buffer.
  void times_decay(const T* src, T* dst) const {
    const int64_t Hg = p.Hg(), P = p.P, c = p.chunk, w = p.width();
    for (int64_t t = 0; t < len; ++t)
      for (int64_t hl = 0; hl < Hg; ++hl) {
        const T e = std::exp(lcum[hl * c + t]);
        for (int64_t q = 0; q < P; ++q) dst[t * w + hl * P + q] = e * src[t * w + hl * P + q];
      }
  }
};

// dst[head hl's P N values] = exp(last_hl) src[...] for every head of the group (dst may be src).
template <typename T>
void decay_state(const Chunk<T>& ch, const T* src, T* dst) {
  const int64_t PN = ch.p.P * ch.p.N;
  for (int64_t hl = 0; hl < ch.p.Hg(); ++hl) {
    const T decay = std::exp(ch.last(hl));
    for (int64_t i = hl * PN; i < (hl + 1) * PN; ++i) dst[i] = decay * src[i];
  }
}

// A thread's buffers, allocated once for all its tasks (fresh large allocations cost page faults): a state
// (or its gradient) [Hg P, N], [c, c] scores, [Hg, c, c] per-head masks, [c, Hg P] rows, [Hg, c] per-head
// values, and b^T [max(P, N), c] for lower_dots (the heads' (dt' x)^T and the scores' B^T); the chunk's own
// (Chunk: dt' x, the conv's activations and sigmoids) and the conv's gradient rows. Scratch (vec_cpu.h): aligned
// to a cache line and not zeroed (1.7 MiB a thread for the tiny Mamba-2 layer at T = 128, zeroed at every call
// before, docs/design.md, "Thirtieth round"). Every task writes them before it reads them;
// tests/kernels/mamba2/test_cpu.py passes with them filled with NaN instead.
template <typename T>
struct Buffers {
  Chunk<T> ch;
  Scratch<T> S, M, dM, L, Wm, dW, Y, U, dR, dU, dX, xt;
  std::vector<T> to_end, dl, dlast;
  // With the conv, the backward's: the gradient of the chunk's x, B and C [c, cg] (then of their
  // pre-activations), that of the W-1 tokens after the chunk [W-1, cg], and the task's dweight [W, cg] and
  // dbias [cg].
  Scratch<T> dact;
  std::vector<T> carry, next, dtaps, dcbias;
  // With the norm, a token's pre-norm output [Hg P] and (with the gate) its sigmoid(z), rebuilt by the backward.
  std::vector<T> pre, sg;
  explicit Buffers(const Problem<T>& p)
      : ch(p, p.chunk), S(p.width() * p.N), M(p.chunk * p.chunk), dM(M.size()), L(p.Hg() * M.size()), Wm(L.size()),
        dW(L.size()), Y(p.chunk * p.width()), U(Y.size()), dR(Y.size()), dU(Y.size()), dX(Y.size()),
        xt(std::max(p.P, p.N) * p.chunk), to_end(p.Hg() * p.chunk), dl(to_end.size()), dlast(p.Hg()),
        pre(p.norm_w ? p.width() : 0), sg(p.norm_w && p.z ? p.width() : 0) {
    if (!p.conv()) return;
    const int64_t cg = p.group_cols() + Lanes<T>::W;
    dact.resize(p.chunk * cg);
    carry.resize((p.W - 1) * cg + 1);
    next.resize(carry.size());
    dtaps.resize(p.W * cg);
    dcbias.resize(cg);
  }
};

// The conv's backward for a chunk whose x, B and C gradients are in b.dact (rows cg apart): through silu
// (g = dact silu'(pre) = dact (sg + act (1 - sg)), in place), then dpre[t] = sum_j taps[j] g[t + (W-1) - j],
// g past the chunk from b.carry (the following chunk's, processed before; zeros past the sequence), into the
// group's columns of dpre (rows ld apart); dweight[j] += g[t] xs[t - (W-1) + j], dbias += g[t]; b.carry
// becomes the first W-1 rows of g from this chunk on.
template <typename T>
void conv_backward(const Chunk<T>& ch, Buffers<T>& b, T* dpre, int64_t ld) {
  constexpr int64_t V = Lanes<T>::W;
  const Problem<T>& p = ch.p;
  const int64_t cg = ch.cg, padded = cg + V, S = p.W - 1, len = ch.len;
  T* g = b.dact.data();
  for (int64_t i = 0; i < len * cg; i += V) {
    const int64_t m = len * cg - i;
    const Vec<T> sg = load_upto(ch.csig.data() + i, m), a = load_upto(ch.act.data() + i, m);
    store_upto(g + i, load_upto(g + i, m) * (sg + a * (T(1) - sg)), m);
  }
  auto g_row = [&](int64_t u) -> const T* { return u < len ? g + u * cg : b.carry.data() + (u - len) * cg; };
  auto token = [&](int64_t t) {
    const int64_t j0 = ch.first_tap(t), first = ch.t0 + t - S;
    const T* rows[kMaxConvWidth];  // g[t + S - j]
    for (int64_t j = 0; j < p.W; ++j) rows[j] = g_row(t + S - j);
    over_vectors(p, ch.g, [&](const Cols& k, int64_t v, int64_t m, auto full) {
      constexpr bool F = decltype(full)::value;
      const int64_t l = k.local + v;
      const T* col = p.x + k.global + v;  // the conv input's column: col[r * ld_x] at token r
      // g's rows are cg apart in buffers padded by a vector: whole vectors read past a partial one harmlessly.
      Vec<T> acc{};
      for (int64_t j = 0; j < p.W; ++j) acc += load(ch.taps.data() + j * padded + l) * load(rows[j] + l);
      store_m<T, F>(dpre + (ch.t0 + t) * ld + k.global + v, acc, m);
      const Vec<T> gt = load_m<T, F>(g + t * cg + l, m);  // zeros past the block: the sums below are its own
      store(b.dcbias.data() + l, load(b.dcbias.data() + l) + gt);
      for (int64_t j = j0; j < p.W; ++j) {
        T* dw = b.dtaps.data() + j * padded + l;
        store(dw, load(dw) + gt * load_m<T, F>(col + (first + j) * p.ld_x, m));
      }
    });
  };
  // Tokens t .. t + K - 1 past the lead with W taps: dweight and dbias take the block's sums, one
  // read-modify-write per block rather than per token.
  auto block = [&](int64_t t, auto width) {
    constexpr int K = kConvBlock, W = decltype(width)::value;
    const int64_t first = ch.t0 + t - (W - 1);
    const T* rows[K + W - 1];  // g[t + i]
    for (int i = 0; i < K + W - 1; ++i) rows[i] = g_row(t + i);
    over_vectors(p, ch.g, [&](const Cols& k, int64_t v, int64_t m, auto full) {
      constexpr bool F = decltype(full)::value;
      const int64_t l = k.local + v;
      const T* col = p.x + k.global + v;
      Vec<T> gv[K + W - 1], xv[K + W - 1], tap[W];
      for (int i = 0; i < K + W - 1; ++i) {
        gv[i] = load_m<T, F>(rows[i] + l, m);  // zeros past the block, as above
        xv[i] = load_m<T, F>(col + (first + i) * p.ld_x, m);
      }
      prefetch_rows(col, p.ld_x, first + K + W - 1, K, ch.t0 + len - 1);
      for (int j = 0; j < W; ++j) tap[j] = load(ch.taps.data() + j * padded + l);
      Vec<T> gsum = gv[0];
      for (int q = 0; q < K; ++q) {
        Vec<T> acc{};
        for (int j = 0; j < W; ++j) acc += tap[j] * gv[q + (W - 1) - j];
        store_m<T, F>(dpre + (ch.t0 + t + q) * ld + k.global + v, acc, m);
        if (q > 0) gsum += gv[q];
      }
      store(b.dcbias.data() + l, load(b.dcbias.data() + l) + gsum);
      for (int j = 0; j < W; ++j) {
        Vec<T> sum = gv[0] * xv[j];
        for (int q = 1; q < K; ++q) sum += gv[q] * xv[q + j];
        T* dw = b.dtaps.data() + j * padded + l;
        store(dw, load(dw) + sum);
      }
    });
  };
  conv_tokens(ch.lead(), len, p.W, token, block);
  // The new carry: g's rows 0..S-1 from this chunk's first token on (the old carry's past a short chunk).
  for (int64_t i = 0; i < S; ++i) std::memcpy(b.next.data() + i * cg, g_row(i), cg * sizeof(T));
  std::copy_n(b.next.data(), S * cg, b.carry.data());
}

// One (sequence, group): the outputs, the states entering its chunks (hc, when stored) and the final state.
template <typename T>
void fwd_task(const Problem<T>& p, int64_t s, int64_t g, Buffers<T>& b, T* out, T* y_in, T* y_pre, T* final,
              T* hc) {
  const int64_t c = p.chunk, Hg = p.Hg(), P = p.P, N = p.N, w = p.width();
  const int64_t start = p.cu[s], end = p.cu[s + 1];
  Chunk<T>& ch = b.ch;
  ch.set_group(g);
  ch.seq_start = start;
  Scratch<T>&M = b.M, &Wm = b.Wm, &Y = b.Y, &U = b.U;
  std::vector<T>& to_end = b.to_end;
  const int64_t state_at = g * w * N;  // the group's rows in a [H, P, N] state
  const int64_t first = p.chunk_offsets[s], count = p.chunk_offsets[s + 1] - first;
  // The state lives where it is kept: entering chunk n, in hc's row for it (when stored; the backward reads it
  // there), leaving the last chunk, in final's; b.S otherwise. Copying it from one buffer into hc cost a copy of
  // the whole state a chunk (128 KiB for Mamba-2's tiny layer).
  auto kept = [&](int64_t n) -> T* {
    if (n < count) return hc ? hc + (first + n) * p.H * P * N + state_at : b.S.data();
    return final ? final + s * p.H * P * N + state_at : b.S.data();
  };
  bool has_state = p.h0 != nullptr;
  T* S = kept(0);  // the state entering the current chunk
  if (has_state) std::memcpy(S, p.h0 + s * p.H * P * N + state_at, w * N * sizeof(T));
  for (int64_t n = 0; n < count; ++n) {
    const int64_t t0 = start + n * c, len = std::min(c, end - t0);
    ch.load(t0, len, false);
    // The entering state's part: y_in = exp(lcum) (C S^T). A chunk without an entering state (a sequence's
    // first, without h0) leaves its rows of hc and y_in unwritten: the backward reads neither for it.
    if (has_state) {
      gemm<T>(len, w, N, ch.Cm(), {S, N, true}, T(0), Y.data(), w);
      ch.times_decay(Y.data(), Y.data());
      if (y_in)
        for (int64_t t = 0; t < len; ++t) std::memcpy(y_in + ch.row(t), Y.data() + t * w, w * sizeof(T));
    }
    // The chunk's own tokens: per head W (dt' x), one batched product for the group's heads.
    ch.scores(M.data(), b.xt.data());
    ch.masked(M.data(), nullptr, Wm.data());
    for (int64_t hl = 0; hl < Hg; ++hl)
      lower_times(len, P, Wm.data() + hl * c * c, c, ch.xdt.data() + hl * P, w, Y.data() + hl * P, w, has_state);
    for (int64_t t = 0; t < len; ++t) {
      const T* xr = ch.xr(t);
      T* o = out + ch.row(t);
      for (int64_t hl = 0; hl < Hg; ++hl) {
        const T d = p.D ? p.D[g * Hg + hl] : T(0);
        for (int64_t q = 0; q < P; ++q) o[hl * P + q] = Y[t * w + hl * P + q] + d * xr[hl * P + q];
      }
      if (p.z) gate_row(o, y_pre ? y_pre + ch.row(t) : nullptr, p.z + ch.z_row(t), w);
      else if (y_pre && p.norm_w) std::memcpy(y_pre + ch.row(t), o, w * sizeof(T));
      if (p.norm_w) norm_row(o, p.norm_w, p.norm_eps, w);
    }
    // The state leaving the chunk: exp(last) S + U^T B (U^T B alone without an entering state; not needed after
    // the last chunk without a final).
    if (n + 1 < count || final) {
      T* next = kept(n + 1);
      ch.writes(U.data(), to_end.data());
      if (has_state) decay_state(ch, S, next);
      gemm<T>(w, N, len, {U.data(), w, true}, ch.Bm(), has_state ? T(1) : T(0), next, N);
      S = next;
      has_state = true;
    }
  }
  if (final) {  // written by the last chunk, unless the sequence has none
    T* dst = kept(count);
    if (!has_state) std::fill(dst, dst + w * N, T(0));
    else if (S != dst) std::memcpy(dst, S, w * N * sizeof(T));
  }
}

template <typename T>
struct Grads {
  T *dx, *ddt, *dB, *dC, *dz, *dh0;
  T* dparams;  // the task's dA, dD, ddt_bias [3, H] (summed over the tasks afterwards)
  T* dconv;     // with the conv, the task's dweight and dbias [W + 1, Hg P + 2 N] (likewise)
  T* dnorm;     // with the norm, the task's gradient of its weight [H P] (likewise)
  const T *dout, *dht, *hc, *y_in, *y_pre;
};

template <typename T>
void bwd_task(const Problem<T>& p, int64_t s, int64_t g, Buffers<T>& b, const Grads<T>& gr) {
  const int64_t c = p.chunk, Hg = p.Hg(), P = p.P, N = p.N, w = p.width();
  const int64_t start = p.cu[s], end = p.cu[s + 1];
  const int64_t state_at = g * w * N;
  T* dA = gr.dparams;
  T* dD = dA + p.H;
  T* dbias = dD + p.H;
  Chunk<T>& ch = b.ch;
  ch.set_group(g);
  ch.seq_start = start;
  Scratch<T>&dS = b.S, &M = b.M, &L = b.L, &Wm = b.Wm, &dW = b.dW, &dM = b.dM, &U = b.U;
  Scratch<T>&dY = b.Y, &dR = b.dR, &dU = b.dU, &dX = b.dX, &xt = b.xt;
  std::vector<T>&to_end = b.to_end, &dl = b.dl, &dlast = b.dlast;
  bool has_ds = gr.dht != nullptr;  // dS: the gradient of the state leaving the current chunk
  if (has_ds) std::memcpy(dS.data(), gr.dht + s * p.H * P * N + state_at, w * N * sizeof(T));
  if (p.conv()) {  // nothing after the sequence's last token; the task's dweight and dbias start at 0
    std::fill(b.carry.begin(), b.carry.end(), T(0));
    std::fill(b.dtaps.begin(), b.dtaps.end(), T(0));
    std::fill(b.dcbias.begin(), b.dcbias.end(), T(0));
  }
  const int64_t first = p.chunk_offsets[s], count = p.chunk_offsets[s + 1] - first;
  for (int64_t n = count - 1; n >= 0; --n) {
    const int64_t t0 = start + n * c, len = std::min(c, end - t0);
    const bool has_state = p.has_h0 || n > 0;
    const bool wants_ds = n > 0 || gr.dh0;  // the gradient of the entering state
    const T* S = gr.hc + (first + n) * p.H * P * N + state_at;  // the state entering the chunk
    ch.load(t0, len, true);
    // The gradients of x, B and C: into the conv's buffer, or in place.
    T* dB = p.conv() ? b.dact.data() + w : gr.dB + ch.bc_row(0, true);
    T* dC = p.conv() ? dB + N : gr.dC + ch.bc_row(0, true);
    const int64_t ld = p.conv() ? ch.cg : p.ld_dbc;
    std::fill(dl.begin(), dl.end(), T(0));
    // Through the gate and D: dY is the gradient of y = y_in + the chunk's own part.
    for (int64_t t = 0; t < len; ++t) {
      const T* xr = ch.xr(t);
      const T* dor = gr.dout + ch.row(t);
      T* dy = dY.data() + t * w;
      if (p.norm_w) {  // dy: the gradient of the pre-norm output first
        norm_row_bwd(dor, gr.y_pre + ch.row(t), p.z ? p.z + ch.z_row(t) : nullptr, p.norm_w, p.norm_eps,
                     b.pre.data(), b.sg.data(), dy, gr.dnorm, w);
        dor = dy;
      }
      if (p.z) {
        gate_row_bwd(dor, gr.y_pre + ch.row(t), p.z + ch.z_row(t), p.norm_w ? b.sg.data() : nullptr, dy,
                     gr.dz + ch.z_row(t, true), w);
      } else if (!p.norm_w) {
        std::memcpy(dy, dor, w * sizeof(T));
      }
      for (int64_t hl = 0; hl < Hg; ++hl) dD[g * Hg + hl] += dot(dy + hl * P, xr + hl * P, P);
    }
    // The entering state's part: dR = exp(lcum) dY; dC = dR S, dlcum += dY . y_in.
    if (has_state || wants_ds) ch.times_decay(dY.data(), dR.data());
    if (has_state) {
      gemm<T>(len, N, w, {dR.data(), w}, {S, N}, T(0), dC, ld);
      for (int64_t t = 0; t < len; ++t)
        for (int64_t hl = 0; hl < Hg; ++hl)
          dl[hl * c + t] += dot(dY.data() + t * w + hl * P, gr.y_in + ch.row(t) + hl * P, P);
    }
    // The chunk's own tokens, per head (batched): dW = dY (dt' x)^T, d(dt' x) = W^T dY; dM = sum over heads
    // of dW * L; dlcum from E = dW * W below the diagonal (+ for its rows, - for its columns; the diagonal
    // cancels exactly and is left out).
    ch.scores(M.data(), b.xt.data());
    ch.masked(M.data(), L.data(), Wm.data());
    for (int64_t hl = 0; hl < Hg; ++hl) {
      lower_dots(len, P, dY.data() + hl * P, ch.xdt.data() + hl * P, w, xt.data(), dW.data() + hl * c * c, c);
      lower_t_times(len, P, Wm.data() + hl * c * c, c, dY.data() + hl * P, w, dX.data() + hl * P, w);
    }
    std::fill(dM.begin(), dM.end(), T(0));
    for (int64_t hl = 0; hl < Hg; ++hl) {
      T* dlh = dl.data() + hl * c;
      for (int64_t i = 0; i < len; ++i) {
        const T* dw = dW.data() + hl * c * c + i * c;
        const T* wm = Wm.data() + hl * c * c + i * c;
        const T* lm = L.data() + hl * c * c + i * c;
        T* dm = dM.data() + i * c;
        // In vectors, the last one masked (dW's lanes past the diagonal hold whatever lower_dots left).
        by_vectors<T>(i + 1, [&](int64_t j, int64_t m, auto full) {
          constexpr bool F = decltype(full)::value;
          store_m<T, F>(dm + j, load_m<T, F>(dm + j, m) + load_m<T, F>(dw + j, m) * load_m<T, F>(lm + j, m), m);
        });
        by_vectors<T>(i, [&](int64_t j, int64_t m, auto full) {
          constexpr bool F = decltype(full)::value;
          store_m<T, F>(dlh + j, load_m<T, F>(dlh + j, m) - load_m<T, F>(dw + j, m) * load_m<T, F>(wm + j, m), m);
        });
        dlh[i] += dot(dw, wm, i);
      }
    }
    // dC (+)= dM B and dB = dM^T C, dM lower triangular (zeros above its diagonal, as the products want).
    const Mat<T> Bc = ch.Bm(), Cc = ch.Cm();
    lower_times(len, N, dM.data(), c, Bc.data, Bc.ld, dC, ld, has_state);
    lower_t_times(len, N, dM.data(), c, Cc.data, Cc.ld, dB, ld);
    // The state leaving the chunk, S' = exp(last) S + U^T B, with gradient dS: dU = B dS^T, dB += U dS,
    // d(dt' x) += exp(last - lcum) dU, dlcum -= dU . U and dlast += it (the last token's terms cancel),
    // dlast += exp(last) sum(dS * S).
    std::fill(dlast.begin(), dlast.end(), T(0));
    if (has_ds) {
      ch.writes(U.data(), to_end.data());
      gemm<T>(len, w, N, ch.Bm(), {dS.data(), N, true}, T(0), dU.data(), w);
      gemm<T>(len, N, w, {U.data(), w}, {dS.data(), N}, T(1), dB, ld);
      for (int64_t t = 0; t < len; ++t)
        for (int64_t hl = 0; hl < Hg; ++hl) {
          const T e = to_end[hl * c + t];
          const T* du = dU.data() + t * w + hl * P;
          T* dx = dX.data() + t * w + hl * P;
          for (int64_t q = 0; q < P; ++q) dx[q] += e * du[q];
          if (t + 1 < len) {
            const T through_u = dot(du, U.data() + t * w + hl * P, P);
            dl[hl * c + t] -= through_u;
            dlast[hl] += through_u;
          }
        }
      if (has_state)
        for (int64_t hl = 0; hl < Hg; ++hl)
          dlast[hl] += std::exp(ch.last(hl)) * dot(dS.data() + hl * P * N, S + hl * P * N, P * N);
    }
    // The gradient of the entering state: dS <- exp(last) dS + dR^T C (not needed before the first chunk
    // unless h0 wants one).
    if (wants_ds) {
      if (has_ds) decay_state(ch, dS.data(), dS.data());
      gemm<T>(w, N, len, {dR.data(), w, true}, ch.Cm(), has_ds ? T(1) : T(0), dS.data(), N);
      has_ds = true;
    }
    // dlcum -> d(dt' A): its reverse cumulative sum in the chunk, plus dlast at every token.
    for (int64_t hl = 0; hl < Hg; ++hl) {
      T run = dlast[hl];
      for (int64_t t = len - 1; t >= 0; --t) {
        run += dl[hl * c + t];
        dl[hl * c + t] = run;
      }
    }
    for (int64_t t = 0; t < len; ++t) {
      const T* xr = ch.xr(t);
      const T* dy = dY.data() + t * w;
      const T* dxdt = dX.data() + t * w;
      T* dxr = p.conv() ? b.dact.data() + t * ch.cg : gr.dx + ch.x_row(t, true);
      for (int64_t hl = 0; hl < Hg; ++hl) {
        const int64_t h = g * Hg + hl;
        const T d = p.D ? p.D[h] : T(0), dt = ch.dtp[t * Hg + hl], da = dl[hl * c + t];
        for (int64_t q = 0; q < P; ++q) dxr[hl * P + q] = dt * dxdt[hl * P + q] + d * dy[hl * P + q];
        const T ddt = (dot(dxdt + hl * P, xr + hl * P, P) + da * p.A[h]) * ch.ddtp[t * Hg + hl];
        gr.ddt[(t0 + t) * p.ld_ddt + h] = ddt;
        dA[h] += da * dt;
        dbias[h] += ddt;
      }
    }
    if (p.conv()) conv_backward(ch, b, gr.dx, p.ld_dx);
  }
  if (p.conv()) {  // the task's dweight [W, cg] and dbias [cg], rows cg apart
    const int64_t cg = ch.cg, padded = cg + Lanes<T>::W;
    for (int64_t j = 0; j < p.W; ++j) std::copy_n(b.dtaps.data() + j * padded, cg, gr.dconv + j * cg);
    std::copy_n(b.dcbias.data(), cg, gr.dconv + p.W * cg);
  }
  if (gr.dh0) {
    T* dst = gr.dh0 + s * p.H * P * N + state_at;
    if (has_ds) std::memcpy(dst, dS.data(), w * N * sizeof(T));
    else std::fill(dst, dst + w * N, T(0));
  }
}

// The values in a row of t [L, ...].
int64_t row_size(const at::Tensor& t) {
  int64_t n = 1;
  for (int64_t d = 1; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

// The distance between the rows of t [L, ...] (a stride of a dimension of size 1 means nothing: then the row's
// size); 0 for an absent t.
int64_t row_stride(const at::Tensor& t) {
  if (!t.defined() || t.numel() == 0) return 0;
  return t.size(0) > 1 ? t.stride(0) : row_size(t);
}

template <typename T>
Problem<T> problem(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& B, const at::Tensor& C,
                   const at::Tensor& z, const at::Tensor& A, const at::Tensor& D, const at::Tensor& dt_bias,
                   const at::Tensor& h0, const at::Tensor& cu_seqlens, const at::Tensor& chunk_offsets,
                   int64_t chunk, bool softplus, double lo, double hi) {
  return Problem<T>{x.data_ptr<T>(), dt.data_ptr<T>(), B.data_ptr<T>(), C.data_ptr<T>(), data_or_null<T>(z),
                    A.data_ptr<T>(), data_or_null<T>(D), data_or_null<T>(dt_bias), data_or_null<T>(h0),
                    cu_seqlens.data_ptr<int64_t>(), chunk_offsets.data_ptr<int64_t>(), x.size(1), x.size(2),
                    B.size(1), B.size(2), chunk, row_stride(x), row_stride(B), row_stride(z), row_stride(dt),
                    0, 0, 0, 0, nullptr, nullptr, 0, nullptr, 0, h0.defined() && h0.numel() > 0, softplus,
                    static_cast<T>(lo), static_cast<T>(hi)};
}

// Whether each tensor's rows start where the one before's end (row strides apart, one tensor's column blocks).
bool side_by_side(std::initializer_list<const at::Tensor*> blocks, int64_t row) {
  const at::Tensor* before = nullptr;
  for (const at::Tensor* t : blocks) {
    if (t->size(0) > 1 && t->stride(0) != row) return false;
    if (before && t->data_ptr() != static_cast<char*>(before->data_ptr()) + row_size(*before) * t->element_size())
      return false;
    before = t;
  }
  return true;
}

// x, B and C are the column blocks of one [L, H P + 2 G N] tensor (x, then B, then C), or of a wider one's
// columns (Mamba-2's in_proj output).
bool column_blocks(const at::Tensor& x, const at::Tensor& B, const at::Tensor& C) {
  return side_by_side({&x, &B, &C}, row_stride(x));
}

// z, x, B, C and dt are the column blocks of Mamba-2's in_proj output [L, 2 H P + 2 G N + H], in that order.
bool in_proj_blocks(const at::Tensor& z, const at::Tensor& x, const at::Tensor& B, const at::Tensor& C,
                    const at::Tensor& dt) {
  return z.defined() && z.numel() > 0 &&
         side_by_side({&z, &x, &B, &C, &dt}, 2 * x.size(1) * x.size(2) + 2 * B.size(1) * B.size(2) + x.size(1));
}

// The conv inside the chunks, when conv_weight is given: weight [H P + 2 G N, W] (1 <= W <= 16) and bias
// [H P + 2 G N] or none, like x; x, B and C its input's column blocks. Returns the two as tensors (empty without).
std::pair<at::Tensor, at::Tensor> conv_args(const at::Tensor& x, const at::Tensor& B, const at::Tensor& C,
                                            const c10::optional<at::Tensor>& weight,
                                            const c10::optional<at::Tensor>& bias) {
  const at::Tensor w = opt_or_empty(weight), b = opt_or_empty(bias);
  if (!w.defined() || w.numel() == 0) {
    TORCH_CHECK(!b.defined() || b.numel() == 0, "ssd_cpu: conv_bias without conv_weight");
    return {w, b};
  }
  const int64_t width = x.size(1) * x.size(2) + 2 * B.size(1) * B.size(2);
  TORCH_CHECK(w.dim() == 2 && w.size(0) == width && w.size(1) >= 1 && w.size(1) <= kMaxConvWidth,
              "ssd_cpu: conv_weight must be [H P + 2 G N, W] with 1 <= W <= ", kMaxConvWidth, ", got ", w.sizes());
  TORCH_CHECK(!b.defined() || b.numel() == 0 || (b.dim() == 1 && b.size(0) == width),
              "ssd_cpu: conv_bias must be [H P + 2 G N], got ", b.sizes());
  check_tensors("ssd_cpu", {w, b}, &x, "x");
  TORCH_CHECK(column_blocks(x, B, C), "ssd_cpu: with the conv, x, B and C must be the column blocks of one "
              "[L, H P + 2 G N] tensor");
  return {w, b};
}

// The output norm's weight [H P] (or empty when absent): the norm spans a token's heads, so one group.
at::Tensor norm_arg(const at::Tensor& x, const at::Tensor& B, const c10::optional<at::Tensor>& weight) {
  const at::Tensor w = opt_or_empty(weight);
  if (!w.defined() || w.numel() == 0) return w;
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(1) * x.size(2), "ssd_cpu: norm_weight must be [H P], got ",
              w.sizes());
  TORCH_CHECK(B.size(1) == 1, "ssd_cpu: the output norm needs one group of B and C, got ", B.size(1));
  check_tensors("ssd_cpu", {w}, &x, "x");
  return w;
}

template <typename T>
void set_norm(Problem<T>& p, const at::Tensor& weight, double eps) {
  if (!weight.defined() || weight.numel() == 0) return;
  p.norm_w = weight.data_ptr<T>();
  p.norm_eps = static_cast<T>(eps);
}

template <typename T>
void set_conv(Problem<T>& p, const at::Tensor& weight, const at::Tensor& bias) {
  if (!weight.defined() || weight.numel() == 0) return;
  p.conv_w = weight.data_ptr<T>();
  p.conv_b = data_or_null<T>(bias);
  p.W = weight.size(1);
}

// task(sequence, group, buffers) for every (sequence, group), the buffers allocated once per thread's range, with
// denormals flushed in each thread (the decays far down a chunk are denormal: vec_cpu.h).
template <typename T, typename F>
void over_groups(const Problem<T>& p, int64_t nseq, const F& task) {
  at::parallel_for(0, nseq * p.G, 1, [&](int64_t begin, int64_t end) {
    const FlushDenormals flush;
    Buffers<T> buffers(p);
    for (int64_t i = begin; i < end; ++i) task(i / p.G, i % p.G, buffers);
  });
}

// x and z (or none) [L, H, P], B and C [L, G, N] with G dividing H, dt [L, H]: on the CPU in x's dtype, each
// token's row contiguous (B's and C's rows equally far apart). The rows may be further apart than their size:
// Mamba-2's layer hands the column blocks of its projections as they are.
void check_rows(const at::Tensor& x, const at::Tensor& B, const at::Tensor& C, const at::Tensor& z,
                const at::Tensor& dt) {
  const bool gated = z.defined() && z.numel() > 0;
  TORCH_CHECK(x.dim() == 3 && B.dim() == 3 && C.sizes() == B.sizes() && x.size(1) % B.size(1) == 0 &&
                  (!gated || z.sizes() == x.sizes()) && dt.dim() == 2 && dt.size(0) == x.size(0) &&
                  dt.size(1) == x.size(1),
              "ssd_cpu: x and z must be [L, H, P], B and C [L, G, N] with G dividing H, dt [L, H]");
  for (const auto* t : {&x, &B, &C, &z, &dt}) {
    if (t == &z && !gated) continue;
    const int64_t n = t->dim();
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == x.scalar_type(),
                "ssd_cpu: x, B, C, z and dt must be CPU tensors of one dtype");
    TORCH_CHECK((t->size(n - 1) <= 1 || t->stride(n - 1) == 1) &&
                    (n == 2 || t->size(1) <= 1 || t->stride(1) == t->size(2)) && row_stride(*t) >= row_size(*t),
                "ssd_cpu: x, B, C, z and dt must have contiguous rows");
  }
  TORCH_CHECK(row_stride(B) == row_stride(C), "ssd_cpu: B's and C's rows must be equally far apart");
}

void check_sizes(const at::Tensor& x, const at::Tensor& B, const at::Tensor& cu_seqlens,
                 const at::Tensor& chunk_offsets, int64_t chunk) {
  check_offsets("ssd_cpu", cu_seqlens, chunk_offsets);
  TORCH_CHECK(chunk > 0 && chunk % 16 == 0, "ssd_cpu: chunk must be a positive multiple of 16");
}

}  // namespace

// Returns (out [L, H, P], the final state [Nseq, H, P, N] or empty, and when store_chunks the states entering
// every chunk [NC, H, P, N], y_in = the entering states' part of y [L, H, P] (both unset for chunks without an
// entering state), and with z or the norm y + D x before the gate and the norm [L, H, P] (else empty)). With
// norm_weight [H P] (one group only) the output is RMS-normalised over each token's H P values after the gate:
// out = g / sqrt(mean(g^2) + norm_eps) * norm_weight, Mamba-2's gated norm, so that the layer's norm needs no
// pass of its own over the output and its gradient (docs/design.md, "Twenty-seventh round").
std::vector<at::Tensor> ssd_fwd(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& B,
                                const at::Tensor& C, const c10::optional<at::Tensor>& z, const at::Tensor& A,
                                const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& dt_bias,
                                const c10::optional<at::Tensor>& conv_weight,
                                const c10::optional<at::Tensor>& conv_bias,
                                const c10::optional<at::Tensor>& norm_weight, double norm_eps,
                                const c10::optional<at::Tensor>& h0, const at::Tensor& cu_seqlens,
                                const at::Tensor& chunk_offsets, int64_t chunk, int64_t num_chunks, bool softplus,
                                double lo, double hi, bool store_final, bool store_chunks) {
  const at::Tensor zt = opt_or_empty(z), Dt = opt_or_empty(D), bt = opt_or_empty(dt_bias), ht0 = opt_or_empty(h0);
  check_rows(x, B, C, zt, dt);
  check_tensors("ssd_cpu", {A, Dt, bt, ht0}, &x, "x");
  check_sizes(x, B, cu_seqlens, chunk_offsets, chunk);
  const auto [cw, cb] = conv_args(x, B, C, conv_weight, conv_bias);
  const at::Tensor nw = norm_arg(x, B, norm_weight);
  const bool normed = nw.defined() && nw.numel() > 0;
  const int64_t nseq = cu_seqlens.numel() - 1, H = x.size(1), P = x.size(2), G = B.size(1), N = B.size(2);
  const auto empty = at::empty({0}, x.options());
  const int64_t L = x.size(0);
  at::Tensor out = at::empty({L, H, P}, x.options());
  at::Tensor ht = store_final ? at::empty({nseq, H, P, N}, x.options()) : empty;
  at::Tensor hc = store_chunks ? at::empty({num_chunks, H, P, N}, x.options()) : empty;
  at::Tensor y_in = store_chunks ? at::empty_like(out) : empty;
  const bool gated = zt.defined() && zt.numel() > 0;
  at::Tensor y_pre = store_chunks && (gated || normed) ? at::empty_like(out) : empty;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ssd_fwd", [&] {
    auto p = problem<scalar_t>(x, dt, B, C, zt, A, Dt, bt, ht0, cu_seqlens, chunk_offsets, chunk, softplus, lo,
                               hi);
    set_conv(p, cw, cb);
    set_norm(p, nw, norm_eps);
    over_groups(p, nseq, [&](int64_t s, int64_t g, Buffers<scalar_t>& b) {
      fwd_task<scalar_t>(p, s, g, b, out.data_ptr<scalar_t>(), data_or_null<scalar_t>(y_in),
                         data_or_null<scalar_t>(y_pre), data_or_null<scalar_t>(ht), data_or_null<scalar_t>(hc));
    });
  });
  return {out, ht, hc, y_in, y_pre};
}

// Returns dx, ddt, dB, dC, dz (or empty), dA, dD (or empty), ddt_bias (or empty), dh0 (or empty), dconv_weight
// and dconv_bias (or empty), dnorm_weight (or empty). With packed, x, B and C are the column blocks of one
// tensor [L, H P + 2 G N] (x, then B, then C), and dx is one tensor of that layout holding dx, dB and dC (dB and
// dC are then empty); with the conv (packed required), it holds the gradient of the conv's input. With in_proj
// (packed and z required), z, x, B, C and dt are the column blocks of Mamba-2's in_proj output [L, 2 H P + 2 G N
// + H], and dx is one tensor of that layout holding dz and ddt too (both then empty): the projection's backward
// is one product each for its input's and its weight's gradients (docs/design.md, "Thirtieth round").
std::vector<at::Tensor> ssd_bwd(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& B,
                                const at::Tensor& C, const c10::optional<at::Tensor>& z, const at::Tensor& A,
                                const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& dt_bias,
                                const c10::optional<at::Tensor>& conv_weight,
                                const c10::optional<at::Tensor>& conv_bias,
                                const c10::optional<at::Tensor>& norm_weight, double norm_eps,
                                bool has_h0, const at::Tensor& cu_seqlens, const at::Tensor& chunk_offsets,
                                const at::Tensor& hc, const at::Tensor& y_in, const at::Tensor& y_pre,
                                int64_t chunk, bool softplus, double lo, double hi, const at::Tensor& dout,
                                const c10::optional<at::Tensor>& dht, bool need_dh0, bool packed, bool in_proj) {
  const at::Tensor zt = opt_or_empty(z), Dt = opt_or_empty(D), bt = opt_or_empty(dt_bias), dhtt = opt_or_empty(dht);
  check_rows(x, B, C, zt, dt);
  check_tensors("ssd_cpu", {A, Dt, bt, hc, y_in, y_pre, dout, dhtt}, &x, "x");
  check_sizes(x, B, cu_seqlens, chunk_offsets, chunk);
  const int64_t nseq = cu_seqlens.numel() - 1, L = x.size(0), H = x.size(1), P = x.size(2), G = B.size(1),
                N = B.size(2);
  const auto empty = at::empty({0}, x.options());
  const bool gated = zt.defined() && zt.numel() > 0;
  const int64_t width = H * P + 2 * G * N;
  TORCH_CHECK(!packed || column_blocks(x, B, C),
              "ssd_cpu: packed x, B and C must be the column blocks of one [L, H P + 2 G N] tensor");
  TORCH_CHECK(!in_proj || (packed && in_proj_blocks(zt, x, B, C, dt)),
              "ssd_cpu: with in_proj, z, x, B, C and dt must be the column blocks of one [L, 2 H P + 2 G N + H] "
              "tensor");
  const int64_t before = in_proj ? H * P : 0, row = before + width + (in_proj ? H : 0);  // the gradient's layout
  const auto [cw, cb] = conv_args(x, B, C, conv_weight, conv_bias);
  const bool conv = cw.defined() && cw.numel() > 0;
  const at::Tensor nw = norm_arg(x, B, norm_weight);
  const bool normed = nw.defined() && nw.numel() > 0;
  TORCH_CHECK(!normed || y_pre.numel() == x.numel(), "ssd_cpu: the norm's backward needs y_pre");
  at::Tensor dnorm = normed ? at::zeros({nseq * G, H * P}, x.options()) : empty;
  TORCH_CHECK(!conv || packed, "ssd_cpu: the conv's backward writes the packed gradient (packed=True)");
  const int64_t cg = H / G * P + 2 * N, W = conv ? cw.size(1) : 0;
  at::Tensor dconv = conv ? at::empty({nseq * G, W + 1, cg}, x.options()) : empty;
  at::Tensor dx = packed ? at::empty({L, row}, x.options()) : at::empty({L, H, P}, x.options());
  at::Tensor dB = packed ? empty : at::empty({L, G, N}, x.options()), dC = packed ? empty : at::empty_like(dB);
  at::Tensor ddt = in_proj ? empty : at::empty({L, H}, x.options());
  at::Tensor dz = gated && !in_proj ? at::empty({L, H, P}, x.options()) : empty;
  at::Tensor dh0 = need_dh0 ? at::empty({nseq, H, P, N}, x.options()) : empty;
  at::Tensor dparams = at::zeros({nseq * G, 3, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ssd_bwd", [&] {
    auto p = problem<scalar_t>(x, dt, B, C, zt, A, Dt, bt, empty, cu_seqlens, chunk_offsets, chunk, softplus, lo,
                               hi);
    p.has_h0 = has_h0;
    p.ld_dx = packed ? row : H * P;
    p.ld_dbc = packed ? row : G * N;
    p.ld_dz = in_proj ? row : H * P;
    p.ld_ddt = in_proj ? row : H;
    set_conv(p, cw, cb);
    set_norm(p, nw, norm_eps);
    scalar_t* dzp = in_proj ? dx.data_ptr<scalar_t>() : data_or_null<scalar_t>(dz);
    scalar_t* dxp = dx.data_ptr<scalar_t>() + before;
    scalar_t* dBp = packed ? dxp + H * P : dB.data_ptr<scalar_t>();
    scalar_t* dCp = packed ? dBp + G * N : dC.data_ptr<scalar_t>();
    scalar_t* ddtp = in_proj ? dCp + G * N : ddt.data_ptr<scalar_t>();
    Grads<scalar_t> gr{dxp, ddtp, dBp, dCp, dzp, data_or_null<scalar_t>(dh0),
                       nullptr, nullptr, nullptr, dout.data_ptr<scalar_t>(), data_or_null<scalar_t>(dhtt),
                       hc.data_ptr<scalar_t>(), data_or_null<scalar_t>(y_in), data_or_null<scalar_t>(y_pre)};
    scalar_t* params = dparams.data_ptr<scalar_t>();
    over_groups(p, nseq, [&](int64_t s, int64_t g, Buffers<scalar_t>& b) {
      Grads<scalar_t> own = gr;
      own.dparams = params + (s * G + g) * 3 * H;
      if (conv) own.dconv = dconv.data_ptr<scalar_t>() + (s * G + g) * (W + 1) * cg;
      if (normed) own.dnorm = dnorm.data_ptr<scalar_t>() + (s * G + g) * H * P;
      bwd_task<scalar_t>(p, s, g, b, own);
    });
  });
  // The tasks' sums added in task order, one tensor per parameter (a custom op's outputs may not alias).
  std::vector<at::Tensor> sums;
  for (int64_t k = 0; k < 3; ++k) sums.push_back(at::empty({H}, x.options()));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ssd_bwd_sums", [&] {
    const scalar_t* src = dparams.data_ptr<scalar_t>();
    for (int64_t k = 0; k < 3; ++k) {
      scalar_t* dst = sums[k].data_ptr<scalar_t>();
      for (int64_t h = 0; h < H; ++h) {
        scalar_t acc = 0;
        for (int64_t task = 0; task < nseq * G; ++task) acc += src[(task * 3 + k) * H + h];
        dst[h] = acc;
      }
    }
  });
  // The conv's: each group's columns summed over the sequences in order, to dweight [width, W] and dbias.
  at::Tensor dweight = conv ? at::empty({width, W}, x.options()) : empty;
  at::Tensor dcbias = conv && cb.defined() && cb.numel() > 0 ? at::empty({width}, x.options()) : empty;
  if (conv) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ssd_bwd_conv_sums", [&] {
      const scalar_t* src = dconv.data_ptr<scalar_t>();
      scalar_t* dw = dweight.data_ptr<scalar_t>();
      scalar_t* db = data_or_null<scalar_t>(dcbias);
      for (int64_t g = 0; g < G; ++g)
        for (const Cols& k : group_cols(H, P, G, N, g))
          for (int64_t i = 0; i < k.count; ++i)
            for (int64_t j = 0; j <= W; ++j) {
              scalar_t acc = 0;
              for (int64_t s = 0; s < nseq; ++s) acc += src[((s * G + g) * (W + 1) + j) * cg + k.local + i];
              if (j < W) dw[(k.global + i) * W + j] = acc;
              else if (db) db[k.global + i] = acc;
            }
    });
  }
  // The norm's weight: the tasks' rows summed (torch's sum over the first dim: the same order every call).
  at::Tensor dnorm_weight = normed ? dnorm.sum(0) : empty;
  return {dx, ddt, dB, dC, dz, sums[0], Dt.defined() && Dt.numel() > 0 ? sums[1] : empty,
          bt.defined() && bt.numel() > 0 ? sums[2] : empty, dh0, dweight, dcbias, dnorm_weight};
}

void bind_ssd(pybind11::module& m) {
  m.def("ssd_fwd", &ssd_fwd, "Mamba-2's SSD, chunked forward (CPU)");
  m.def("ssd_bwd", &ssd_bwd, "Mamba-2's SSD, chunked backward (CPU)");
}
