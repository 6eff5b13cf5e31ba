// The mixers' row norms without autograd on the CPU, one call each (seqmix/archs/modules.py: RMSNorm, gated
// or not, and l2_normalize; why: docs/design.md, "CPU references (issue 14)"): a decoding step's norm is
// four to nine aten calls of a few microseconds each over a few hundred values.
//
// y = x * rsqrt(sum(x^2) / n + eps) [* weight] [* silu(gate)] over the last dimension (n = D for RMSNorm,
// n = 1 for the L2 norm), in float32 (float64 for float64 x), returned in x's dtype. Rows are spread over
// threads once there are enough of them (a prefill's). And the LM's readout of a decoding step: the final norm
// and the head's projection in one call.
#include "torch_cpu.h"

#include <cmath>
#include <cstdint>

#include "row_norm_cpu.h"

#include "args_cpu.h"
#include "decoder_cpu.h"
#include "linear_cpu.h"
#include "rows_cpu.h"

namespace {

constexpr int64_t kValuesPerTask = 1 << 15;  // values per thread task: below it the rows run inline

// t in `dtype` and contiguous: t itself when it already is (a no-op `to` still goes through the dispatcher).
at::Tensor rows_in(const at::Tensor& t, at::ScalarType dtype) {
  return (t.scalar_type() == dtype ? t : t.to(dtype)).contiguous();
}

}  // namespace

at::Tensor seqmix_cpu::row_norm(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                    const c10::optional<at::Tensor>& gate, double eps, bool mean) {
  TORCH_CHECK(x.device().is_cpu(), "row_norm_cpu: x must be on the CPU");
  TORCH_CHECK(!gate.has_value() || gate->sizes() == x.sizes(), "row_norm_cpu: gate must have x's shape");
  const auto dtype = seqmix_cpu::compute_dtype(x);
  const int64_t D = x.size(-1), rows = D ? x.numel() / D : 0;
  TORCH_CHECK(!weight.has_value() || weight->numel() == D, "row_norm_cpu: weight must have D values");
  const at::Tensor xc = rows_in(x, dtype);
  const at::Tensor wc = weight.has_value() ? rows_in(*weight, dtype) : at::Tensor();
  const at::Tensor gc = gate.has_value() ? rows_in(*gate, dtype) : at::Tensor();
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(dtype, "row_norm_cpu", [&] {
    using T = scalar_t;
    const T* xp = xc.data_ptr<T>();
    const T* wp = weight.has_value() ? wc.data_ptr<T>() : nullptr;
    const T* gp = gate.has_value() ? gc.data_ptr<T>() : nullptr;
    T* yp = y.data_ptr<T>();
    const T inv_n = mean ? T(1) / T(D) : T(1);
    const int64_t grain = std::max<int64_t>(1, kValuesPerTask / std::max<int64_t>(D, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T* xr = xp + r * D;
        T* yr = yp + r * D;
        const T scale = seqmix_cpu::rms_scale(xr, D, inv_n, eps);
        for (int64_t j = 0; j < D; ++j) yr[j] = xr[j] * scale;
        if (wp)
          for (int64_t j = 0; j < D; ++j) yr[j] *= wp[j];
        if (gp) {
          const T* gr = gp + r * D;
          for (int64_t j = 0; j < D; ++j) yr[j] *= gr[j] / (T(1) + std::exp(-gr[j]));
        }
      }
    });
  });
  return x.scalar_type() == dtype ? y : y.to(x.scalar_type());
}

// The LM's readout in a decoding step (seqmix/archs/lm.py, LanguageModel._readout): RMSNorm of x [B, D]
// (norm_weight [D], eps), then the head's projection (weight [V, D], linear_cpu.h), in x's dtype, float32 or
// float64. Returns the logits [B, V].
at::Tensor seqmix_cpu::rms_norm_times_weight(const at::Tensor& x, const at::Tensor& norm_weight, double eps,
                                             const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2, "rms_norm_times_weight_cpu: x must be [B, D]");
  return seqmix_cpu::times_weight(seqmix_cpu::row_norm(x, norm_weight, c10::nullopt, eps, true), weight,
                                  "rms_norm_times_weight_cpu");
}

void bind_row_norms(pybind11::module& m) {
  m.def("row_norm", &seqmix_cpu::row_norm, "RMSNorm (gated or not) or L2 norm over the last dim, no autograd (CPU)");
  m.def("rms_norm_times_weight", &seqmix_cpu::rms_norm_times_weight,
        "a decoding step's RMSNorm and head projection (CPU)");
}
