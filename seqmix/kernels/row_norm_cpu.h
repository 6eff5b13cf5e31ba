// The row norm of row_norm_cpu.cpp, for the other C++ steps that norm rows (mlp_step_cpu.cpp's MLP steps).
#pragma once

#include "torch_cpu.h"

namespace seqmix_cpu {

// y = x * rsqrt(sum(x^2) / n + eps) [* weight] [* silu(gate)] over the last dimension of x (n = D with `mean`, the
// RMSNorm; n = 1 without, the L2 norm), in float32 (float64 for float64 x), returned in x's dtype.
at::Tensor row_norm(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                    const c10::optional<at::Tensor>& gate, double eps, bool mean);

}  // namespace seqmix_cpu
