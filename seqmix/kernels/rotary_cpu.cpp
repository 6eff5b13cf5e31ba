// RoPE's rotation for training on the CPU (the op: seqmix/kernels/rotary.py, rotate_halves; why: docs/design.md,
// "Twenty-sixth round"). In tensor ops a rotation is seven calls forward (the halves' four products, their
// difference and sum, the concatenation) and more backward (each half's gradient zero-filled and added into),
// 2.5-6 ms of an attention layer's training step at the tiny LM's sizes; here each row is read once and written
// once, forward and backward.
//
// Halves layout: y = [x1 c - x2 s, x2 c + x1 s] for x = [x1, x2] of each token's head, with the token's c, s
// [D/2]. The backward is the rotation by the opposite angles (s negated, `inverse`). x [R, H, D]: rows ld apart
// (a view of the q, k, v projection's output), each row's H D values contiguous; cos, sin [P, D/2] contiguous,
// with R a multiple of P: row r takes the angles of r mod P (a dense batch's rows repeat the positions of its T
// tokens). float32 and float64, all in one dtype; returns y [R, H, D] contiguous.
#include "torch_cpu.h"

#include <algorithm>
#include <cstdint>

#include "args_cpu.h"
#include "vec_cpu.h"

namespace {

using namespace seqmix_cpu;

constexpr int64_t kValuesPerTask = 1 << 15;  // values per thread task: below it the rows run inline

at::Tensor rotate_halves(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse) {
  TORCH_CHECK(x.dim() == 3 && x.size(2) % 2 == 0, "rotate_halves: x must be [R, H, D] with D even, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "rotate_halves: x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && x.stride(2) == 1 && (x.size(1) <= 1 || x.stride(1) == x.size(2)),
              "rotate_halves: x must be a CPU tensor whose rows' [H, D] values are contiguous");
  const int64_t R = x.size(0), H = x.size(1), D = x.size(2), half = D / 2;
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) == half && sin.sizes() == cos.sizes(),
              "rotate_halves: cos and sin must be [P, D/2] = [P, ", half, "], got ", cos.sizes(), " and ", sin.sizes());
  const int64_t P = cos.size(0);
  TORCH_CHECK(P > 0 ? R % P == 0 : R == 0, "rotate_halves: x's rows R = ", R, " must be a multiple of cos's P = ", P);
  check_tensors("rotate_halves", {cos, sin}, &x, "x");
  at::Tensor y = at::empty({R, H, D}, x.options());
  if (R == 0 || H == 0 || D == 0) return y;
  const int64_t ld = x.stride(0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rotate_halves", [&] {
    using T = scalar_t;
    constexpr int64_t W = Lanes<T>::W;
    const T *xp = x.data_ptr<T>(), *cp = cos.data_ptr<T>(), *sp = sin.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    const T sign = inverse ? T(-1) : T(1);
    at::parallel_for(0, R, std::max<int64_t>(1, kValuesPerTask / (H * D)), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T *c = cp + (r % P) * half, *s = sp + (r % P) * half;
        for (int64_t h = 0; h < H; ++h) {
          const T* xr = xp + r * ld + h * D;
          T* yr = yp + (r * H + h) * D;
          for (int64_t j = 0; j < half; j += W) {
            const int64_t m = std::min(W, half - j);
            const Vec<T> x1 = load_upto(xr + j, m), x2 = load_upto(xr + half + j, m);
            const Vec<T> cv = load_upto(c + j, m), sv = load_upto(s + j, m) * sign;
            store_upto(yr + j, x1 * cv - x2 * sv, m);
            store_upto(yr + half + j, x2 * cv + x1 * sv, m);
          }
        }
      }
    });
  });
  return y;
}

}  // namespace

void bind_rotary(pybind11::module& m) {
  m.def("rotate_halves", &rotate_halves, "RoPE's rotation of x [R, H, D] by per-row angles (inverse: the backward) "
        "for training (CPU)");
}
