// RMSNorm, gated or not, and the L2 norm (at the end) for training on the CPU: forward and backward (the op:
// seqmix/kernels/norm/__init__.py, rms_norm; why: docs/design.md, "Sixth round: a C++ RMSNorm; SSD on the
// conv's output in place; GLA's and Mamba's decoding steps"). In tensor ops the forward is five passes over [M, D] and the backward nine, each
// into a fresh buffer, costly on a training step's cold memory; here each row is read once into cache and
// worked on there.
//
// y = xhat w [* silu(gate)], xhat = x r, r = rsqrt(mean(x^2) + eps) over the last dimension (the math:
// seqmix/kernels/norm/reference.py, RMSNormFunction). With a = dy [* silu(gate)] w:
//   dx = r (a - xhat mean(a xhat)),  dw = sum over rows of dy xhat [* silu(gate)],
//   dgate = dy xhat w silu'(gate),  silu'(g) = s (1 + g (1 - s)), s = sigmoid(g).
// float32 and float64, contiguous [M, D] rows and [D] weights in one dtype (the caller checks and converts).
// dw is summed per task of a fixed number of rows, then over the tasks in order: the result does not depend
// on the threads.
#include "../torch_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../args_cpu.h"
#include "../rows_cpu.h"
#include "../vec_cpu.h"

namespace {

using namespace seqmix_cpu;

constexpr int64_t kValuesPerTask = 1 << 15;  // values per task: a task's rows and its dw stay in L2

// f(j, m) over a row of n values in vectors of W lanes (the last one m < W lanes).
template <typename T, typename F>
inline void over_row(int64_t n, const F& f) {
  constexpr int64_t W = Lanes<T>::W;
  for (int64_t j = 0; j < n; j += W) f(j, std::min(W, n - j));
}

// Rows of D values per thread task.
inline int64_t rows_per_task(int64_t D) { return std::max<int64_t>(1, kValuesPerTask / std::max<int64_t>(D, 1)); }

// x [M, D] float32 or float64, weight [D] (undefined: the L2 norm's none), gate x's shape or undefined, and every
// tensor on the CPU, contiguous and in x's dtype.
void check(const char* kernel, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& gate,
           std::vector<at::Tensor> others) {
  TORCH_CHECK(x.dim() == 2, kernel, ": x must be [M, D]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, kernel,
              ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(!weight.defined() || (weight.dim() == 1 && weight.size(0) == x.size(1)), kernel,
              ": weight must be [D]");
  TORCH_CHECK(!gate.defined() || gate.sizes() == x.sizes(), kernel, ": gate must have x's shape");
  others.insert(others.end(), {x, weight, gate});
  check_tensors(kernel, others, &x, "x");
}

// Returns (y [M, D], rstd [M]).
std::vector<at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& gate, double eps) {
  const at::Tensor g = opt_or_empty(gate);
  check("rms_norm_cpu_fwd", x, weight, g, {});
  const int64_t M = x.size(0), D = x.size(1);
  at::Tensor y = at::empty_like(x), rstd = at::empty({M}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rms_norm_cpu_fwd", [&] {
    using T = scalar_t;
    const T *xp = x.data_ptr<T>(), *wp = weight.data_ptr<T>(), *gp = data_or_null<T>(g);
    T *yp = y.data_ptr<T>(), *rp = rstd.data_ptr<T>();
    at::parallel_for(0, M, rows_per_task(D), [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; ++i) {
        const T* xr = xp + i * D;
        const T r = rms_scale(xr, D, T(1) / T(D), eps);
        rp[i] = r;
        const Vec<T> rv = splat<T>(r);
        over_row<T>(D, [&](int64_t j, int64_t m) {
          Vec<T> v = load_upto(xr + j, m) * rv * load_upto(wp + j, m);
          if (gp) {
            const Vec<T> g = load_upto(gp + i * D + j, m);
            v *= g * sigmoid_v<T>(g);
          }
          store_upto(yp + i * D + j, v, m);
        });
      }
    });
  });
  return {y, rstd};
}

// Returns (dx [M, D], dweight [D], dgate [M, D] or empty).
std::vector<at::Tensor> rms_norm_bwd(const at::Tensor& x, const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& gate, const at::Tensor& rstd,
                                     const at::Tensor& dy) {
  const at::Tensor g = opt_or_empty(gate);
  check("rms_norm_cpu_bwd", x, weight, g, {rstd, dy});
  TORCH_CHECK(dy.sizes() == x.sizes() && rstd.dim() == 1 && rstd.size(0) == x.size(0),
              "rms_norm_cpu_bwd: dy must have x's shape and rstd [M]");
  const int64_t M = x.size(0), D = x.size(1);
  const int64_t task_rows = rows_per_task(D);
  const int64_t tasks = (M + task_rows - 1) / task_rows;
  at::Tensor dx = at::empty_like(x), dgate = g.defined() ? at::empty_like(x) : at::Tensor();
  at::Tensor partial = at::zeros({tasks, D}, x.options()), dweight = at::zeros({D}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rms_norm_cpu_bwd", [&] {
    using T = scalar_t;
    const T *xp = x.data_ptr<T>(), *wp = weight.data_ptr<T>(), *gp = data_or_null<T>(g);
    const T *rp = rstd.data_ptr<T>(), *dyp = dy.data_ptr<T>();
    T *dxp = dx.data_ptr<T>(), *dgp = data_or_null<T>(dgate), *pp = partial.data_ptr<T>();
    at::parallel_for(0, tasks, 1, [&](int64_t ta, int64_t tb) {
      for (int64_t task = ta; task < tb; ++task) {
        T* dw = pp + task * D;
        for (int64_t i = task * task_rows; i < std::min(M, (task + 1) * task_rows); ++i) {
          const T *xr = xp + i * D, *dr = dyp + i * D, *gr = gp ? gp + i * D : nullptr;
          const Vec<T> rv = splat<T>(rp[i]);
          // Pass 1: dw, dgate and mean(a xhat); pass 2: dx, recomputing xhat and a from the row in cache.
          Vec<T> dot{};
          over_row<T>(D, [&](int64_t j, int64_t m) {
            const Vec<T> xhat = load_upto(xr + j, m) * rv, w = load_upto(wp + j, m);
            Vec<T> dyv = load_upto(dr + j, m);
            if (gr) {
              const Vec<T> gv = load_upto(gr + j, m), s = sigmoid_v<T>(gv);
              store_upto(dgp + i * D + j, dyv * xhat * w * s * (T(1) + gv * (T(1) - s)), m);
              dyv *= gv * s;
            }
            store_upto(dw + j, load_upto(dw + j, m) + dyv * xhat, m);
            dot += dyv * w * xhat;
          });
          const Vec<T> mean = splat<T>(lane_sum<T>(dot) / T(D));
          over_row<T>(D, [&](int64_t j, int64_t m) {
            const Vec<T> xhat = load_upto(xr + j, m) * rv;
            Vec<T> a = load_upto(dr + j, m) * load_upto(wp + j, m);
            if (gr) {
              const Vec<T> g = load_upto(gr + j, m);
              a *= g * sigmoid_v<T>(g);
            }
            store_upto(dxp + i * D + j, rv * (a - xhat * mean), m);
          });
        }
      }
    });
    T* dwp = dweight.data_ptr<T>();
    for (int64_t task = 0; task < tasks; ++task)
      for (int64_t j = 0; j < D; ++j) dwp[j] += pp[task * D + j];
  });
  return {dx, dweight, dgate};
}

// The L2 norm over the last dimension, y = x r with r = rsqrt(sum(x^2) + eps) (DeltaNet's q and k: seqmix/archs/
// modules.py, l2_normalize): RMSNorm's rows with the sum for the mean and no weight. Returns (y [M, D], r [M]).
std::vector<at::Tensor> l2_norm_fwd(const at::Tensor& x, double eps) {
  check("l2_norm_cpu_fwd", x, at::Tensor(), at::Tensor(), {});
  const int64_t M = x.size(0), D = x.size(1);
  at::Tensor y = at::empty_like(x), rstd = at::empty({M}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "l2_norm_cpu_fwd", [&] {
    using T = scalar_t;
    const T* xp = x.data_ptr<T>();
    T *yp = y.data_ptr<T>(), *rp = rstd.data_ptr<T>();
    at::parallel_for(0, M, rows_per_task(D), [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; ++i) {
        const T* xr = xp + i * D;
        const T r = rms_scale(xr, D, T(1), eps);
        rp[i] = r;
        const Vec<T> rv = splat<T>(r);
        over_row<T>(D, [&](int64_t j, int64_t m) { store_upto(yp + i * D + j, load_upto(xr + j, m) * rv, m); });
      }
    });
  });
  return {y, rstd};
}

// Its backward: dx = r (dy - y sum(dy y)), y = x r recomputed from the row in cache.
at::Tensor l2_norm_bwd(const at::Tensor& x, const at::Tensor& rstd, const at::Tensor& dy) {
  check("l2_norm_cpu_bwd", x, at::Tensor(), at::Tensor(), {rstd, dy});
  TORCH_CHECK(dy.sizes() == x.sizes() && rstd.dim() == 1 && rstd.size(0) == x.size(0),
              "l2_norm_cpu_bwd: dy must have x's shape and rstd [M]");
  const int64_t M = x.size(0), D = x.size(1);
  at::Tensor dx = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "l2_norm_cpu_bwd", [&] {
    using T = scalar_t;
    const T *xp = x.data_ptr<T>(), *rp = rstd.data_ptr<T>(), *dyp = dy.data_ptr<T>();
    T* dxp = dx.data_ptr<T>();
    at::parallel_for(0, M, rows_per_task(D), [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; ++i) {
        const T *xr = xp + i * D, *dr = dyp + i * D;
        const Vec<T> rv = splat<T>(rp[i]);
        Vec<T> dot{};
        over_row<T>(D, [&](int64_t j, int64_t m) { dot += load_upto(dr + j, m) * (load_upto(xr + j, m) * rv); });
        const Vec<T> sum = splat<T>(lane_sum<T>(dot));
        over_row<T>(D, [&](int64_t j, int64_t m) {
          const Vec<T> y = load_upto(xr + j, m) * rv;
          store_upto(dxp + i * D + j, rv * (load_upto(dr + j, m) - y * sum), m);
        });
      }
    });
  });
  return dx;
}

}  // namespace

void bind_rms_norm(pybind11::module& m) {
  m.def("l2_norm_fwd", &l2_norm_fwd, "the L2 norm over the last dim for training, forward: (y, rstd) (CPU)");
  m.def("l2_norm_bwd", &l2_norm_bwd, "its backward: dx (CPU)");
  m.def("rms_norm_fwd", &rms_norm_fwd, "RMSNorm (gated or not) for training, forward: (y, rstd) (CPU)");
  m.def("rms_norm_bwd", &rms_norm_bwd, "RMSNorm (gated or not) for training, backward: (dx, dweight, dgate) (CPU)");
}
