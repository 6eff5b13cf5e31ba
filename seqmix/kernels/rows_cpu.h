// Row operations of the C++ CPU kernels, written once for the short conv's step (conv/conv_step_cpu.cpp), the
// row norms (row_norm_cpu.cpp, norm/rms_norm_cpu.cpp), the layers' decoding steps (recurrent_step_cpu.cpp,
// mlp_step_cpu.cpp, attention_step_cpu.cpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "vec_cpu.h"

namespace seqmix_cpu {

// conv_window_row's loop, with the width W an int64_t or a std::integral_constant (then its loops over the taps
// unroll and the compiler vectorises over the channels).
template <typename T, typename Width>
inline void conv_window_loop(const T* x, const T* w, const T* bias, const T* s, T* next, T* out, int64_t D,
                             Width W) {
  const int64_t S = W - 1;
  for (int64_t d = 0; d < D; ++d) {
    const T *sd = s + d * S, *wd = w + d * W;
    T* nd = next + d * S;
    T acc = bias ? bias[d] : T(0);
    for (int64_t j = 0; j < S; ++j) acc += wd[j] * sd[j];
    acc += wd[S] * x[d];
    for (int64_t j = 0; j + 1 < S; ++j) nd[j] = sd[j + 1];
    if (S > 0) nd[S - 1] = x[d];
    out[d] = acc;
  }
}

// The short conv's window step over one row of D channels (weight [D, W], bias [D] or null, s and next
// [D, W-1] oldest first): out = bias + sum_j weight[:, j] window[:, j] over the window of s followed by x,
// before any activation, and next, the window's last W-1 columns (seqmix/kernels/conv/step.py). A width up to 8
// is a constant of the loop: 4x faster at W = 4 and 640 channels than counted (2.0 -> 0.5 us; docs/design.md,
// "Twenty-ninth round").
template <typename T>
inline void conv_window_row(const T* x, const T* w, const T* bias, const T* s, T* next, T* out, int64_t D,
                            int64_t W) {
  if (W > 8) return conv_window_loop(x, w, bias, s, next, out, D, W);
  as_constant<8>(W, [&](auto width) { conv_window_loop(x, w, bias, s, next, out, D, width); });
}

// SiLU of n values in place, a vector at a time (libm's exp is one call per element).
template <typename T>
inline void silu_inplace(T* v, int64_t n) {
  constexpr int L = Lanes<T>::W;
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    const Vec<T> x = load(v + i);
    store(v + i, x / (T(1) + exp_v<T>(-x)));
  }
  if (i < n) {
    const Vec<T> x = load_part(v + i, n - i);
    store_part(v + i, x / (T(1) + exp_v<T>(-x)), n - i);
  }
}

// out = silu(g) up over a row of n values (the SwiGLU MLP's activation), in silu_inplace's operations.
template <typename T>
inline void swiglu_row(const T* g, const T* up, T* out, int64_t n) {
  constexpr int L = Lanes<T>::W;
  for (int64_t i = 0; i < n; i += L) {
    const Vec<T> x = load_upto(g + i, n - i);
    store_upto(out + i, x / (T(1) + exp_v<T>(-x)) * load_upto(up + i, n - i), n - i);
  }
}

// 1 / sqrt(sum(x^2) inv_n + eps) over a row of n values: RMSNorm's scale with inv_n = 1 / n, the L2 norm's
// with inv_n = 1 (seqmix/archs/modules.py). The sum in vectors (dot): a scalar running sum does not vectorise.
template <typename T>
inline T rms_scale(const T* x, int64_t n, T inv_n, double eps) {
  return T(1) / std::sqrt(dot(x, x, n) * inv_n + T(eps));
}

// y [rows, out] = x [rows, n] m^T for a row-major matrix m [out, n] and a few rows x (a layer's weight W, so x W^T;
// attention's keys, so the scores k q), x contiguous, y's rows ldy apart. W rows of m at a time: their dot products
// as W vectors of partial sums, reduced together (lane_sums), where one dot product's lane sum per row would cost
// more than its multiply-adds; the last rows one dot product each. A decoding step's product: MKL's general one reads
// a weight at a fraction of the speed (docs/design.md, "Eighteenth round"). Within the W rows, kRowsTogether rows of
// m walk x together, each sum in the order of one dot product (so the grouping does not change a bit, and a row's
// result is the same in any batch and any split of m's rows among threads), with the lines kPrefetchBytes ahead
// asked for: a token's weights come from L3, and the W rows' W streams at once, unprefetched, read them at ~45 GB/s,
// 4 rows at a time ~4 KiB ahead at ~58 GB/s (docs/design.md, "Twenty-first round"). Those kRowsTogether rows of m,
// read once, serve every row of x from L1 (up to kInputRowsTogether at a time, their sums in registers): a batch of
// rows reads the weight once instead of once a row (docs/design.md, "Twenty-fourth round").
constexpr int kRowsTogether = 4;
constexpr int kInputRowsTogether = 4;
constexpr int64_t kBatchRows = 8;  // rows of x whose partial sums a pass over m keeps (on the stack)
constexpr int64_t kPrefetchBytes = 4096;

// The partial sums P[b][i0 + j] (b < NR input rows from x, row stride n) of R rows of m from `rows`.
template <typename T, int R, int NR>
inline void partial_sums(const T* rows, const T* x, int64_t n, Vec<T> (*P)[Lanes<T>::W], int i0) {
  constexpr int W = Lanes<T>::W;
  constexpr int64_t ahead = kPrefetchBytes / sizeof(T);
  Vec<T> acc[NR][R];
  for (int b = 0; b < NR; ++b)
    for (int j = 0; j < R; ++j) acc[b][j] = Vec<T>{};
  for (int64_t d = 0; d < n; d += W) {
    Vec<T> w[R];
    for (int j = 0; j < R; ++j) {
      __builtin_prefetch(rows + j * n + d + ahead);  // past the matrix's end it is a no-op (never faults)
      w[j] = load_upto(rows + j * n + d, n - d);
    }
    for (int b = 0; b < NR; ++b) {
      const Vec<T> xd = load_upto(x + b * n + d, n - d);
      for (int j = 0; j < R; ++j) acc[b][j] += xd * w[j];
    }
  }
  for (int b = 0; b < NR; ++b)
    for (int j = 0; j < R; ++j) P[b][i0 + j] = acc[b][j];
}

// matrix_times_rows over at most kBatchRows rows.
template <typename T>
inline void matrix_times_batch(const T* m, const T* x, T* y, int64_t rows, int64_t out, int64_t n, int64_t ldy) {
  constexpr int W = Lanes<T>::W, R = W < kRowsTogether ? W : kRowsTogether;  // both powers of 2: R divides W
  constexpr int B = kInputRowsTogether;
  const LaneSums<T>& sums = lane_sums<T>();
  Vec<T> P[kBatchRows][W];  // each row's W partial sums of a block of m's rows
  int64_t o = 0;
  for (; o + W <= out; o += W) {
    for (int i0 = 0; i0 < W; i0 += R) {
      const T* block = m + (o + i0) * n;
      int64_t b = 0;
      for (; b + B <= rows; b += B) partial_sums<T, R, B>(block, x + b * n, n, P + b, i0);
      switch (rows - b) {  // the rows left, fewer than B
        case 3: partial_sums<T, R, 3>(block, x + b * n, n, P + b, i0); break;
        case 2: partial_sums<T, R, 2>(block, x + b * n, n, P + b, i0); break;
        case 1: partial_sums<T, R, 1>(block, x + b * n, n, P + b, i0); break;
        default: break;
      }
    }
    for (int64_t b = 0; b < rows; ++b) sums(P[b], y + b * ldy + o);
  }
  for (; o < out; ++o)
    for (int64_t b = 0; b < rows; ++b) y[b * ldy + o] = dot(x + b * n, m + o * n, n);
}

// y [out] = m [out, n] x [n]: matrix_times_rows of one row, the same sums with a buffer of one row's partial sums
// (through matrix_times_batch's of kBatchRows, one row took ~10% longer: an MLP step's fastest of 60 rounds of 400,
// 11.3-11.8 us against 10.3-10.5).
template <typename T>
inline void matrix_times_row(const T* m, const T* x, T* y, int64_t out, int64_t n) {
  constexpr int W = Lanes<T>::W, R = W < kRowsTogether ? W : kRowsTogether;
  const LaneSums<T>& sums = lane_sums<T>();
  int64_t o = 0;
  for (; o + W <= out; o += W) {
    Vec<T> P[1][W];
    for (int i0 = 0; i0 < W; i0 += R) partial_sums<T, R, 1>(m + (o + i0) * n, x, n, P, i0);
    sums(P[0], y + o);
  }
  for (; o < out; ++o) y[o] = dot(x, m + o * n, n);
}

// y [rows, out] (rows ldy values apart) = x [rows, n] m^T; ldy is out unless y is a block of a wider output's columns.
template <typename T>
inline void matrix_times_rows(const T* m, const T* x, T* y, int64_t rows, int64_t out, int64_t n, int64_t ldy) {
  if (rows == 1) return matrix_times_row(m, x, y, out, n);
  for (int64_t b = 0; b < rows; b += kBatchRows)
    matrix_times_batch(m, x + b * n, y + b * ldy, std::min<int64_t>(kBatchRows, rows - b), out, n, ldy);
}

}  // namespace seqmix_cpu
