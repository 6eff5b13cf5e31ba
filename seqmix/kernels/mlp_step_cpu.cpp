// The second half of an LM block in one call for decoding on the CPU (seqmix/archs/lm.py, Block: the
// residual add, the MLP's RMSNorm and the SwiGLU MLP, and its residual add; why: docs/design.md, "CPU
// references (issue 14)"). At decoding sizes the tensor-op form is eight aten calls and four module calls
// of a few microseconds each around two small matrix products.
//
// x, y [..., D]: h = x + y, n = rmsnorm(h) * norm_weight, [g, u] = n gate_up^T (gate_up [2I, D]),
// out = h + (silu(g) u) down^T (down [D, I]). Everything in one dtype, float32 or float64 (the caller
// checks); the products are linear_cpu.h's (25-35% off this call at one row against ATen's); the rest are
// loops over rows.
#include "torch_cpu.h"

#include <cmath>
#include <cstdint>

#include "linear_cpu.h"

namespace {

constexpr int64_t kValuesPerTask = 1 << 15;  // values per thread task: below it the rows run inline

at::Tensor residual_swiglu_step(const at::Tensor& x, const at::Tensor& y, const at::Tensor& norm_weight,
                                double eps, const at::Tensor& gate_up, const at::Tensor& down) {
  TORCH_CHECK(x.device().is_cpu(), "residual_swiglu_step_cpu: x must be on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "residual_swiglu_step_cpu: float32 or float64 only, got ", x.scalar_type());
  for (const auto* t : {&y, &norm_weight, &gate_up, &down})
    TORCH_CHECK(t->scalar_type() == x.scalar_type(),
                "residual_swiglu_step_cpu: every tensor must have x's dtype");
  const int64_t D = x.size(-1), I = down.size(1), rows = D ? x.numel() / D : 0;
  TORCH_CHECK(gate_up.size(0) == 2 * I && gate_up.size(1) == D && down.size(0) == D,
              "residual_swiglu_step_cpu: gate_up must be [2I, D] and down [D, I]");
  const at::Tensor h = at::add(x, y).reshape({rows, D});
  const at::Tensor w = norm_weight.contiguous();
  at::Tensor n = at::empty({rows, D}, x.options());
  at::Tensor act = at::empty({rows, I}, x.options());
  at::Tensor gu, out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "residual_swiglu_step_cpu", [&] {
    using T = scalar_t;
    const T *hp = h.data_ptr<T>(), *wp = w.data_ptr<T>();
    T* np = n.data_ptr<T>();
    const int64_t norm_grain = std::max<int64_t>(1, kValuesPerTask / std::max<int64_t>(D, 1));
    at::parallel_for(0, rows, norm_grain, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const T* hr = hp + r * D;
        T ss = 0;
        for (int64_t j = 0; j < D; ++j) ss += hr[j] * hr[j];
        const T scale = T(1) / std::sqrt(ss / T(D) + T(eps));
        for (int64_t j = 0; j < D; ++j) np[r * D + j] = hr[j] * scale * wp[j];
      }
    });
    // [rows, 2I]: the gate's I columns, then the up ones
    gu = seqmix_cpu::times_weight(n, gate_up, "residual_swiglu_step_cpu");
    const T* gp = gu.data_ptr<T>();
    T* ap = act.data_ptr<T>();
    const int64_t act_grain = std::max<int64_t>(1, kValuesPerTask / std::max<int64_t>(I, 1));
    at::parallel_for(0, rows, act_grain, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r)
        for (int64_t j = 0; j < I; ++j) {
          const T g = gp[r * 2 * I + j];
          ap[r * I + j] = g / (T(1) + std::exp(-g)) * gp[r * 2 * I + I + j];
        }
    });
    out = at::add(h, seqmix_cpu::times_weight(act, down, "residual_swiglu_step_cpu"));
  });
  return out.view(x.sizes());
}

}  // namespace

void bind_mlp_step(pybind11::module& m) {
  m.def("residual_swiglu_step", &residual_swiglu_step, "an LM block's residual, RMSNorm and SwiGLU MLP (CPU)");
}
