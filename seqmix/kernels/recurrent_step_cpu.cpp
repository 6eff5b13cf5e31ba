// One decoding token of the recurrent rules on the CPU, each one call: the delta rule and the gated delta
// rule, gated linear attention, and Mamba-2's SSD (the math: docs/math/deltanet.md, gla.md, mamba2.md,
// "One token"; why: docs/design.md, "CPU references (issue 14)"). An eager decoding step is bound by
// dispatch (a few microseconds per aten call), and the tensor-op step takes 5-15 of them per layer.
//
// Each reads the state [B, H, K, V] (or [B, H, P, N]) and writes the updated one into a new tensor (the
// state passed in stays valid), and the token's output. They compute in float32 (float64 for float64
// inputs), whatever the inputs' dtypes (converted here), and return the output in the first input's
// dtype. Token inputs may be strided views over the batch and head dimensions (rows of a projection);
// only their last dimension must be contiguous, else it is made so. One task per (batch, head) pair,
// spread over threads by at::parallel_for once there is enough of them to pay for the wake-up.
//
// Four more take a whole layer's token with its projections (Mamba-2's, (Gated) DeltaNet's, GLA's, Mamba's: the
// input projection, the short conv's window step, the rule's step, the gates and norms, the output projection;
// the projections linear_cpu.h's), one task per sequence; see mamba2_step and the ones after it.
#include "torch_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "args_cpu.h"
#include "decoder_cpu.h"
#include "linear_cpu.h"
#include "rows_cpu.h"
#include "vec_cpu.h"

namespace {

using seqmix_cpu::compute_dtype;
using seqmix_cpu::conv_window_row;
using seqmix_cpu::dot;
using seqmix_cpu::exp_v;
using seqmix_cpu::kSoftplusThreshold;
using seqmix_cpu::Lanes;
using seqmix_cpu::load;
using seqmix_cpu::load_part;
using seqmix_cpu::load_upto;
using seqmix_cpu::silu_inplace;
using seqmix_cpu::splat;
using seqmix_cpu::store;
using seqmix_cpu::store_part;
using seqmix_cpu::store_upto;
using seqmix_cpu::Vec;

// State values per thread task below which the tasks run inline on the calling thread: at decoding
// sizes (a few heads of 32 x 32) waking the pool costs more than the update.
constexpr int64_t kValuesPerTask = 1 << 15;

// A [B, H, ...] tensor's rows: element (b, h, i) at p + b * sb + h * sh + i.
template <typename T>
struct Rows {
  const T* p;
  int64_t sb, sh;
  const T* at(int64_t b, int64_t h) const { return p + b * sb + h * sh; }
};

// t in `dtype`: t itself when it already is (a `to` that changes nothing still goes through the dispatcher).
at::Tensor in_dtype(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

// t in the compute dtype with a contiguous last dimension (a no-op when it already is).
at::Tensor prepared(const at::Tensor& t, at::ScalarType dtype) {
  at::Tensor c = in_dtype(t, dtype);
  return c.dim() > 0 && c.size(-1) > 1 && c.stride(-1) != 1 ? c.contiguous() : c;
}

// The state, [B, H, rows, cols] with each head's block contiguous.
at::Tensor prepared_state(const at::Tensor& s, at::ScalarType dtype) {
  at::Tensor c = in_dtype(s, dtype);
  return c.stride(-1) == 1 && c.stride(-2) == c.size(-1) ? c : c.contiguous();
}

template <typename T>
Rows<T> rows(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1)};
}

// Runs f(b, h) for every (batch, head) pair; `values` is one task's state size.
template <typename F>
void over_heads(int64_t batch, int64_t heads, int64_t values, const F& f) {
  const int64_t grain = std::max<int64_t>(1, kValuesPerTask / std::max<int64_t>(values, 1));
  at::parallel_for(0, batch * heads, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) f(t / heads, t % heads);
  });
}

void check_cpu(std::initializer_list<at::Tensor> ts, const char* op) {
  for (const auto& t : ts)
    TORCH_CHECK(!t.defined() || t.device().is_cpu(), op, ": every tensor must be on the CPU");
}

// S'[i] = decay(i) S[i] + k[i] w over the K rows [V] of a head's state, and o = scale S'^T q [V]: the update
// and read-out that the delta rule (w its correction, one decay) and GLA (w = v, a decay per row) end with.
template <typename T, typename Decay>
void update_and_read(const T* S, T* Sn, const Decay& decay, const T* k, const T* w, const T* q, T scale, T* o,
                     int64_t K, int64_t V) {
  std::fill(o, o + V, T(0));
  for (int64_t i = 0; i < K; ++i) {
    const T a = decay(i), ki = k[i], qi = q[i];
    const T* row = S + i * V;
    T* out = Sn + i * V;
    for (int64_t j = 0; j < V; ++j) {
      const T s = a * row[j] + ki * w[j];
      out[j] = s;
      o[j] += qi * s;
    }
  }
  for (int64_t j = 0; j < V; ++j) o[j] *= scale;
}

// S' = a S + k w^T, w = beta (v - a S^T k), o = scale S'^T q (a = e^g; 1 without g).
template <typename T>
void delta_head(const T* S, T* Sn, const T* q, const T* k, const T* v, T beta, T a, T scale, T* o, T* w,
                int64_t K, int64_t V) {
  std::fill(w, w + V, T(0));
  for (int64_t i = 0; i < K; ++i) {
    const T ki = k[i];
    const T* row = S + i * V;
    for (int64_t j = 0; j < V; ++j) w[j] += ki * row[j];
  }
  for (int64_t j = 0; j < V; ++j) w[j] = beta * (v[j] - a * w[j]);
  update_and_read<T>(S, Sn, [a](int64_t) { return a; }, k, w, q, scale, o, K, V);
}

// q, k [B, H, K], v [B, H, V], beta and g [B, H] (g may be absent), state [B, H, K, V].
std::vector<at::Tensor> delta_rule_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& beta, const c10::optional<at::Tensor>& g,
                                        const at::Tensor& state, double scale) {
  check_cpu({q, k, v, beta, g.value_or(at::Tensor()), state}, "delta_rule_step_cpu");
  const auto dtype = compute_dtype(q);
  const int64_t B = q.size(0), H = q.size(1), K = q.size(2), V = v.size(2);
  const at::Tensor qc = prepared(q, dtype), kc = prepared(k, dtype), vc = prepared(v, dtype);
  const at::Tensor bc = in_dtype(beta, dtype), S = prepared_state(state, dtype);
  const at::Tensor gc = g.has_value() ? in_dtype(*g, dtype) : at::Tensor();
  at::Tensor Sn = at::empty({B, H, K, V}, q.options().dtype(dtype));
  at::Tensor o = at::empty({B, H, V}, q.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(dtype, "delta_rule_step_cpu", [&] {
    using T = scalar_t;
    const auto qr = rows<T>(qc), kr = rows<T>(kc), vr = rows<T>(vc), br = rows<T>(bc);
    const auto gr = g.has_value() ? rows<T>(gc) : Rows<T>{nullptr, 0, 0};
    const T* s = S.data_ptr<T>();
    T* sn = Sn.data_ptr<T>();
    T* out = o.data_ptr<T>();
    over_heads(B, H, K * V, [&](int64_t b, int64_t h) {
      std::vector<T> w(V);
      const int64_t bh = b * H + h;
      const T a = gr.p ? std::exp(*gr.at(b, h)) : T(1);
      delta_head<T>(s + bh * K * V, sn + bh * K * V, qr.at(b, h), kr.at(b, h), vr.at(b, h), *br.at(b, h), a,
                    T(scale), out + bh * V, w.data(), K, V);
    });
  });
  return {in_dtype(o, q.scalar_type()), Sn};
}

// One GLA head: S' = diag(e^g) S + k v^T (S, S' [K, V]) and o = scale S'^T q [V].
template <typename T>
void gla_head(const T* S, T* Sn, const T* q, const T* k, const T* v, const T* g, T scale, T* o, int64_t K, int64_t V) {
  update_and_read<T>(S, Sn, [g](int64_t i) { return std::exp(g[i]); }, k, v, q, scale, o, K, V);
}

// q, k, g [B, H, K], v [B, H, V], state [B, H, K, V]: S' = diag(e^g) S + k v^T, o = scale S'^T q.
std::vector<at::Tensor> gla_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
                                 const at::Tensor& state, double scale) {
  check_cpu({q, k, v, g, state}, "gla_step_cpu");
  const auto dtype = compute_dtype(q);
  const int64_t B = q.size(0), H = q.size(1), K = q.size(2), V = v.size(2);
  const at::Tensor qc = prepared(q, dtype), kc = prepared(k, dtype), vc = prepared(v, dtype);
  const at::Tensor gc = prepared(g, dtype), S = prepared_state(state, dtype);
  at::Tensor Sn = at::empty({B, H, K, V}, q.options().dtype(dtype));
  at::Tensor o = at::empty({B, H, V}, q.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(dtype, "gla_step_cpu", [&] {
    using T = scalar_t;
    const auto qr = rows<T>(qc), kr = rows<T>(kc), vr = rows<T>(vc), gr = rows<T>(gc);
    const T* s = S.data_ptr<T>();
    T* sn = Sn.data_ptr<T>();
    T* out = o.data_ptr<T>();
    over_heads(B, H, K * V, [&](int64_t b, int64_t h) {
      const int64_t bh = b * H + h;
      gla_head<T>(s + bh * K * V, sn + bh * K * V, qr.at(b, h), kr.at(b, h), vr.at(b, h), gr.at(b, h), T(scale),
                  out + bh * V, K, V);
    });
  });
  return {in_dtype(o, q.scalar_type()), Sn};
}

// v = softplus(v + bias) over n values in place, a vector at a time.
template <typename T>
void softplus_plus_inplace(T* v, const T* bias, int64_t n) {
  constexpr int64_t L = Lanes<T>::W;
  for (int64_t i = 0; i < n; i += L) {
    const int64_t m = std::min(L, n - i);
    store_upto(v + i, seqmix_cpu::softplus_v<T>(load_upto(v + i, m) + load_upto(bias + i, m)), m);
  }
}

// softplus as F.softplus: x itself above the threshold.
template <typename T>
T softplus(T x) {
  return x > T(kSoftplusThreshold) ? x : std::log1p(std::exp(x));
}

// dt' = clamp(softplus?(d), lo, hi).
template <typename T>
T ssd_dt(T d, bool with_softplus, double lo, double hi) {
  return std::min(std::max(with_softplus ? softplus(d) : d, T(lo)), T(hi));
}

// One SSD row: h' = decay h + dx B over its N states; returns the lanes of h' . C (their sum is the row's y).
// The sum is kept in a vector of lanes: a scalar running sum would keep the compiler from vectorising the loop
// (the state pass was three quarters of the step).
template <typename T>
Vec<T> ssd_row(const T* row, T* nrow, T dx, T decay, const T* Bn, const T* Cn, int64_t N) {
  constexpr int64_t L = Lanes<T>::W;
  Vec<T> acc{};
  for (int64_t n = 0; n < N; n += L) {
    const int64_t m = std::min(L, N - n);
    const Vec<T> v = decay * load_upto(row + n, m) + dx * load_upto(Bn + n, m);
    store_upto(nrow + n, v, m);
    acc += v * load_upto(Cn + n, m);
  }
  return acc;
}

// One SSD head's rows: h'[p] = decay h[p] + d x[p] B and y[p] = h'[p] . C, for its P rows of N (W rows' sums
// at once: sum_rows).
template <typename T>
void ssd_head(const T* s, T* sn, const T* x, T d, T decay, const T* Bn, const T* Cn, T* y, int64_t P, int64_t N) {
  seqmix_cpu::sum_rows<T>(P, y, [&](int64_t p) {
    return ssd_row<T>(s + p * N, sn + p * N, d * x[p], decay, Bn, Cn, N);
  });
}

// x, z [B, H, P], dt [B, H], A, D, dt_bias [H], Bm, Cm [B, G, N] (head h reads group h / (H / G)),
// state [B, H, P, N]: dt' = clamp(softplus?(dt + dt_bias), lo, hi), h' = e^{dt' A} h + dt' x B^T,
// y = (h' C + D x) silu(z).
std::vector<at::Tensor> ssd_step(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                                 const at::Tensor& Bm, const at::Tensor& Cm, const at::Tensor& state,
                                 const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                                 const c10::optional<at::Tensor>& dt_bias, bool softplus, double lo, double hi) {
  check_cpu({x, dt, A, Bm, Cm, state, D.value_or(at::Tensor()), z.value_or(at::Tensor()),
             dt_bias.value_or(at::Tensor())},
            "ssd_step_cpu");
  const auto dtype = compute_dtype(x);
  const int64_t B = x.size(0), H = x.size(1), P = x.size(2), G = Bm.size(1), N = Bm.size(2);
  const at::Tensor xc = prepared(x, dtype), dtc = in_dtype(dt, dtype), Ac = in_dtype(A, dtype).contiguous();
  const at::Tensor Bc = prepared(Bm, dtype), Cc = prepared(Cm, dtype), S = prepared_state(state, dtype);
  const at::Tensor Dc = D.has_value() ? in_dtype(*D, dtype).contiguous() : at::Tensor();
  const at::Tensor zc = z.has_value() ? prepared(*z, dtype) : at::Tensor();
  const at::Tensor biasc = dt_bias.has_value() ? in_dtype(*dt_bias, dtype).contiguous() : at::Tensor();
  at::Tensor Sn = at::empty({B, H, P, N}, x.options().dtype(dtype));
  at::Tensor y = at::empty({B, H, P}, x.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(dtype, "ssd_step_cpu", [&] {
    using T = scalar_t;
    const auto xr = rows<T>(xc), dtr = rows<T>(dtc), Br = rows<T>(Bc), Cr = rows<T>(Cc);
    const auto zr = z.has_value() ? rows<T>(zc) : Rows<T>{nullptr, 0, 0};
    const T* a_rate = Ac.data_ptr<T>();
    const T* skip = D.has_value() ? Dc.data_ptr<T>() : nullptr;
    const T* bias = dt_bias.has_value() ? biasc.data_ptr<T>() : nullptr;
    const T* s = S.data_ptr<T>();
    T* sn = Sn.data_ptr<T>();
    T* out = y.data_ptr<T>();
    const int64_t heads_per_group = H / G;
    over_heads(B, H, P * N, [&](int64_t b, int64_t h) {
      const int64_t bh = b * H + h;
      const T d = ssd_dt<T>(*dtr.at(b, h) + (bias ? bias[h] : T(0)), softplus, lo, hi);
      const T *xp = xr.at(b, h), *Bn = Br.at(b, h / heads_per_group), *Cn = Cr.at(b, h / heads_per_group);
      T* yp = out + bh * P;
      ssd_head<T>(s + bh * P * N, sn + bh * P * N, xp, d, std::exp(d * a_rate[h]), Bn, Cn, yp, P, N);
      const T* zp = zr.p ? zr.at(b, h) : nullptr;
      for (int64_t p = 0; p < P; ++p) {
        if (skip) yp[p] += skip[h] * xp[p];
        if (zp) yp[p] *= zp[p] / (T(1) + std::exp(-zp[p]));
      }
    });
  });
  return {in_dtype(y, x.scalar_type()), Sn};
}

// The short conv's window step over one row of D channels, then SiLU (rows_cpu.h's conv_window_row).
template <typename T>
void conv_silu_row(const T* x, const T* w, const T* bias, const T* s, T* next, T* out, int64_t D, int64_t W) {
  conv_window_row(x, w, bias, s, next, out, D, W);
  silu_inplace<T>(out, D);
}

// y = y rsqrt(mean(y^2) + eps) w over n values, in place (seqmix/archs/modules.py's RMSNorm).
template <typename T>
void rms_norm_inplace(T* y, const T* w, double eps, int64_t n) {
  const T scale = seqmix_cpu::rms_scale(y, n, T(1) / T(n), eps);
  for (int64_t j = 0; j < n; ++j) y[j] = y[j] * scale * w[j];
}

// A tensor's values in `dtype`, contiguous (weights and the conv state).
at::Tensor dense(const at::Tensor& t, at::ScalarType dtype) {
  return in_dtype(t, dtype).contiguous();
}

// One token of a Mamba-2 layer with its two projections (seqmix/archs/mamba2.py), in one call: f = x in_weight^T
// [B, d_inner + conv_dim + H] is in_proj's output, z | x B C | dt; the short conv with SiLU over x B C
// (conv_weight [conv_dim, W], conv_bias [conv_dim], conv_state [B, conv_dim, W-1]); SSD over H heads of P
// (ssm_state [B, H, P, N], B and C in G = (conv_dim - d_inner) / 2N groups) with dt' = clamp(softplus?(dt +
// dt_bias), lo, hi), A and D [H]; y = (h' C + D x) silu(z); y's RMSNorm over d_inner (norm_weight); out_proj
// (out_weight [hidden, d_inner]). Returns its output [B, hidden] in x's dtype and the two new states (float32,
// float64 for float64 x).
// With `in_place` the new SSD state overwrites the one given (or the copy `prepared_state` made of it), each row
// read before it is written: a decoder that owns its states (decoder_cpu.cpp) saves a new state's allocation and
// its writes to memory that is not in cache (Mamba-2's state is the largest of the layers', 128 KiB a layer at
// the tiny LM's sizes).
std::vector<at::Tensor> mamba2_step(const at::Tensor& x, const at::Tensor& in_weight, const at::Tensor& conv_weight,
                                    const at::Tensor& conv_bias, const at::Tensor& conv_state, const at::Tensor& A,
                                    const at::Tensor& D, const at::Tensor& dt_bias, bool softplus, double lo, double hi,
                                    const at::Tensor& ssm_state, const at::Tensor& norm_weight, double eps,
                                    const at::Tensor& out_weight, bool in_place = false) {
  check_cpu({x, in_weight, conv_weight, conv_bias, conv_state, A, D, dt_bias, ssm_state, norm_weight, out_weight},
            "mamba2_step_cpu");
  const at::Tensor f = seqmix_cpu::times_weight(x, in_weight, "mamba2_step_cpu");
  TORCH_CHECK(ssm_state.dim() == 4 && conv_weight.dim() == 2 && conv_state.dim() == 3,
              "mamba2_step_cpu: ssm_state [B, H, P, N], conv_weight [C, W], conv_state [B, C, W-1]");
  const auto dtype = compute_dtype(f);
  const int64_t B = f.size(0), H = ssm_state.size(1), P = ssm_state.size(2), N = ssm_state.size(3);
  const int64_t inner = H * P, channels = conv_weight.size(0), W = conv_weight.size(1);
  const int64_t G = N > 0 ? (channels - inner) / (2 * N) : 0;
  TORCH_CHECK(G > 0 && channels == inner + 2 * G * N && H % G == 0 && f.size(1) == inner + channels + H &&
                  ssm_state.size(0) == B && conv_state.size(0) == B && conv_state.size(1) == channels &&
                  conv_state.size(2) == W - 1 && A.numel() == H && D.numel() == H && dt_bias.numel() == H &&
                  conv_bias.numel() == channels && norm_weight.numel() == inner,
              "mamba2_step_cpu: the shapes (in_weight's rows included) do not describe one Mamba-2 layer");
  const at::Tensor fc = prepared(f, dtype), S = prepared_state(ssm_state, dtype), cs = dense(conv_state, dtype);
  const at::Tensor cw = dense(conv_weight, dtype), cb = dense(conv_bias, dtype), Ac = dense(A, dtype);
  const at::Tensor Dc = dense(D, dtype), biasc = dense(dt_bias, dtype), nw = dense(norm_weight, dtype);
  at::Tensor Sn = in_place ? S : at::empty({B, H, P, N}, f.options().dtype(dtype));
  at::Tensor cn = at::empty({B, channels, W - 1}, f.options().dtype(dtype));
  at::Tensor y = at::empty({B, inner}, f.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(dtype, "mamba2_step_cpu", [&] {
    using T = scalar_t;
    const T *fp = fc.data_ptr<T>(), *s = S.data_ptr<T>(), *csp = cs.data_ptr<T>();
    const T *cwp = cw.data_ptr<T>(), *cbp = cb.data_ptr<T>(), *a_rate = Ac.data_ptr<T>();
    const T *skip = Dc.data_ptr<T>(), *bias = biasc.data_ptr<T>(), *nwp = nw.data_ptr<T>();
    T *sn = Sn.data_ptr<T>(), *cnp = cn.data_ptr<T>(), *yp = y.data_ptr<T>();
    const int64_t heads_per_group = H / G, row_stride = fc.stride(0);
    const int64_t grain = std::max<int64_t>(1, kValuesPerTask / std::max<int64_t>(H * P * N, 1));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      std::vector<T> buffer(channels + inner);
      T *xbc = buffer.data(), *gate = xbc + channels;
      for (int64_t b = begin; b < end; ++b) {
        const T* row = fp + b * row_stride;  // z | x B C | dt
        conv_silu_row<T>(row + inner, cwp, cbp, csp + b * channels * (W - 1), cnp + b * channels * (W - 1), xbc,
                         channels, W);
        std::copy(row, row + inner, gate);
        silu_inplace<T>(gate, inner);
        const T *xs = xbc, *Bs = xbc + inner, *Cs = Bs + G * N, *dt = row + inner + channels;
        T* yb = yp + b * inner;
        for (int64_t h = 0; h < H; ++h) {
          const T d = ssd_dt<T>(dt[h] + bias[h], softplus, lo, hi);
          const int64_t g = h / heads_per_group, bh = b * H + h;
          ssd_head<T>(s + bh * P * N, sn + bh * P * N, xs + h * P, d, std::exp(d * a_rate[h]), Bs + g * N,
                      Cs + g * N, yb + h * P, P, N);
          for (int64_t p = h * P; p < (h + 1) * P; ++p) yb[p] = (yb[p] + skip[h] * xs[p]) * gate[p];
        }
        rms_norm_inplace(yb, nwp, eps, inner);
      }
    });
  });
  return {seqmix_cpu::times_weight(in_dtype(y, x.scalar_type()), out_weight, "mamba2_step_cpu"), cn, Sn};
}

// One token of a DeltaNet or Gated DeltaNet layer with its projections (seqmix/archs/deltanet.py), in one call:
// f = x in_weight^T [B, F] is the one input projection's output, q|k|v [2 H K + H V] | the output gate [H V]
// (with has_gate) | b [H] |
// a [H] (with A_log); the short conv with SiLU over q|k|v (conv_weight [2 H K + H V, W], no bias, conv_state
// [B, 2 H K + H V, W-1]; without them SiLU alone); q and k L2-normalised per head (l2_eps); beta = sigmoid(b);
// the decay g = -exp(A_log) softplus(a + dt_bias) (no decay without A_log); the (gated) delta rule's step on
// state [B, H, K, V] (delta_head); each head's output RMS-normalised over V (norm_weight [V], norm_eps) and
// multiplied by silu(gate); o_proj (out_weight [hidden, H V]). Returns its output [B, hidden] in x's dtype, the
// conv state (an empty tensor without a conv) and the rule's state, the states float32 (float64 for float64 x)
// and new tensors.
std::vector<at::Tensor> deltanet_step(const at::Tensor& x, const at::Tensor& in_weight,
                                      const c10::optional<at::Tensor>& conv_weight,
                                      const c10::optional<at::Tensor>& conv_state, const at::Tensor& state,
                                      const c10::optional<at::Tensor>& A_log, const c10::optional<at::Tensor>& dt_bias,
                                      const at::Tensor& norm_weight, double norm_eps, bool has_gate, double scale,
                                      double l2_eps, const at::Tensor& out_weight) {
  check_cpu({x, in_weight, conv_weight.value_or(at::Tensor()), conv_state.value_or(at::Tensor()), state,
             A_log.value_or(at::Tensor()), dt_bias.value_or(at::Tensor()), norm_weight, out_weight},
            "deltanet_step_cpu");
  const at::Tensor f = seqmix_cpu::times_weight(x, in_weight, "deltanet_step_cpu");
  const bool conv = conv_weight.has_value(), decay = A_log.has_value();
  TORCH_CHECK(state.dim() == 4 && conv == conv_state.has_value() && decay == dt_bias.has_value(),
              "deltanet_step_cpu: state [B, H, K, V], the conv's weight and state together, A_log and dt_bias "
              "together");
  const auto dtype = compute_dtype(f);
  const int64_t B = f.size(0), H = state.size(1), K = state.size(2), V = state.size(3);
  const int64_t channels = 2 * H * K + H * V, W = conv ? conv_weight->size(1) : 1;
  TORCH_CHECK(state.size(0) == B && f.size(1) == channels + (has_gate ? H * V : 0) + (decay ? 2 * H : H) &&
                  norm_weight.numel() == V && (!decay || (A_log->numel() == H && dt_bias->numel() == H)) &&
                  (!conv || (conv_weight->dim() == 2 && conv_weight->size(0) == channels && conv_state->dim() == 3 &&
                             conv_state->size(0) == B && conv_state->size(1) == channels &&
                             conv_state->size(2) == W - 1)),
              "deltanet_step_cpu: the shapes (in_weight's rows included) do not describe one DeltaNet layer");
  const at::Tensor fc = prepared(f, dtype), S = prepared_state(state, dtype), nw = dense(norm_weight, dtype);
  const at::Tensor cw = conv ? dense(*conv_weight, dtype) : at::Tensor();
  const at::Tensor cs = conv ? dense(*conv_state, dtype) : at::Tensor();
  const at::Tensor al = decay ? dense(*A_log, dtype) : at::Tensor(), db = decay ? dense(*dt_bias, dtype) : at::Tensor();
  at::Tensor Sn = at::empty({B, H, K, V}, f.options().dtype(dtype));
  const std::vector<int64_t> window_shape =
      conv ? std::vector<int64_t>{B, channels, W - 1} : std::vector<int64_t>{0, 0, 0};
  at::Tensor cn = at::empty(window_shape, f.options().dtype(dtype));  // empty without a conv
  at::Tensor o = at::empty({B, H * V}, f.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(dtype, "deltanet_step_cpu", [&] {
    using T = scalar_t;
    const T *fp = fc.data_ptr<T>(), *s = S.data_ptr<T>(), *nwp = nw.data_ptr<T>();
    const T *cwp = conv ? cw.data_ptr<T>() : nullptr, *csp = conv ? cs.data_ptr<T>() : nullptr;
    const T *alp = decay ? al.data_ptr<T>() : nullptr, *dbp = decay ? db.data_ptr<T>() : nullptr;
    T *sn = Sn.data_ptr<T>(), *cnp = conv ? cn.data_ptr<T>() : nullptr, *op = o.data_ptr<T>();
    const int64_t row_stride = fc.stride(0);
    const int64_t grain = std::max<int64_t>(1, kValuesPerTask / std::max<int64_t>(H * K * V, 1));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      std::vector<T> buffer(channels + V + (has_gate ? H * V : 0));
      T *qkv = buffer.data(), *w = qkv + channels, *gate = has_gate ? w + V : nullptr;  // gate: silu(g) [H V]
      for (int64_t b = begin; b < end; ++b) {
        const T* row = fp + b * row_stride;  // q|k|v | gate | b | a
        if (conv) {
          const int64_t window = channels * (W - 1);
          conv_silu_row<T>(row, cwp, nullptr, csp + b * window, cnp + b * window, qkv, channels, W);
        } else {
          std::copy(row, row + channels, qkv);
          silu_inplace<T>(qkv, channels);
        }
        for (int64_t r = 0; r < 2 * H; ++r) {  // q and k: x rsqrt(sum(x^2) + eps) per head
          T* x = qkv + r * K;
          const T inv = seqmix_cpu::rms_scale(x, K, T(1), l2_eps);
          for (int64_t i = 0; i < K; ++i) x[i] *= inv;
        }
        if (gate) {
          std::copy(row + channels, row + channels + H * V, gate);
          silu_inplace<T>(gate, H * V);
        }
        const T* strengths = row + channels + (has_gate ? H * V : 0);  // b, then a
        T* ob = op + b * H * V;
        for (int64_t h = 0; h < H; ++h) {
          const int64_t bh = b * H + h;
          const T beta = T(1) / (T(1) + std::exp(-strengths[h]));
          T a = 1;
          if (decay) {
            T sp = strengths[H + h] + dbp[h];
            if (sp <= T(kSoftplusThreshold)) sp = std::log1p(std::exp(sp));
            a = std::exp(-(sp * std::exp(alp[h])));
          }
          T* oh = ob + h * V;
          delta_head<T>(s + bh * K * V, sn + bh * K * V, qkv + h * K, qkv + (H + h) * K, qkv + 2 * H * K + h * V,
                        beta, a, T(scale), oh, w, K, V);
          rms_norm_inplace(oh, nwp, norm_eps, V);
          if (gate)
            for (int64_t j = 0; j < V; ++j) oh[j] *= gate[h * V + j];
        }
      }
    });
  });
  return {seqmix_cpu::times_weight(in_dtype(o, x.scalar_type()), out_weight, "deltanet_step_cpu"), cn, Sn};
}

}  // namespace

// One token of a GLA layer with its projections (seqmix/archs/gla.py), in one call: f = x in_weight^T [B, F] is the
// input projections' output, q [H K] | k [H K] | v [H V] | the output gate [H V] (with has_gate) | the decay's
// low-rank
// projection [R]; g = logsigmoid(up_weight low + up_bias) / normalizer [H K] (up_weight [H K, R], up_bias
// [H K]); GLA's step on state [B, H, K, V] (gla_head); each head's output RMS-normalised over V (norm_weight
// [V], eps) and multiplied by silu(gate); o_proj (out_weight [hidden, H V]). Returns its output [B, hidden] in
// x's dtype and the new state (float32, float64 for float64 x).
std::vector<at::Tensor> gla_layer_step(const at::Tensor& x, const at::Tensor& in_weight, const at::Tensor& up_weight,
                                       const at::Tensor& up_bias, double normalizer, const at::Tensor& state,
                                       const at::Tensor& norm_weight, double eps, bool has_gate, double scale,
                                       const at::Tensor& out_weight) {
  check_cpu({x, in_weight, up_weight, up_bias, state, norm_weight, out_weight}, "gla_layer_step_cpu");
  const at::Tensor f = seqmix_cpu::times_weight(x, in_weight, "gla_layer_step_cpu");
  TORCH_CHECK(state.dim() == 4 && up_weight.dim() == 2,
              "gla_layer_step_cpu: state [B, H, K, V], up_weight [H K, R]");
  const auto dtype = compute_dtype(f);
  const int64_t B = f.size(0), H = state.size(1), K = state.size(2), V = state.size(3), R = up_weight.size(1);
  const int64_t gate_width = has_gate ? H * V : 0;
  TORCH_CHECK(state.size(0) == B && up_weight.size(0) == H * K && up_bias.numel() == H * K &&
                  norm_weight.numel() == V && f.size(1) == 2 * H * K + H * V + gate_width + R,
              "gla_layer_step_cpu: the shapes (in_weight's rows included) do not describe one GLA layer");
  const at::Tensor fc = prepared(f, dtype), S = prepared_state(state, dtype), uw = dense(up_weight, dtype);
  const at::Tensor ub = dense(up_bias, dtype), nw = dense(norm_weight, dtype);
  at::Tensor Sn = at::empty({B, H, K, V}, f.options().dtype(dtype));
  at::Tensor o = at::empty({B, H * V}, f.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(dtype, "gla_layer_step_cpu", [&] {
    using T = scalar_t;
    const T *fp = fc.data_ptr<T>(), *s = S.data_ptr<T>(), *uwp = uw.data_ptr<T>(), *ubp = ub.data_ptr<T>();
    const T* nwp = nw.data_ptr<T>();
    T *sn = Sn.data_ptr<T>(), *out = o.data_ptr<T>();
    const int64_t row_stride = fc.stride(0);
    const int64_t grain = std::max<int64_t>(1, kValuesPerTask / std::max<int64_t>(H * K * V, 1));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      std::vector<T> buffer(H * K + gate_width);
      T *g = buffer.data(), *gate = g + H * K;
      for (int64_t b = begin; b < end; ++b) {
        const T* row = fp + b * row_stride;  // q | k | v | gate | low
        const T *q = row, *k = q + H * K, *v = k + H * K, *low = v + H * V + gate_width;
        for (int64_t i = 0; i < H * K; ++i) {  // logsigmoid(x) = min(x, 0) - log1p(exp(-|x|))
          const T x = dot(uwp + i * R, low, R) + ubp[i];
          g[i] = (std::min(x, T(0)) - std::log1p(std::exp(-std::abs(x)))) / T(normalizer);
        }
        if (has_gate) {
          std::copy(v + H * V, v + 2 * H * V, gate);
          silu_inplace<T>(gate, H * V);
        }
        for (int64_t h = 0; h < H; ++h) {
          const int64_t bh = b * H + h;
          T* oh = out + bh * V;
          gla_head<T>(s + bh * K * V, sn + bh * K * V, q + h * K, k + h * K, v + h * V, g + h * K, T(scale), oh, K, V);
          rms_norm_inplace(oh, nwp, eps, V);
          if (has_gate)
            for (int64_t j = 0; j < V; ++j) oh[j] *= gate[h * V + j];
        }
      }
    });
  });
  return {seqmix_cpu::times_weight(in_dtype(o, x.scalar_type()), out_weight, "gla_layer_step_cpu"), Sn};
}

// One Mamba channel: h'[n] = exp(delta A[n]) h[n] + delta u B[n] over its N states; returns the lanes of h' . C
// (their sum is the channel's output: the caller sums the lanes of W channels at once).
template <typename T>
Vec<T> scan_channel(const T* h, T* hn, const T* A, T delta, T u, const T* Bn, const T* Cn, int64_t N) {
  constexpr int64_t L = Lanes<T>::W;
  const Vec<T> dv = splat<T>(delta), du = splat<T>(delta * u);
  Vec<T> acc{};
  for (int64_t n = 0; n < N; n += L) {
    const int64_t m = std::min(L, N - n);
    const Vec<T> v = exp_v<T>(dv * load_upto(A + n, m)) * load_upto(h + n, m) + du * load_upto(Bn + n, m);
    store_upto(hn + n, v, m);
    acc += v * load_upto(Cn + n, m);
  }
  return acc;
}

// The scan's step over D channels: y[d] = h'_d . C for delta [D], u [D], the states h, hn [D, N] and A [D, N]
// (W channels' sums at once: sum_rows, so the channels' exps overlap).
template <typename T>
void scan_channels(const T* h, T* hn, const T* A, const T* delta, const T* u, const T* Bn, const T* Cn, T* y,
                   int64_t D, int64_t N) {
  seqmix_cpu::sum_rows<T>(D, y, [&](int64_t d) {
    return scan_channel<T>(h + d * N, hn + d * N, A + d * N, delta[d], u[d], Bn, Cn, N);
  });
}

// One token of a Mamba layer with its projections (seqmix/archs/mamba.py), in one call: f = x in_weight^T [B, 2 D]
// is in_proj's output, x | z; the short conv with SiLU over x (conv_weight [D, W], conv_bias [D], conv_state
// [B, D, W-1]);
// x_proj (x_proj_weight [R + 2 N, D]) to the step's low rank [R] | B [N] | C [N]; delta = softplus(dt_proj_weight
// [D, R] . low + dt_proj_bias [D]); the selective scan's step on ssm_state [B, D, N] with A [D, N] (scan_channel)
// and y = (h' C + D_skip x) silu(z); out_proj (out_weight [hidden, D]). Returns its output [B, hidden] in x's dtype
// and the two new states (float32, float64 for float64 x).
std::vector<at::Tensor> mamba_step(const at::Tensor& x, const at::Tensor& in_weight, const at::Tensor& conv_weight,
                                   const at::Tensor& conv_bias, const at::Tensor& conv_state,
                                   const at::Tensor& x_proj_weight, const at::Tensor& dt_proj_weight,
                                   const at::Tensor& dt_proj_bias, const at::Tensor& A, const at::Tensor& D,
                                   const at::Tensor& ssm_state, const at::Tensor& out_weight) {
  check_cpu({x, in_weight, conv_weight, conv_bias, conv_state, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D,
             ssm_state, out_weight},
            "mamba_step_cpu");
  const at::Tensor f = seqmix_cpu::times_weight(x, in_weight, "mamba_step_cpu");
  TORCH_CHECK(ssm_state.dim() == 3 && conv_weight.dim() == 2 && conv_state.dim() == 3 &&
                  x_proj_weight.dim() == 2 && dt_proj_weight.dim() == 2,
              "mamba_step_cpu: ssm_state [B, D, N], conv_weight [D, W], conv_state [B, D, W-1], "
              "x_proj_weight [R + 2 N, D], dt_proj_weight [D, R]");
  const auto dtype = compute_dtype(f);
  const int64_t B = f.size(0), Dm = ssm_state.size(1), N = ssm_state.size(2), W = conv_weight.size(1);
  const int64_t R = dt_proj_weight.size(1);
  TORCH_CHECK(f.size(1) == 2 * Dm && ssm_state.size(0) == B && conv_weight.size(0) == Dm && conv_bias.numel() == Dm &&
                  conv_state.size(0) == B && conv_state.size(1) == Dm && conv_state.size(2) == W - 1 &&
                  x_proj_weight.size(0) == R + 2 * N && x_proj_weight.size(1) == Dm && dt_proj_weight.size(0) == Dm &&
                  dt_proj_bias.numel() == Dm && A.numel() == Dm * N && D.numel() == Dm,
              "mamba_step_cpu: the shapes (in_weight's rows included) do not describe one Mamba layer");
  const at::Tensor fc = prepared(f, dtype), S = dense(ssm_state, dtype), cs = dense(conv_state, dtype);
  const at::Tensor cw = dense(conv_weight, dtype), cb = dense(conv_bias, dtype), xw = dense(x_proj_weight, dtype);
  const at::Tensor dw = dense(dt_proj_weight, dtype), db = dense(dt_proj_bias, dtype), Ac = dense(A, dtype);
  const at::Tensor Dc = dense(D, dtype);
  at::Tensor Sn = at::empty({B, Dm, N}, f.options().dtype(dtype));
  at::Tensor cn = at::empty({B, Dm, W - 1}, f.options().dtype(dtype));
  at::Tensor y = at::empty({B, Dm}, f.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(dtype, "mamba_step_cpu", [&] {
    using T = scalar_t;
    const T *fp = fc.data_ptr<T>(), *s = S.data_ptr<T>(), *csp = cs.data_ptr<T>(), *cwp = cw.data_ptr<T>();
    const T *cbp = cb.data_ptr<T>(), *xwp = xw.data_ptr<T>(), *dwp = dw.data_ptr<T>(), *dbp = db.data_ptr<T>();
    const T *Ap = Ac.data_ptr<T>(), *skip = Dc.data_ptr<T>();
    T *sn = Sn.data_ptr<T>(), *cnp = cn.data_ptr<T>(), *yp = y.data_ptr<T>();
    const int64_t row_stride = fc.stride(0);
    const int64_t grain = std::max<int64_t>(1, kValuesPerTask / std::max<int64_t>(Dm * N, 1));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      std::vector<T> buffer(3 * Dm + R + 2 * N);
      T *xc = buffer.data(), *gate = xc + Dm, *delta = gate + Dm, *proj = delta + Dm;  // proj: low [R] | B | C
      for (int64_t b = begin; b < end; ++b) {
        const T* row = fp + b * row_stride;  // x | z
        conv_silu_row<T>(row, cwp, cbp, csp + b * Dm * (W - 1), cnp + b * Dm * (W - 1), xc, Dm, W);
        std::copy(row + Dm, row + 2 * Dm, gate);
        silu_inplace<T>(gate, Dm);
        seqmix_cpu::matrix_times_row(xwp, xc, proj, R + 2 * N, Dm);
        seqmix_cpu::matrix_times_row(dwp, proj, delta, Dm, R);
        softplus_plus_inplace<T>(delta, dbp, Dm);
        T* yb = yp + b * Dm;
        scan_channels<T>(s + b * Dm * N, sn + b * Dm * N, Ap, delta, xc, proj + R, proj + R + N, yb, Dm, N);
        for (int64_t d = 0; d < Dm; ++d) yb[d] = (yb[d] + skip[d] * xc[d]) * gate[d];
      }
    });
  });
  return {seqmix_cpu::times_weight(in_dtype(y, x.scalar_type()), out_weight, "mamba_step_cpu"), cn, Sn};
}

void bind_recurrent_steps(pybind11::module& m) {
  m.def("delta_rule_step", &delta_rule_step, "one token of the (gated) delta rule (CPU)");
  m.def("gla_step", &gla_step, "one token of gated linear attention (CPU)");
  m.def("ssd_step", &ssd_step, "one token of Mamba-2's SSD (CPU)");
  m.def("deltanet_step", &deltanet_step, "one token of a (Gated) DeltaNet layer with its projections (CPU)");
  m.def("mamba2_step", [](const at::Tensor& x, const at::Tensor& in_weight, const at::Tensor& conv_weight,
                          const at::Tensor& conv_bias, const at::Tensor& conv_state, const at::Tensor& A,
                          const at::Tensor& D, const at::Tensor& dt_bias, bool softplus, double lo, double hi,
                          const at::Tensor& ssm_state, const at::Tensor& norm_weight, double eps,
                          const at::Tensor& out_weight) {
    return mamba2_step(x, in_weight, conv_weight, conv_bias, conv_state, A, D, dt_bias, softplus, lo, hi, ssm_state,
                       norm_weight, eps, out_weight);
  }, "one token of a Mamba-2 layer with its projections (CPU)");
  m.def("gla_layer_step", &gla_layer_step, "one token of a GLA layer with its projections (CPU)");
  m.def("mamba_step", &mamba_step, "one token of a Mamba layer with its projections (CPU)");
  // The layers' steps for decoder_cpu.cpp, their arguments in the order of seqmix/kernels/step_cpu.py's ops.
  using seqmix_cpu::StepArgs;
  seqmix_cpu::register_layer_step("seqmix::deltanet_step_cpu", [](const StepArgs& a) {
    return deltanet_step(a.t(0), a.t(1), a.tensors[2], a.tensors[3], a.t(4), a.tensors[5], a.tensors[6], a.t(7),
                         a.numbers[0], a.flags[0], a.numbers[1], a.numbers[2], a.t(8));
  });
  seqmix_cpu::register_layer_step("seqmix::mamba2_step_cpu", [](const StepArgs& a) {
    return mamba2_step(a.t(0), a.t(1), a.t(2), a.t(3), a.t(4), a.t(5), a.t(6), a.t(7), a.flags[0], a.numbers[0],
                       a.numbers[1], a.t(8), a.t(9), a.numbers[2], a.t(10), a.in_place);
  });
  seqmix_cpu::register_layer_step("seqmix::gla_layer_step_cpu", [](const StepArgs& a) {
    return gla_layer_step(a.t(0), a.t(1), a.t(2), a.t(3), a.numbers[0], a.t(4), a.t(5), a.numbers[1], a.flags[0],
                          a.numbers[2], a.t(6));
  });
  seqmix_cpu::register_layer_step("seqmix::mamba_step_cpu", [](const StepArgs& a) {
    return mamba_step(a.t(0), a.t(1), a.t(2), a.t(3), a.t(4), a.t(5), a.t(6), a.t(7), a.t(8), a.t(9), a.t(10),
                      a.t(11));
  });
}
