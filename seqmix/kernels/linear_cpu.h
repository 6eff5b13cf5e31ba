// A decoding step's projections inside its one C++ call (the layers' steps in recurrent_step_cpu.cpp and
// attention_step_cpu.cpp, the MLP's in mlp_step_cpu.cpp): x [rows, in] times a layer's weight w [out, in]
// transposed, as F.linear computes it. At a decoding step's few rows the product is matrix_times_rows' (rows_cpu.h),
// which reads a weight of the tiny LM's sizes 40-50% faster than ATen's one-row product, once for all the rows, and
// no call from Python is made for it (docs/design.md, "Nineteenth round"); more rows are ATen's matrix product.
#pragma once

#include "torch_cpu.h"

#include <cstdint>

#include "rows_cpu.h"

namespace seqmix_cpu {

constexpr int64_t kFewRows = 8;  // rows up to which the products are matrix_times_rows'; more take ATen's

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
    matrix_times_rows(wc.data_ptr<T>(), xc.data_ptr<T>(), y.data_ptr<T>(), rows, out, in);
  });
  return y;
}

}  // namespace seqmix_cpu
