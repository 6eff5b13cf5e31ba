// The MLP halves of the LM's blocks in one call each for decoding on the CPU (why: docs/design.md, "CPU
// references (issue 14)"): at decoding sizes their tensor-op forms are eight aten calls and four module calls
// of a few microseconds each around two small matrix products.
//
// residual_swiglu_step, seqmix/archs/lm.py's Block after its mixer: x, y [..., D]: h = x + y,
// n = rmsnorm(h) * norm_weight, out = h + mlp(n). sandwich_swiglu_step, seqmix/archs/recurrent_depth.py's
// SandwichBlock after its mixer: s, y [..., D]: s2 = rmsnorm(s + y) * mixer_out_weight,
// out = rmsnorm(s2 + mlp(rmsnorm(s2) * mlp_in_weight)) * mlp_out_weight. The MLP is SwiGLU:
// mlp(n) = (silu(g) u) down^T with [g, u] = n gate_up^T (gate_up [2I, D], down [D, I]). Everything in one
// dtype, float32 or float64; the products are linear_cpu.h's (25-35% off a call at one row against ATen's), the
// norms row_norm_cpu.cpp's.
#include "torch_cpu.h"

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <vector>

#include "decoder_cpu.h"
#include "linear_cpu.h"
#include "row_norm_cpu.h"

namespace {

constexpr int64_t kValuesPerTask = 1 << 15;  // values per thread task: below it the rows run inline

// x on the CPU, float32 or float64, `others` in its dtype, gate_up [2I, D] and down [D, I] for D = x's last dim.
void check_mlp_step(const char* kernel, const at::Tensor& x, std::initializer_list<const at::Tensor*> others,
                    const at::Tensor& gate_up, const at::Tensor& down) {
  TORCH_CHECK(x.device().is_cpu(), kernel, ": x must be on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, kernel,
              ": float32 or float64 only, got ", x.scalar_type());
  for (const at::Tensor* t : others)
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == x.scalar_type(), kernel,
                ": every tensor must be a CPU tensor in x's dtype");
  const int64_t D = x.size(-1), I = down.dim() == 2 ? down.size(1) : -1;
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(0) == 2 * I && gate_up.size(1) == D && down.size(0) == D, kernel,
              ": gate_up must be [2I, D] and down [D, I]");
}

// a + b, as at::add computes it, for the residual adds of a decoding step: a loop where the two are contiguous and
// of one shape (at a few rows at::add's set-up is most of its ~1.5 us), else at::add.
at::Tensor plus(const at::Tensor& a, const at::Tensor& b) {
  if (!(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() && a.is_contiguous() && b.is_contiguous()))
    return at::add(a, b);
  at::Tensor out = at::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "plus", [&] {
    const scalar_t *ap = a.data_ptr<scalar_t>(), *bp = b.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    for (int64_t i = 0, n = a.numel(); i < n; ++i) op[i] = ap[i] + bp[i];
  });
  return out;
}

// The SwiGLU MLP of the rows n [rows, D]: [rows, D].
at::Tensor swiglu_mlp(const at::Tensor& n, const at::Tensor& gate_up, const at::Tensor& down, const char* kernel) {
  const int64_t rows = n.size(0), I = down.size(1);
  const at::Tensor gu = seqmix_cpu::times_weight(n, gate_up, kernel);  // [rows, 2I]: the gate's I columns, then up's
  at::Tensor act = at::empty({rows, I}, n.options());
  AT_DISPATCH_FLOATING_TYPES(n.scalar_type(), "swiglu_mlp", [&] {
    using T = scalar_t;
    const T* gp = gu.data_ptr<T>();
    T* ap = act.data_ptr<T>();
    const int64_t grain = std::max<int64_t>(1, kValuesPerTask / std::max<int64_t>(I, 1));
    at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) seqmix_cpu::swiglu_row(gp + r * 2 * I, gp + r * 2 * I + I, ap + r * I, I);
    });
  });
  return seqmix_cpu::times_weight(act, down, kernel);
}

// A thread's buffer of n values for a step's intermediate rows, kept between calls: a decoding token's MLP then
// allocates its output alone (an allocation and its release cost ~0.4 us, six a block before).
template <typename T>
T* scratch(size_t n) {
  thread_local std::vector<T> buffer;
  if (buffer.size() < n) buffer.resize(n);
  return buffer.data();
}

// RMSNorm of a row of D values times weight into out (which may be x), in row_norm's operations (row_norm_cpu.cpp).
template <typename T>
void norm_row(const T* x, const T* weight, double eps, T* out, int64_t D) {
  const T scale = seqmix_cpu::rms_scale(x, D, T(1) / T(D), eps);
  for (int64_t j = 0; j < D; ++j) out[j] = x[j] * scale;
  for (int64_t j = 0; j < D; ++j) out[j] *= weight[j];
}

// The SwiGLU MLP of `rows` rows n [rows, D] into o [rows, D] (swiglu_mlp's operations), their gate_up rows and
// activations in gu [rows, 2I] and act [rows, I].
template <typename T>
void swiglu_rows(const T* n, const T* gate_up, const T* down, T* gu, T* act, T* o, int64_t rows, int64_t D,
                 int64_t I) {
  seqmix_cpu::weight_times_rows(gate_up, n, gu, rows, 2 * I, D);
  for (int64_t r = 0; r < rows; ++r) seqmix_cpu::swiglu_row(gu + r * 2 * I, gu + r * 2 * I + I, act + r * I, I);
  seqmix_cpu::weight_times_rows(down, act, o, rows, D, I);
}

// residual_swiglu_step at a decoding step's few rows, everything contiguous: the same operations in the same order
// as the tensor path below (so the same values), the intermediates in scratch.
template <typename T>
void residual_swiglu_rows(const T* x, const T* y, const T* norm_weight, double eps, const T* gate_up, const T* down,
                          T* out, int64_t rows, int64_t D, int64_t I) {
  T* h = scratch<T>(rows * (2 * D + 3 * I));
  T *n = h + rows * D, *gu = n + rows * D, *act = gu + rows * 2 * I;
  for (int64_t j = 0; j < rows * D; ++j) h[j] = x[j] + y[j];
  for (int64_t r = 0; r < rows; ++r) norm_row(h + r * D, norm_weight, eps, n + r * D, D);
  swiglu_rows(n, gate_up, down, gu, act, out, rows, D, I);
  for (int64_t j = 0; j < rows * D; ++j) out[j] = h[j] + out[j];
}

// sandwich_swiglu_step at a decoding step's few rows, everything contiguous, as residual_swiglu_rows: s2 =
// norm(s + y), out = norm(s2 + mlp(norm(s2))).
template <typename T>
void sandwich_swiglu_rows(const T* s, const T* y, const T* mixer_out_weight, const T* mlp_in_weight,
                          const T* mlp_out_weight, double eps, const T* gate_up, const T* down, T* out, int64_t rows,
                          int64_t D, int64_t I) {
  T* h = scratch<T>(rows * (3 * D + 3 * I));
  T *s2 = h + rows * D, *n = s2 + rows * D, *gu = n + rows * D, *act = gu + rows * 2 * I;
  for (int64_t j = 0; j < rows * D; ++j) h[j] = s[j] + y[j];
  for (int64_t r = 0; r < rows; ++r) {
    norm_row(h + r * D, mixer_out_weight, eps, s2 + r * D, D);
    norm_row(s2 + r * D, mlp_in_weight, eps, n + r * D, D);
  }
  swiglu_rows(n, gate_up, down, gu, act, out, rows, D, I);
  for (int64_t j = 0; j < rows * D; ++j) out[j] = out[j] + s2[j];
  for (int64_t r = 0; r < rows; ++r) norm_row(out + r * D, mlp_out_weight, eps, out + r * D, D);
}

// Whether a step's tensors take the few-rows path: `rows` of them, y of x's shape, everything contiguous.
bool few_contiguous_rows(int64_t rows, const at::Tensor& x, const at::Tensor& y,
                         std::initializer_list<const at::Tensor*> weights) {
  bool contiguous = rows <= seqmix_cpu::kFewRows && y.sizes() == x.sizes() && x.is_contiguous() && y.is_contiguous();
  for (const at::Tensor* t : weights) contiguous = contiguous && t->is_contiguous();
  return contiguous;
}

}  // namespace

at::Tensor seqmix_cpu::residual_swiglu_step(const at::Tensor& x, const at::Tensor& y, const at::Tensor& norm_weight,
                                            double eps, const at::Tensor& gate_up, const at::Tensor& down) {
  const char* kernel = "residual_swiglu_step_cpu";
  check_mlp_step(kernel, x, {&y, &norm_weight, &gate_up, &down}, gate_up, down);
  const int64_t D = x.size(-1), rows = D ? x.numel() / D : 0;
  if (few_contiguous_rows(rows, x, y, {&norm_weight, &gate_up, &down})) {
    at::Tensor out = at::empty(x.sizes(), x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "residual_swiglu_step_cpu", [&] {
      residual_swiglu_rows<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), norm_weight.data_ptr<scalar_t>(),
                                     eps, gate_up.data_ptr<scalar_t>(), down.data_ptr<scalar_t>(),
                                     out.data_ptr<scalar_t>(), rows, D, down.size(1));
    });
    return out;
  }
  const at::Tensor h = plus(x, y).reshape({rows, D});
  const at::Tensor n = seqmix_cpu::row_norm(h, norm_weight, c10::nullopt, eps, true);
  return plus(h, swiglu_mlp(n, gate_up, down, kernel)).view(x.sizes());
}

at::Tensor seqmix_cpu::sandwich_swiglu_step(const at::Tensor& s, const at::Tensor& y,
                                            const at::Tensor& mixer_out_weight, const at::Tensor& mlp_in_weight,
                                            const at::Tensor& mlp_out_weight, double eps, const at::Tensor& gate_up,
                                            const at::Tensor& down) {
  const char* kernel = "sandwich_swiglu_step_cpu";
  check_mlp_step(kernel, s, {&y, &mixer_out_weight, &mlp_in_weight, &mlp_out_weight, &gate_up, &down}, gate_up,
                 down);
  const int64_t D = s.size(-1), rows = D ? s.numel() / D : 0;
  if (few_contiguous_rows(rows, s, y, {&mixer_out_weight, &mlp_in_weight, &mlp_out_weight, &gate_up, &down})) {
    at::Tensor out = at::empty(s.sizes(), s.options());
    AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "sandwich_swiglu_step_cpu", [&] {
      using T = scalar_t;
      sandwich_swiglu_rows<T>(s.data_ptr<T>(), y.data_ptr<T>(), mixer_out_weight.data_ptr<T>(),
                              mlp_in_weight.data_ptr<T>(), mlp_out_weight.data_ptr<T>(), eps, gate_up.data_ptr<T>(),
                              down.data_ptr<T>(), out.data_ptr<T>(), rows, D, down.size(1));
    });
    return out;
  }
  const auto rms_norm = [eps](const at::Tensor& rows, const at::Tensor& weight) {
    return seqmix_cpu::row_norm(rows, weight, c10::nullopt, eps, true);
  };
  const at::Tensor s2 = rms_norm(plus(s, y).reshape({rows, D}), mixer_out_weight);
  const at::Tensor m = swiglu_mlp(rms_norm(s2, mlp_in_weight), gate_up, down, kernel);
  return rms_norm(plus(m, s2), mlp_out_weight).view(s.sizes());
}

void bind_mlp_step(pybind11::module& m) {
  m.def("residual_swiglu_step", &seqmix_cpu::residual_swiglu_step,
        "an LM block's residual, RMSNorm and SwiGLU MLP (CPU)");
  m.def("sandwich_swiglu_step", &seqmix_cpu::sandwich_swiglu_step,
        "a sandwich block's norms and SwiGLU MLP after its mixer (recurrent depth, CPU)");
}
