// Row operations of the C++ CPU kernels, written once for the short conv's step (conv/conv_step_cpu.cpp), the
// row norms (row_norm_cpu.cpp, norm/rms_norm_cpu.cpp), the layers' decoding steps (recurrent_step_cpu.cpp,
// mlp_step_cpu.cpp, attention_step_cpu.cpp).
#pragma once

#include <cmath>
#include <cstdint>

#include "vec_cpu.h"

namespace seqmix_cpu {

// The short conv's window step over one row of D channels (weight [D, W], bias [D] or null, s and next
// [D, W-1] oldest first): out = bias + sum_j weight[:, j] window[:, j] over the window of s followed by x,
// before any activation, and next, the window's last W-1 columns (seqmix/kernels/conv/step.py).
template <typename T>
inline void conv_window_row(const T* x, const T* w, const T* bias, const T* s, T* next, T* out, int64_t D,
                            int64_t W) {
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

// 1 / sqrt(sum(x^2) inv_n + eps) over a row of n values: RMSNorm's scale with inv_n = 1 / n, the L2 norm's
// with inv_n = 1 (seqmix/archs/modules.py). The sum in vectors (dot): a scalar running sum does not vectorise.
template <typename T>
inline T rms_scale(const T* x, int64_t n, T inv_n, double eps) {
  return T(1) / std::sqrt(dot(x, x, n) * inv_n + T(eps));
}

// y [out] = m [out, n] x [n]: one row x times a row-major matrix (a layer's weight W, so x W^T; attention's keys,
// so the scores k q). W rows of m at a time: their dot products as W vectors of partial sums, reduced together
// (lane_sums), where one dot product's lane sum per row would cost more than its multiply-adds; the last rows
// one dot product each. A decoding step's product: MKL's general one reads a weight at a fraction of the speed
// (docs/design.md, "Eighteenth round"). Within the W rows, kRowsTogether rows walk x together, each row's sum in
// the order of one dot product (so the grouping does not change a bit), with the lines kPrefetchBytes ahead
// asked for: a token's weights come from L3, and the W rows' W streams at once, unprefetched, read them at
// ~45 GB/s, 4 rows at a time ~4 KiB ahead at ~58 GB/s (docs/design.md, "Twenty-first round").
constexpr int kRowsTogether = 4;
constexpr int64_t kPrefetchBytes = 4096;

template <typename T>
inline void matrix_times_row(const T* m, const T* x, T* y, int64_t out, int64_t n) {
  constexpr int W = Lanes<T>::W, R = W < kRowsTogether ? W : kRowsTogether;  // both powers of 2: R divides W
  constexpr int64_t ahead = kPrefetchBytes / sizeof(T);
  const LaneSums<T>& sums = lane_sums<T>();
  int64_t o = 0;
  for (; o + W <= out; o += W) {
    Vec<T> P[W];
    for (int i0 = 0; i0 < W; i0 += R) {
      const T* rows = m + (o + i0) * n;
      Vec<T> acc[R];
      for (int j = 0; j < R; ++j) acc[j] = Vec<T>{};
      for (int64_t d = 0; d < n; d += W) {
        const Vec<T> xd = load_upto(x + d, n - d);
        for (int j = 0; j < R; ++j) {
          __builtin_prefetch(rows + j * n + d + ahead);  // past the matrix's end it is a no-op (never faults)
          acc[j] += xd * load_upto(rows + j * n + d, n - d);
        }
      }
      for (int j = 0; j < R; ++j) P[i0 + j] = acc[j];
    }
    sums(P, y + o);
  }
  for (; o < out; ++o) y[o] = dot(x, m + o * n, n);
}

}  // namespace seqmix_cpu
