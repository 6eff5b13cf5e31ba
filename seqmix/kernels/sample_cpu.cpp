// Drawing a token from each row of logits on the CPU, generate's sampler in one call (the op and its math:
// seqmix/kernels/sampling.py; why: docs/design.md, "Twenty-sixth round"). In tensor ops a draw is six to ten
// calls (temperature, top-k, softmax, the race), 30-70 us a token after a decoding step has taken the caches;
// here a row is a few passes over its V values in L1.
//
// Per row: s = logits / temperature; with top_k, the entries below the k-th largest s left out (ties with it
// kept, as the tensor ops' masked_fill keeps them); then argmin_i exp(s_i - max s) / log(max(u_i, tiny)) over
// the kept entries: the exponential race on the unnormalised probabilities. float32 and float64, logits and
// uniforms [B, V] (in [0, 1)) of one dtype, contiguous; returns the tokens [B, 1] (int64).
#include "torch_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

#include "args_cpu.h"
#include "vec_cpu.h"

namespace {

using namespace seqmix_cpu;

// The token of one row of logits and its uniforms u; s (V values) is the row's buffer, left holding the race's ratios.
template <typename T>
int64_t draw_row(const T* logits, const T* u, int64_t V, T temperature, int64_t top_k, T* s, std::vector<T>& scratch) {
  constexpr int64_t W = Lanes<T>::W;
  for (int64_t i = 0; i < V; ++i) s[i] = logits[i] / temperature;  // a division, as torch's (not times 1 / temperature)
  T lowest = -std::numeric_limits<T>::infinity();  // entries below it are left out
  if (top_k < V) {
    scratch.assign(s, s + V);
    std::nth_element(scratch.begin(), scratch.begin() + (top_k - 1), scratch.end(), std::greater<T>());
    lowest = scratch[top_k - 1];
  }
  const T top = *std::max_element(s, s + V);
  const Vec<T> tiny = splat<T>(std::numeric_limits<T>::min()), one = splat<T>(T(1));
  for (int64_t i = 0; i < V; i += W) {
    const int64_t m = std::min(W, V - i);
    const Vec<T> x = load_upto(s + i, m);
    const Vec<T> p = x < lowest ? Vec<T>{} : exp_v<T>(x - top);
    // log u = -log(1 / u), as log_v takes arguments >= 1 (u in [0, 1); lanes past the row read 0, never stored).
    const Vec<T> uv = load_upto(u + i, m);
    store_upto(s + i, p / -log_v<T>(one / (uv < tiny ? tiny : uv)), m);
  }
  return std::min_element(s, s + V) - s;  // the first of equal minima, as torch.argmin
}

at::Tensor sample_rows(const at::Tensor& logits, const at::Tensor& uniforms, double temperature, int64_t top_k) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "sample_rows: logits must be [B, V] with V >= 1, got ",
              logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble,
              "sample_rows: logits must be float32 or float64, got ", logits.scalar_type());
  TORCH_CHECK(uniforms.sizes() == logits.sizes(), "sample_rows: uniforms must have logits' shape ", logits.sizes(),
              ", got ", uniforms.sizes());
  check_tensors("sample_rows", {logits, uniforms}, &logits, "logits");
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "sample_rows: temperature must be finite and > 0, got ",
              temperature);
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(0 <= top_k && top_k <= V, "sample_rows: top_k must be in [0, V=", V, "] (0: all), got ", top_k);
  at::Tensor tokens = at::empty({B, 1}, logits.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "sample_rows", [&] {
    using T = scalar_t;
    std::vector<T> row(V), scratch;
    const T *lp = logits.data_ptr<T>(), *up = uniforms.data_ptr<T>();
    int64_t* out = tokens.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      out[b] = draw_row<T>(lp + b * V, up + b * V, V, T(temperature), top_k == 0 ? V : top_k, row.data(), scratch);
  });
  return tokens;
}

}  // namespace

void bind_sample(pybind11::module& m) {
  m.def("sample_rows", &sample_rows,
        "one token drawn from each row of logits: temperature, top-k, the exponential race on given uniforms (CPU)");
}
