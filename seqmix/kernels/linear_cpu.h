// A decoding step's projections inside its one C++ call (the layers' steps in recurrent_step_cpu.cpp and
// attention_step_cpu.cpp, the MLP's in mlp_step_cpu.cpp): x [rows, in] times a layer's weight w [out, in]
// transposed, as F.linear computes it. At a decoding step's few rows the product is matrix_times_rows' (rows_cpu.h),
// which reads a weight of the tiny LM's sizes 40-50% faster than ATen's one-row product, once for all the rows, and
// no call from Python is made for it (docs/design.md, "Nineteenth round"); more rows are ATen's matrix product.
#pragma once

#include "torch_cpu.h"

#include <algorithm>
#include <cstdint>

#include "rows_cpu.h"

namespace seqmix_cpu {

constexpr int64_t kFewRows = 8;  // rows up to which the products are matrix_times_rows'; more take ATen's

// The least share of a weight's values a thread task takes (64 KiB in float32): a parallel region costs ~1 us here,
// about what the product of such a share takes alone. Smaller weights stay on the calling thread, and a larger one
// wakes no more tasks than it has shares (at::parallel_for's grain), whatever the number of threads.
constexpr int64_t kWeightValuesPerTask = 1 << 14;

// y [rows, out] = x [rows, n] m^T (matrix_times_rows) with m's rows split among the threads in blocks of W, the
// same rows to the same thread at every call. A decoding token reads each weight once: on one core a weight set
// past its L2 comes from L3 every token, while split so, each core's share can stay in its own L2 (the tiny
// Mamba-2 LM's products, 2.4 MB, 50 -> 22 us a token on two cores; docs/design.md, "Twenty-ninth round").
// A row's sums do not depend on the split, so the result is the same for any number of threads.
template <typename T>
inline void weight_times_rows(const T* m, const T* x, T* y, int64_t rows, int64_t out, int64_t n) {
  constexpr int64_t W = Lanes<T>::W;
  const int64_t blocks = out / W;  // whole blocks; the last task takes the rows past them
  const int64_t grain = std::max<int64_t>(1, kWeightValuesPerTask / std::max<int64_t>(W * n, 1));
  if (blocks < 2 * grain) return matrix_times_rows(m, x, y, rows, out, n, out);
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    const int64_t o0 = begin * W, o1 = end == blocks ? out : end * W;
    matrix_times_rows(m + o0 * n, x, y + o0, rows, o1 - o0, n, out);
  });
}

// x w^T for x [rows, in] and w [out, in], both float32 or both float64; `kernel` names the caller in errors.
inline at::Tensor times_weight(const at::Tensor& x, const at::Tensor& w, const char* kernel) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), kernel, ": a projection of x [rows, ",
              x.dim() == 2 ? x.size(1) : -1, "] needs a weight [out, ", x.dim() == 2 ? x.size(1) : -1, "], got ",
              w.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, kernel,
              ": float32 or float64 only, got ", x.scalar_type());
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), kernel, ": the projection's weight must have x's dtype ",
              x.scalar_type(), ", got ", w.scalar_type());
  const int64_t rows = x.size(0), in = x.size(1), out = w.size(0);
  if (rows > kFewRows) return at::mm(x, w.t());
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  at::Tensor y = at::empty({rows, out}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "times_weight", [&] {
    using T = scalar_t;
    weight_times_rows(wc.data_ptr<T>(), xc.data_ptr<T>(), y.data_ptr<T>(), rows, out, in);
  });
  return y;
}

}  // namespace seqmix_cpu
