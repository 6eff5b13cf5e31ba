// One decoding token of the short causal conv on the CPU in one call (seqmix/kernels/conv/step.py,
// causal_conv1d_step; why: docs/design.md, "CPU references (issue 14)"): the tensor-op step is five to
// seven aten calls of a few microseconds each over B * D * W values.
//
// x [B, D], weight [D, W], bias [D] (optional), state [B, D, W-1] (oldest first): out = act(bias +
// sum_j weight[:, j] window[:, j]) over the window of the state followed by x, and the new state, the
// window's last W-1 columns, as a new [B, D, W-1] tensor. Computed in float32 (float64 for float64 x);
// out in x's dtype.
#include "../torch_cpu.h"

#include <cmath>
#include <cstdint>

#include "../rows_cpu.h"

namespace {

constexpr int64_t kValuesPerTask = 1 << 15;  // window values per thread task: below it the rows run inline

at::Tensor contiguous_in(const at::Tensor& t, at::ScalarType dtype) {
  const at::Tensor c = t.scalar_type() == dtype ? t : t.to(dtype);
  return c.is_contiguous() ? c : c.contiguous();
}

std::vector<at::Tensor> causal_conv1d_step(const at::Tensor& x, const at::Tensor& weight,
                                           const c10::optional<at::Tensor>& bias, bool silu,
                                           const at::Tensor& state) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && state.device().is_cpu(),
              "causal_conv1d_step_cpu: every tensor must be on the CPU");
  const auto dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t B = x.size(0), D = x.size(1), W = weight.size(1), S = W - 1;
  const at::Tensor xc = contiguous_in(x, dtype), wc = contiguous_in(weight, dtype);
  const at::Tensor sc = contiguous_in(state, dtype);
  const at::Tensor bc = bias.has_value() ? contiguous_in(*bias, dtype) : at::Tensor();
  at::Tensor out = at::empty({B, D}, x.options().dtype(dtype));
  at::Tensor next = at::empty({B, D, S}, x.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(dtype, "causal_conv1d_step_cpu", [&] {
    using T = scalar_t;
    const T *xp = xc.data_ptr<T>(), *wp = wc.data_ptr<T>(), *sp = sc.data_ptr<T>();
    const T* bp = bias.has_value() ? bc.data_ptr<T>() : nullptr;
    T *op = out.data_ptr<T>(), *np = next.data_ptr<T>();
    const int64_t grain = std::max<int64_t>(1, kValuesPerTask / std::max<int64_t>(D * W, 1));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        T* o = op + b * D;
        seqmix_cpu::conv_window_row(xp + b * D, wp, bp, sp + b * D * S, np + b * D * S, o, D, W);
        if (silu)
          for (int64_t d = 0; d < D; ++d) o[d] = o[d] / (T(1) + std::exp(-o[d]));
      }
    });
  });
  return {x.scalar_type() == dtype ? out : out.to(x.scalar_type()), next};
}

}  // namespace

void bind_conv_step(pybind11::module& m) {
  m.def("causal_conv1d_step", &causal_conv1d_step, "one token of the short causal conv (CPU)");
}
