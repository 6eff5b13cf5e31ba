// The attention layer's one-token decoding step on the CPU in one call (seqmix/archs/attention.py,
// Attention._decode_in_place; why: docs/design.md, "Eighteenth round"): in tensor ops it is ~40 aten calls
// of a few microseconds each (the rotary angles, cos and sin, the halves and their products, the slot's
// index tensors, two index_puts, the mask, SDPA and the transposes) around one small attention.
//
// x [B, hidden] (the token), qkv_weight [3 H D, hidden] (the projection to q, then k, then v, [B, 3, H, D]),
// k_cache and v_cache [B, H, L, D] (the preallocated caches, written in place at slot length[b]), length [B]
// int64 (the tokens each cache holds, < L), inv_freq [D/2] (the rotary frequencies), o_weight [hidden, H D].
// q and k are rotated by the position length[b] (RoPE, halves layout: x1 cos - x2 sin, x2 cos + x1 sin), k and
// v written into slot length[b], o = softmax(q k^T / sqrt(D)) v over slots 0..length[b], and the output
// projection o o_weight^T. Everything in one dtype, float32 or float64, the rotation included (the tensor ops'
// rotary computes in it too); the projections linear_cpu.h's. One task per (batch, head) pair, spread over
// threads once the caches are long enough to pay for the wake-up. Returns the output [B, hidden] and length + 1.
#include "torch_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "decoder_cpu.h"
#include "linear_cpu.h"
#include "rows_cpu.h"
#include "vec_cpu.h"

namespace {

using seqmix_cpu::exp_v;
using seqmix_cpu::Lanes;
using seqmix_cpu::load;
using seqmix_cpu::load_upto;
using seqmix_cpu::splat;
using seqmix_cpu::store;
using seqmix_cpu::store_upto;
using seqmix_cpu::Vec;

constexpr int64_t kValuesPerTask = 1 << 15;  // cache values read per thread task: below it heads run inline

// x [D] rotated by the angles whose cos and sin are c, s [D/2], into out [D].
template <typename T>
inline void rotate(const T* x, const T* c, const T* s, T* out, int64_t half) {
  for (int64_t j = 0; j < half; ++j) {
    const T x1 = x[j], x2 = x[j + half];
    out[j] = x1 * c[j] - x2 * s[j];
    out[j + half] = x2 * c[j] + x1 * s[j];
  }
}

// One head: q (rotated, scaled) against keys 0..n-1 of k [n, D], softmax, o = p v. scores is scratch of n
// values.
template <typename T>
void attend(const T* q, const T* k, const T* v, T* o, T* scores, int64_t n, int64_t D) {
  constexpr int W = Lanes<T>::W;
  seqmix_cpu::matrix_times_row(k, q, scores, n, D);
  T top = -std::numeric_limits<T>::infinity();
  for (int64_t u = 0; u < n; ++u) top = std::max(top, scores[u]);
  // exp(score - max) in vectors, and their sum.
  Vec<T> total{};
  int64_t t = 0;
  for (; t + W <= n; t += W) {
    const Vec<T> p = exp_v<T>(load(scores + t) - top);
    store(scores + t, p);
    total += p;
  }
  if (t < n) {
    // The tail's missing lanes must add nothing: exp of -inf is 0.
    Vec<T> tail = splat<T>(-std::numeric_limits<T>::infinity());
    for (int64_t i = 0; t + i < n; ++i) tail[i] = scores[t + i] - top;
    const Vec<T> p = exp_v<T>(tail);
    for (int64_t i = 0; t + i < n; ++i) scores[t + i] = p[i];
    total += p;
  }
  const T norm = T(1) / seqmix_cpu::lane_sum<T>(total);
  // o = p v, up to four vectors of channels per pass over the values, their sums kept in registers.
  for (int64_t d0 = 0; d0 < D; d0 += 4 * W) {
    seqmix_cpu::as_constant<4>((std::min<int64_t>(D - d0, 4 * W) + W - 1) / W, [&](auto count) {
      constexpr int C = decltype(count)::value;
      Vec<T> acc[C];
      for (int i = 0; i < C; ++i) acc[i] = Vec<T>{};
      for (int64_t u = 0; u < n; ++u) {
        const Vec<T> p = splat<T>(scores[u]);
        const T* vu = v + u * D + d0;
        for (int i = 0; i < C; ++i) acc[i] += p * load_upto(vu + i * W, D - d0 - i * W);
      }
      for (int i = 0; i < C; ++i) store_upto(o + d0 + i * W, acc[i] * norm, D - d0 - i * W);
    });
  }
}

std::vector<at::Tensor> attention_step(const at::Tensor& x, const at::Tensor& qkv_weight, const at::Tensor& k_cache,
                                       const at::Tensor& v_cache, const at::Tensor& length,
                                       const at::Tensor& inv_freq, const at::Tensor& o_weight) {
  const char* kernel = "attention_step_cpu";
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), kernel,
              ": k_cache and v_cache must be [B, H, L, D]");
  const int64_t B = k_cache.size(0), H = k_cache.size(1), D = k_cache.size(3), half = D / 2;
  TORCH_CHECK(x.dim() == 2 && x.size(0) == B && qkv_weight.dim() == 2 && qkv_weight.size(0) == 3 * H * D, kernel,
              ": x must be [B, hidden] and qkv_weight [3 H D, hidden] for caches [B, H, L, D]");
  TORCH_CHECK(D % 2 == 0, kernel, ": the head size must be even (rotary halves), got ", D);
  for (const at::Tensor* t : {&x, &qkv_weight, &o_weight})
    TORCH_CHECK(t->device().is_cpu(), kernel, ": tensors must be CPU tensors");
  const at::Tensor qkv = seqmix_cpu::times_weight(x, qkv_weight, kernel);  // [B, 3 H D]: q | k | v
  TORCH_CHECK(length.scalar_type() == at::kLong && length.dim() == 1 && length.size(0) == B, kernel,
              ": length must be int64 [B]");
  TORCH_CHECK(inv_freq.dim() == 1 && inv_freq.size(0) == half, kernel, ": inv_freq must be [D/2]");
  const auto dtype = qkv.scalar_type();  // x's: float32 or float64 (times_weight checks)
  for (const at::Tensor* t : {&k_cache, &v_cache, &inv_freq})
    TORCH_CHECK(t->scalar_type() == dtype, kernel, ": the caches and inv_freq must have x's dtype");
  for (const at::Tensor* t : {&qkv, &k_cache, &v_cache, &length, &inv_freq})
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), kernel, ": tensors must be contiguous CPU tensors");
  const int64_t L = k_cache.size(2);
  const int64_t* lp = length.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lp[b] >= 0 && lp[b] < L, kernel, ": sequence ", b, " holds ", lp[b], " tokens and its cache ", L,
                " slots: no slot left for the new token (preallocate a larger capacity)");
  at::Tensor o = at::empty({B, H, D}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "attention_step_cpu", [&] {
    using T = scalar_t;
    const T *xp = qkv.data_ptr<T>(), *fp = inv_freq.data_ptr<T>();
    T *kc = k_cache.data_ptr<T>(), *vc = v_cache.data_ptr<T>(), *op = o.data_ptr<T>();
    const T scale = T(1) / std::sqrt(T(D));
    // cos and sin per sequence: its position's angles, shared by its heads' q and k.
    std::vector<T> cs(B * D);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < half; ++j) {
        const T angle = T(lp[b]) * fp[j];
        cs[b * D + j] = std::cos(angle);
        cs[b * D + half + j] = std::sin(angle);
      }
    int64_t longest = 0;
    for (int64_t b = 0; b < B; ++b) longest = std::max(longest, lp[b] + 1);
    const int64_t grain = std::max<int64_t>(1, kValuesPerTask / std::max<int64_t>(2 * longest * D, 1));
    at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
      std::vector<T> q(D), scores(longest);
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / H, h = bh % H, n = lp[b] + 1;
        const T* c = cs.data() + b * D;
        const T* x = xp + b * 3 * H * D + h * D;  // q; k and v H D and 2 H D further
        T* k = kc + (bh * L) * D;
        T* v = vc + (bh * L) * D;
        rotate(x, c, c + half, q.data(), half);
        for (int64_t d = 0; d < D; ++d) q[d] *= scale;
        rotate(x + H * D, c, c + half, k + lp[b] * D, half);
        std::copy(x + 2 * H * D, x + 2 * H * D + D, v + lp[b] * D);
        attend(q.data(), k, v, op + bh * D, scores.data(), n, D);
      }
    });
  });
  return {seqmix_cpu::times_weight(o.view({B, H * D}), o_weight, kernel), at::add(length, 1)};
}

}  // namespace

void bind_attention_step(pybind11::module& m) {
  m.def("attention_step", &attention_step, "attention's one-token decoding step into preallocated caches (CPU)");
  // For decoder_cpu.cpp, its arguments in the order of seqmix/kernels/step_cpu.py's op.
  seqmix_cpu::register_layer_step("seqmix::attention_step_cpu", [](const seqmix_cpu::StepArgs& a) {
    return attention_step(a.t(0), a.t(1), a.t(2), a.t(3), a.t(4), a.t(5), a.t(6));
  });
}
