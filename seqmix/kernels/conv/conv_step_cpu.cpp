// One decoding token of the short causal conv on the CPU in one call (seqmix/kernels/conv/step.py,
// causal_conv1d_step; why: docs/design.md, "CPU references (issue 14)"): the tensor-op step is five to
// seven aten calls of a few microseconds each over B * D * W values.
//
// x [B, D], weight [D, W], bias [D] (optional), state [B, D, W-1] (oldest first): out = act(bias +
// sum_j weight[:, j] window[:, j]) over the window of the state followed by x, and the new state, the
// window's last W-1 columns, as a new [B, D, W-1] tensor. Computed in float32 (float64 for float64 x);
// out in x's dtype.
//
// And the conv mixers' whole layer tokens with their projections (seqmix/archs/conv.py), one call each as the
// recurrent layers' (recurrent_step_cpu.cpp): short_conv_layer_step and dynamic_conv_layer_step below.
#include "../torch_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../args_cpu.h"
#include "../decoder_cpu.h"
#include "../linear_cpu.h"
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
  const auto dtype = seqmix_cpu::compute_dtype(x);
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
        if (silu) seqmix_cpu::silu_inplace<T>(o, D);
      }
    });
  });
  return {x.scalar_type() == dtype ? out : out.to(x.scalar_type()), next};
}

void check_layer_tensors(std::initializer_list<at::Tensor> ts, const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble), op,
              ": x must be [B, hidden] float32 or float64");
  for (const auto& t : ts)
    TORCH_CHECK(!t.defined() || (t.device().is_cpu() && t.scalar_type() == x.scalar_type()), op,
                ": every tensor must be on the CPU in x's dtype");
}

// v += bias over n values.
template <typename T>
void add_bias(T* v, const T* bias, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] += bias[i];
}

// One token of the ShortConv mixer with its projections (seqmix/archs/conv.py): f = x in_weight^T [B, 2C] is
// v | g; h = the conv's window step over v (conv_weight [C, W], conv_bias [C] or none, conv_state [B, C, W-1]),
// SiLU'd with `silu`; out = (h silu(g)) out_weight^T. Returns the output [B, hidden] and the new conv state,
// in x's dtype (float32 or float64), as causal_conv1d_step returns its state.
std::vector<at::Tensor> short_conv_layer_step(const at::Tensor& x, const at::Tensor& in_weight,
                                              const at::Tensor& conv_weight, const c10::optional<at::Tensor>& conv_bias,
                                              bool silu, const at::Tensor& conv_state, const at::Tensor& out_weight) {
  const char* op = "short_conv_layer_step_cpu";
  const at::Tensor bias = conv_bias.value_or(at::Tensor());
  check_layer_tensors({in_weight, conv_weight, bias, out_weight}, x, op);
  const at::Tensor f = seqmix_cpu::times_weight(x, in_weight, op);
  const bool taps = conv_weight.dim() == 2;
  const int64_t B = f.size(0), C = taps ? conv_weight.size(0) : 0, W = taps ? conv_weight.size(1) : 0;
  TORCH_CHECK(taps && W >= 1 && f.size(1) == 2 * C && (!bias.defined() || bias.numel() == C) &&
                  conv_state.dim() == 3 && conv_state.device().is_cpu() && conv_state.size(0) == B &&
                  conv_state.size(1) == C && conv_state.size(2) == W - 1,
              op, ": in_weight [2C, hidden], conv_weight [C, W], conv_bias [C] and conv_state [B, C, W-1] ",
              "do not describe one ShortConv layer");
  const at::Tensor wc = conv_weight.contiguous(), sc = contiguous_in(conv_state, f.scalar_type());
  const at::Tensor bc = bias.defined() ? bias.contiguous() : bias;
  at::Tensor h = at::empty({B, C}, f.options()), next = at::empty({B, C, W - 1}, f.options());
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "short_conv_layer_step_cpu", [&] {
    using T = scalar_t;
    std::vector<T> gate(C);
    for (int64_t b = 0; b < B; ++b) {
      const T* row = f.data_ptr<T>() + b * 2 * C;  // v | g
      T* hb = h.data_ptr<T>() + b * C;
      seqmix_cpu::conv_window_row(row, wc.data_ptr<T>(), bc.defined() ? bc.data_ptr<T>() : nullptr,
                                  sc.data_ptr<T>() + b * C * (W - 1), next.data_ptr<T>() + b * C * (W - 1), hb, C, W);
      if (silu) seqmix_cpu::silu_inplace<T>(hb, C);
      std::copy(row + C, row + 2 * C, gate.begin());
      seqmix_cpu::silu_inplace<T>(gate.data(), C);
      for (int64_t c = 0; c < C; ++c) hb[c] *= gate[c];
    }
  });
  return {seqmix_cpu::times_weight(h, out_weight, op), next};
}

// One token of the LightConv or DynamicConv block with its projections (seqmix/archs/conv.py, _ConvBlock):
// f = x in_weight^T + in_bias [B, 2C]; u = glu(f) = f[:C] sigmoid(f[C:]); the kernels [H, K]: LightConv's
// `kernel`, or DynamicConv's kernel_weight u + kernel_bias (kernel_weight [H K, C]), softmax'd over the K taps
// with weight_softmax; y[c] = sum_j w[c / (C / H), j] window[c, j] over conv_state's K-1 inputs followed by u
// (seqmix/kernels/conv/step.py's dynamic_conv_step); out = y out_weight^T + out_bias. Returns the output
// [B, hidden] and the new conv state [B, C, K-1], both in x's dtype (float32 or float64).
std::vector<at::Tensor> dynamic_conv_layer_step(const at::Tensor& x, const at::Tensor& in_weight,
                                                const at::Tensor& in_bias, const c10::optional<at::Tensor>& kernel,
                                                const c10::optional<at::Tensor>& kernel_weight,
                                                const c10::optional<at::Tensor>& kernel_bias, int64_t heads,
                                                bool weight_softmax, const at::Tensor& conv_state,
                                                const at::Tensor& out_weight, const at::Tensor& out_bias) {
  const char* op = "dynamic_conv_layer_step_cpu";
  const at::Tensor light = kernel.value_or(at::Tensor()), kw = kernel_weight.value_or(at::Tensor());
  const at::Tensor kb = kernel_bias.value_or(at::Tensor());
  check_layer_tensors({in_weight, in_bias, light, kw, kb, out_weight, out_bias}, x, op);
  TORCH_CHECK(light.defined() != kw.defined() && kw.defined() == kb.defined(), op,
              ": either LightConv's kernel or DynamicConv's kernel_weight and kernel_bias");
  const at::Tensor f = seqmix_cpu::times_weight(x, in_weight, op);
  const int64_t B = f.size(0), C = f.size(1) / 2, H = heads, K = conv_state.dim() == 3 ? conv_state.size(2) + 1 : 0;
  TORCH_CHECK(f.size(1) == 2 * C && in_bias.numel() == 2 * C && H >= 1 && C % H == 0 && conv_state.dim() == 3 &&
                  conv_state.size(0) == B && conv_state.size(1) == C && conv_state.device().is_cpu() &&
                  (light.defined() ? light.numel() == H * K
                                   : (kw.dim() == 2 && kw.size(0) == H * K && kw.size(1) == C && kb.numel() == H * K)),
              op, ": in_weight [2C, hidden], in_bias [2C], the kernels [H, K] (or kernel_weight [H K, C] and ",
              "kernel_bias [H K]) and conv_state [B, C, K-1] do not describe one LightConv or DynamicConv layer");
  const auto dtype = seqmix_cpu::compute_dtype(x);
  const at::Tensor ib = in_bias.contiguous(), sc = contiguous_in(conv_state, dtype);
  const at::Tensor lc = light.defined() ? light.contiguous() : light, kwc = kw.defined() ? kw.contiguous() : kw;
  const at::Tensor kbc = kb.defined() ? kb.contiguous() : kb;
  at::Tensor y = at::empty({B, C}, f.options()), next = at::empty({B, C, K - 1}, f.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "dynamic_conv_layer_step_cpu", [&] {
    using T = scalar_t;
    std::vector<T> u(C), w(H * K);
    const T* s = sc.data_ptr<T>();
    for (int64_t b = 0; b < B; ++b) {
      T* row = f.data_ptr<T>() + b * 2 * C;
      add_bias(row, ib.data_ptr<T>(), 2 * C);
      for (int64_t c = 0; c < C; ++c) u[c] = row[c] / (T(1) + std::exp(-row[C + c]));
      if (light.defined()) {
        std::copy(lc.data_ptr<T>(), lc.data_ptr<T>() + H * K, w.begin());
      } else {
        seqmix_cpu::matrix_times_row(kwc.data_ptr<T>(), u.data(), w.data(), H * K, C);
        add_bias(w.data(), kbc.data_ptr<T>(), H * K);
      }
      if (weight_softmax)
        for (int64_t h = 0; h < H; ++h) {
          T* wh = w.data() + h * K;
          const T top = *std::max_element(wh, wh + K);
          T sum = 0;
          for (int64_t j = 0; j < K; ++j) sum += (wh[j] = std::exp(wh[j] - top));
          for (int64_t j = 0; j < K; ++j) wh[j] /= sum;
        }
      const T* sb = s + b * C * (K - 1);
      T *yb = y.data_ptr<T>() + b * C, *nb = next.data_ptr<T>() + b * C * (K - 1);
      for (int64_t c = 0; c < C; ++c) {
        const T* wc = w.data() + (c / (C / H)) * K;
        const T* sc_row = sb + c * (K - 1);
        T acc = wc[K - 1] * u[c];
        for (int64_t j = 0; j + 1 < K; ++j) acc += wc[j] * sc_row[j];
        yb[c] = acc;
        T* nc = nb + c * (K - 1);
        for (int64_t j = 0; j + 2 < K; ++j) nc[j] = sc_row[j + 1];
        if (K > 1) nc[K - 2] = u[c];
      }
    }
  });
  at::Tensor out = seqmix_cpu::times_weight(y, out_weight, op);
  out += out_bias;
  return {out, next};
}

}  // namespace

void bind_conv_step(pybind11::module& m) {
  m.def("causal_conv1d_step", &causal_conv1d_step, "one token of the short causal conv (CPU)");
  m.def("short_conv_layer_step", &short_conv_layer_step, "one token of a ShortConv layer with its projections (CPU)");
  m.def("dynamic_conv_layer_step", &dynamic_conv_layer_step,
        "one token of a LightConv or DynamicConv layer with its projections (CPU)");
  // The layers' steps for decoder_cpu.cpp, their arguments in the order of seqmix/kernels/step_cpu.py's ops.
  using seqmix_cpu::StepArgs;
  seqmix_cpu::register_layer_step("seqmix::short_conv_layer_step_cpu", [](const StepArgs& a) {
    return short_conv_layer_step(a.t(0), a.t(1), a.t(2), a.tensors[3], a.flags[0], a.t(4), a.t(5));
  });
  seqmix_cpu::register_layer_step("seqmix::dynamic_conv_layer_step_cpu", [](const StepArgs& a) {
    return dynamic_conv_layer_step(a.t(0), a.t(1), a.t(2), a.tensors[3], a.tensors[4], a.tensors[5], a.integers[0],
                                   a.flags[0], a.t(6), a.t(7), a.t(8));
  });
}
