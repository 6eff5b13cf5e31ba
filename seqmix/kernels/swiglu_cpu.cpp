// The SwiGLU activation of the LM's MLP for training on the CPU, h = silu(gate) * up, forward and backward
// (the op: seqmix/kernels/mlp.py, swiglu; why: docs/design.md, "Fifth round: the short conv walks rows; a
// fused SwiGLU"). In tensor ops the forward is two passes over [*, I] and keeps silu(gate) for the backward,
// which takes three more, each into a fresh buffer, costly on a training step's cold memory; here the forward
// reads gate and up once and writes h, and the backward reads gate, up and dh once and writes dgate and dup,
// recomputing the sigmoid.
//
// dup = dh silu(gate), dgate = dh up s (1 + gate (1 - s)) with s = sigmoid(gate). float32 and float64,
// contiguous tensors of one shape and dtype (the caller checks and converts).
#include "torch_cpu.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#include "args_cpu.h"
#include "vec_cpu.h"

namespace {

using namespace seqmix_cpu;

constexpr int64_t kValuesPerTask = 1 << 15;  // values per thread task: below it the values run inline

// f(i, count) over [0, n) in vectors of W lanes (the last one partial), spread over threads in tasks.
template <typename T, typename F>
void by_vectors(int64_t n, const F& f) {
  constexpr int64_t W = Lanes<T>::W;
  at::parallel_for(0, (n + W - 1) / W, kValuesPerTask / W, [&](int64_t begin, int64_t end) {
    for (int64_t v = begin; v < end; ++v) f(v * W, std::min(W, n - v * W));
  });
}

void check(const at::Tensor& gate, const std::vector<at::Tensor>& others) {
  TORCH_CHECK(gate.scalar_type() == at::kFloat || gate.scalar_type() == at::kDouble,
              "swiglu_cpu: gate must be float32 or float64, got ", gate.scalar_type());
  for (const auto& t : others)
    TORCH_CHECK(t.sizes() == gate.sizes(), "swiglu_cpu: every tensor must have gate's shape");
  std::vector<at::Tensor> all(others);
  all.push_back(gate);
  check_tensors("swiglu_cpu", all, &gate, "gate");
}

at::Tensor swiglu_fwd(const at::Tensor& gate, const at::Tensor& up) {
  check(gate, {up});
  at::Tensor h = at::empty_like(gate);
  AT_DISPATCH_FLOATING_TYPES(gate.scalar_type(), "swiglu_cpu_fwd", [&] {
    using T = scalar_t;
    const T *g = gate.data_ptr<T>(), *u = up.data_ptr<T>();
    T* out = h.data_ptr<T>();
    by_vectors<T>(gate.numel(), [&](int64_t i, int64_t m) {
      const Vec<T> x = load_upto(g + i, m);
      store_upto(out + i, x * sigmoid_v<T>(x) * load_upto(u + i, m), m);
    });
  });
  return h;
}

// Returns (dgate, dup).
std::vector<at::Tensor> swiglu_bwd(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& dh) {
  check(gate, {up, dh});
  at::Tensor dgate = at::empty_like(gate), dup = at::empty_like(up);
  AT_DISPATCH_FLOATING_TYPES(gate.scalar_type(), "swiglu_cpu_bwd", [&] {
    using T = scalar_t;
    const T *g = gate.data_ptr<T>(), *u = up.data_ptr<T>(), *d = dh.data_ptr<T>();
    T *dg = dgate.data_ptr<T>(), *du = dup.data_ptr<T>();
    by_vectors<T>(gate.numel(), [&](int64_t i, int64_t m) {
      const Vec<T> x = load_upto(g + i, m), s = sigmoid_v<T>(x), dv = load_upto(d + i, m);
      store_upto(du + i, dv * x * s, m);
      store_upto(dg + i, dv * load_upto(u + i, m) * s * (T(1) + x * (T(1) - s)), m);
    });
  });
  return {dgate, dup};
}

}  // namespace

void bind_swiglu(pybind11::module& m) {
  m.def("swiglu_fwd", &swiglu_fwd, "the SwiGLU activation silu(gate) * up for training (CPU)");
  m.def("swiglu_bwd", &swiglu_bwd, "its backward: (dgate, dup) (CPU)");
}
