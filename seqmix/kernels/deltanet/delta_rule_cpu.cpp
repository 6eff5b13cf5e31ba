// The delta rule and the gated delta rule on the CPU for training: forward and backward, token by token,
// float32 and float64 (the math: docs/math/deltanet.md, "The token recurrence on the CPU"; why:
// docs/design.md, "CPU references (issue 14)").
//
// Inputs arrive packed and contiguous, in the compute dtype (the caller converts): q, k [L, H, K],
// v [L, H, V], beta and g [L, H] (g absent: the plain delta rule), the initial state h0 [Nseq, H, K, V], the
// sequence boundaries cu_seqlens [Nseq + 1] and each sequence's first chunk chunk_offsets (int64).
//
// One task owns one (sequence, head) and walks its tokens in order, keeping the [K, V] state in a local
// array (rows of V values, padded to whole vectors of W lanes) that stays in L1 at the LM's head dims.
// The forward's sums over K (S^T k, S^T q) add rows, never lanes. The forward stores the state entering
// every chunk of `chunk` tokens; the backward walks a sequence's chunks from the last, recomputes the
// states entering each of the chunk's tokens from its checkpoint into a buffer of the task, and runs the
// reverse recurrence over them, carrying dS. Every gradient of a token belongs to one task: no partial
// sums, no atomics, and the result does not depend on the schedule.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// One vector of W values (64 bytes: one AVX-512 register, two AVX2 ones), as GCC vector types.
template <typename T>
struct Lanes;

template <>
struct Lanes<float> {
  typedef float V __attribute__((vector_size(64)));
  static constexpr int W = 16;
};

template <>
struct Lanes<double> {
  typedef double V __attribute__((vector_size(64)));
  static constexpr int W = 8;
};

template <typename T>
using Vec = typename Lanes<T>::V;

// The sum of a vector's lanes, halves added until one lane is left (a fixed order).
template <typename T>
inline T lane_sum(Vec<T> v) {
  constexpr int W = Lanes<T>::W;
  T x[W];
  std::memcpy(x, &v, sizeof(v));
  for (int w = W / 2; w >= 1; w /= 2)
    for (int c = 0; c < w; ++c) x[c] += x[c + w];
  return x[0];
}

// Everything a task reads, with the problem's sizes; nv vectors of W lanes hold a row of V values.
template <typename T>
struct Problem {
  const T *q, *k, *v, *beta, *g, *h0;
  const int64_t *cu, *chunk_offsets;
  int64_t H, K, V, nv, chunk;
  T scale;
  int64_t padded() const { return nv * Lanes<T>::W; }
  int64_t state_size() const { return K * padded(); }  // values of a stored state (checkpoint)
};

// A row of V values (token t's v or do of head h) as nv vectors, zero past V.
template <typename T>
inline void load_row(const T* src, int64_t V, Vec<T>* dst, int64_t nv) {
  constexpr int W = Lanes<T>::W;
  for (int64_t j = 0; j < nv; ++j) {
    const int64_t n = std::min<int64_t>(W, V - j * W);
    Vec<T> x{};
    std::memcpy(&x, src + j * W, n * sizeof(T));
    dst[j] = x;
  }
}

template <typename T>
inline void store_row(T* dst, int64_t V, const Vec<T>* src, int64_t nv) {
  constexpr int W = Lanes<T>::W;
  for (int64_t j = 0; j < nv; ++j) std::memcpy(dst + j * W, &src[j], std::min<int64_t>(W, V - j * W) * sizeof(T));
}

// A [K, V] state (h0, the final state, dh0) to and from the padded rows of a task.
template <typename T>
void state_in(const Problem<T>& p, const T* src, Vec<T>* S) {
  for (int64_t i = 0; i < p.K; ++i) {
    if (src) {
      load_row(src + i * p.V, p.V, S + i * p.nv, p.nv);
    } else {
      std::fill(S + i * p.nv, S + (i + 1) * p.nv, Vec<T>{});
    }
  }
}

template <typename T>
void state_out(const Problem<T>& p, const Vec<T>* S, T* dst) {
  for (int64_t i = 0; i < p.K; ++i) store_row(dst + i * p.V, p.V, S + i * p.nv, p.nv);
}

// Rows of a token of head h in a [L, H, D] tensor.
template <typename T>
inline const T* row(const T* x, int64_t t, int64_t h, int64_t H, int64_t D) {
  return x + (t * H + h) * D;
}

// u = S^T k (sums over K of rows), four partial sums so that the multiply-adds do not wait on each other.
// Accumulates into acc[4][nv], which the caller zeroes and then adds up.
template <typename T>
inline void rows_times(const Vec<T>* S, const T* x, int64_t K, int64_t nv, Vec<T> (*acc)[4]) {
  for (int64_t i = 0; i < K; ++i) {
    const Vec<T>* s = S + i * nv;
    for (int64_t j = 0; j < nv; ++j) acc[j][i & 3] += x[i] * s[j];
  }
}

// One token of the forward: S <- a S, w = v - S^T k, S <- S + beta k w^T; returns o = scale S^T q into o
// (when o is not null) and w into w_out (when not null). acc: nv x 4 scratch vectors.
template <typename T>
inline void fwd_token(const Problem<T>& p, Vec<T>* S, int64_t t, int64_t h, Vec<T>* o, Vec<T>* w_out,
                      Vec<T> (*acc)[4], Vec<T>* w) {
  const int64_t K = p.K, nv = p.nv;
  const T* kt = row(p.k, t, h, p.H, K);
  const T a = p.g ? std::exp(p.g[t * p.H + h]) : T(1);
  const T b = p.beta[t * p.H + h];
  for (int64_t j = 0; j < nv; ++j) std::fill(acc[j], acc[j] + 4, Vec<T>{});
  rows_times(S, kt, K, nv, acc);
  load_row(row(p.v, t, h, p.H, p.V), p.V, w, nv);
  for (int64_t j = 0; j < nv; ++j) {
    w[j] -= a * ((acc[j][0] + acc[j][1]) + (acc[j][2] + acc[j][3]));
    if (w_out) w_out[j] = w[j];
    w[j] *= b;  // now d = beta w, the row written
  }
  if (!o) {
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j < nv; ++j) S[i * nv + j] = a * S[i * nv + j] + kt[i] * w[j];
    return;
  }
  const T* qt = row(p.q, t, h, p.H, K);
  for (int64_t j = 0; j < nv; ++j) std::fill(acc[j], acc[j] + 4, Vec<T>{});
  for (int64_t i = 0; i < K; ++i) {
    Vec<T>* s = S + i * nv;
    for (int64_t j = 0; j < nv; ++j) {
      s[j] = a * s[j] + kt[i] * w[j];
      acc[j][i & 3] += qt[i] * s[j];
    }
  }
  for (int64_t j = 0; j < nv; ++j) o[j] = p.scale * ((acc[j][0] + acc[j][1]) + (acc[j][2] + acc[j][3]));
}

template <typename T>
void fwd_task(const Problem<T>& p, int64_t s, int64_t h, T* out, T* ht, T* hc) {
  const int64_t K = p.K, nv = p.nv, H = p.H;
  std::vector<Vec<T>> S(K * nv), o(nv), w(nv), acc(nv * 4);
  auto* a4 = reinterpret_cast<Vec<T>(*)[4]>(acc.data());
  state_in(p, p.h0 ? p.h0 + (s * H + h) * K * p.V : nullptr, S.data());
  const int64_t bos = p.cu[s], eos = p.cu[s + 1];
  for (int64_t t = bos; t < eos; ++t) {
    if (hc && (t - bos) % p.chunk == 0) {
      const int64_t c = p.chunk_offsets[s] + (t - bos) / p.chunk;
      std::memcpy(hc + (c * H + h) * p.state_size(), S.data(), K * nv * sizeof(Vec<T>));
    }
    fwd_token(p, S.data(), t, h, o.data(), nullptr, a4, w.data());
    store_row(out + (t * H + h) * p.V, p.V, o.data(), nv);
  }
  if (ht) state_out(p, S.data(), ht + (s * H + h) * K * p.V);
}

// What a backward task writes and reads besides the inputs.
template <typename T>
struct Grads {
  T *dq, *dk, *dv, *dbeta, *dg, *dh0;
  const T *dout, *dht, *hc;
};

// The reverse of one token (docs/math/deltanet.md, "The token recurrence on the CPU"), with Sp the state
// before it and w = v - a Sp^T k: dS holds the gradient of the state after the token on entry, of the state
// before it on exit. scratch: 5 nv vectors.
template <typename T>
inline void bwd_token(const Problem<T>& p, const Grads<T>& g, int64_t t, int64_t h, const Vec<T>* Sp,
                      const Vec<T>* w, Vec<T>* dS, Vec<T>* scratch) {
  const int64_t K = p.K, V = p.V, nv = p.nv, H = p.H;
  const T* qt = row(p.q, t, h, H, K);
  const T* kt = row(p.k, t, h, H, K);
  const T a = p.g ? std::exp(p.g[t * H + h]) : T(1);
  const T b = p.beta[t * H + h];
  Vec<T>* dout = scratch;
  Vec<T>* d = scratch + nv;
  Vec<T>* dd = scratch + 2 * nv;
  Vec<T>* du = scratch + 3 * nv;
  Vec<T>* dv = scratch + 4 * nv;
  load_row(row(g.dout, t, h, H, V), V, dout, nv);
  Vec<T> ddo{};
  for (int64_t j = 0; j < nv; ++j) {
    d[j] = b * w[j];
    ddo += d[j] * dout[j];
    dd[j] = Vec<T>{};
  }
  const T d_dot_do = lane_sum<T>(ddo);
  // The output: dS += scale q do^T, dq = scale S_t do with S_t = a Sp + k d^T. Then dd = dS^T k.
  T* dq = g.dq + (t * H + h) * K;
  for (int64_t i = 0; i < K; ++i) {
    Vec<T>* ds = dS + i * nv;
    const Vec<T>* sp = Sp + i * nv;
    const T sq = p.scale * qt[i];
    Vec<T> hq{};
    for (int64_t j = 0; j < nv; ++j) {
      ds[j] += sq * dout[j];
      dd[j] += kt[i] * ds[j];
      hq += sp[j] * dout[j];
    }
    dq[i] = p.scale * (a * lane_sum<T>(hq) + kt[i] * d_dot_do);
  }
  // d = beta (v - a Sp^T k): dv = beta dd, dbeta = dd . w, du = -beta dd the gradient of u = a Sp^T k.
  Vec<T> db{};
  for (int64_t j = 0; j < nv; ++j) {
    db += dd[j] * w[j];
    dv[j] = b * dd[j];
    du[j] = -dv[j];
  }
  store_row(g.dv + (t * H + h) * V, V, dv, nv);
  g.dbeta[t * H + h] = lane_sum<T>(db);
  // dk = dS d + a Sp du; dS' = dS + k du^T (the decayed state's); dg = a <dS', Sp>; dS <- a dS'.
  T* dk = g.dk + (t * H + h) * K;
  Vec<T> ga{};
  for (int64_t i = 0; i < K; ++i) {
    Vec<T>* ds = dS + i * nv;
    const Vec<T>* sp = Sp + i * nv;
    Vec<T> hk{};
    for (int64_t j = 0; j < nv; ++j) {
      hk += ds[j] * d[j] + a * (sp[j] * du[j]);
      ds[j] += kt[i] * du[j];
      ga += ds[j] * sp[j];
      ds[j] *= a;
    }
    dk[i] = lane_sum<T>(hk);
  }
  if (g.dg) g.dg[t * H + h] = a * lane_sum<T>(ga);
}

template <typename T>
void bwd_task(const Problem<T>& p, const Grads<T>& g, int64_t s, int64_t h) {
  const int64_t K = p.K, nv = p.nv, H = p.H, C = p.chunk, KV = K * nv;
  // The states entering each token of a chunk, and each token's w = v - a Sp^T k.
  std::vector<Vec<T>> states((C + 1) * KV), w(C * nv), dS(KV), scratch(5 * nv), acc(nv * 4), tmp(nv);
  auto* a4 = reinterpret_cast<Vec<T>(*)[4]>(acc.data());
  state_in(p, g.dht ? g.dht + (s * H + h) * K * p.V : nullptr, dS.data());
  const int64_t bos = p.cu[s], eos = p.cu[s + 1];
  const int64_t chunks = (eos - bos + C - 1) / C;
  for (int64_t c = chunks - 1; c >= 0; --c) {
    const int64_t t0 = bos + c * C, t1 = std::min(t0 + C, eos);
    std::memcpy(states.data(), g.hc + ((p.chunk_offsets[s] + c) * H + h) * p.state_size(), KV * sizeof(Vec<T>));
    for (int64_t t = t0; t < t1 - 1; ++t) {
      Vec<T>* next = states.data() + (t - t0 + 1) * KV;
      std::memcpy(next, next - KV, KV * sizeof(Vec<T>));
      fwd_token(p, next, t, h, static_cast<Vec<T>*>(nullptr), w.data() + (t - t0) * nv, a4, tmp.data());
    }
    // The last token's w (its state after is not needed).
    {
      const int64_t t = t1 - 1;
      const Vec<T>* Sp = states.data() + (t - t0) * KV;
      const T* kt = row(p.k, t, h, H, K);
      const T a = p.g ? std::exp(p.g[t * H + h]) : T(1);
      for (int64_t j = 0; j < nv; ++j) std::fill(a4[j], a4[j] + 4, Vec<T>{});
      rows_times(Sp, kt, K, nv, a4);
      Vec<T>* wl = w.data() + (t - t0) * nv;
      load_row(row(p.v, t, h, H, p.V), p.V, wl, nv);
      for (int64_t j = 0; j < nv; ++j) wl[j] -= a * ((a4[j][0] + a4[j][1]) + (a4[j][2] + a4[j][3]));
    }
    for (int64_t t = t1 - 1; t >= t0; --t)
      bwd_token(p, g, t, h, states.data() + (t - t0) * KV, w.data() + (t - t0) * nv, dS.data(), scratch.data());
  }
  if (g.dh0) state_out(p, dS.data(), g.dh0 + (s * H + h) * K * p.V);
}

template <typename T>
const T* data_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() && t->numel() > 0 ? t->data_ptr<T>() : nullptr;
}

template <typename T>
Problem<T> problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                   const c10::optional<at::Tensor>& g, const c10::optional<at::Tensor>& h0, const at::Tensor& cu,
                   const at::Tensor& chunk_offsets, int64_t chunk, double scale) {
  const int64_t V = v.size(2);
  return {q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), beta.data_ptr<T>(), data_or_null<T>(g),
          data_or_null<T>(h0), cu.data_ptr<int64_t>(), chunk_offsets.data_ptr<int64_t>(), q.size(1), q.size(2), V,
          (V + Lanes<T>::W - 1) / Lanes<T>::W, chunk, static_cast<T>(scale)};
}

// Runs task(sequence, head) over every pair, in parallel over torch's threads.
template <typename F>
void over_heads(int64_t nseq, int64_t H, const F& task) {
  at::parallel_for(0, nseq * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) task(i / H, i % H);
  });
}

void check_inputs(const std::vector<at::Tensor>& tensors, const at::Tensor& q) {
  for (const auto& t : tensors) {
    if (!t.defined() || t.numel() == 0) continue;
    TORCH_CHECK(t.device().is_cpu(), "delta_rule_cpu: tensors must be on the CPU");
    TORCH_CHECK(t.is_contiguous(), "delta_rule_cpu: tensors must be contiguous");
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), "delta_rule_cpu: tensors must all be in q's dtype");
  }
}

void check_bounds(const at::Tensor& cu_seqlens, const at::Tensor& chunk_offsets) {
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kLong && chunk_offsets.scalar_type() == at::kLong,
              "delta_rule_cpu: cu_seqlens and chunk_offsets must be int64");
  TORCH_CHECK(cu_seqlens.is_contiguous() && chunk_offsets.is_contiguous(),
              "delta_rule_cpu: cu_seqlens and chunk_offsets must be contiguous");
}

at::Tensor opt_or_empty(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

}  // namespace

// Returns (o [L, H, V], the final state [Nseq, H, K, V] or empty, the checkpoints [NC, H, K, padded V] or
// empty).
std::vector<at::Tensor> delta_rule_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& beta, const c10::optional<at::Tensor>& g,
                                       const c10::optional<at::Tensor>& h0, const at::Tensor& cu_seqlens,
                                       const at::Tensor& chunk_offsets, int64_t chunk, int64_t num_chunks,
                                       double scale, bool store_final, bool store_chunks) {
  check_inputs({q, k, v, beta, opt_or_empty(g), opt_or_empty(h0)}, q);
  check_bounds(cu_seqlens, chunk_offsets);
  TORCH_CHECK(chunk > 0, "delta_rule_cpu: chunk must be positive");
  const int64_t nseq = cu_seqlens.numel() - 1, H = q.size(1), K = q.size(2), V = v.size(2);
  at::Tensor out = at::empty({q.size(0), H, V}, q.options());
  at::Tensor ht = store_final ? at::empty({nseq, H, K, V}, q.options()) : at::empty({0}, q.options());
  at::Tensor hc;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "delta_rule_fwd", [&] {
    const auto p = problem<scalar_t>(q, k, v, beta, g, h0, cu_seqlens, chunk_offsets, chunk, scale);
    hc = store_chunks ? at::empty({num_chunks, H, K, p.padded()}, q.options()) : at::empty({0}, q.options());
    scalar_t* o = out.data_ptr<scalar_t>();
    scalar_t* f = store_final ? ht.data_ptr<scalar_t>() : nullptr;
    scalar_t* c = store_chunks ? hc.data_ptr<scalar_t>() : nullptr;
    over_heads(nseq, H, [&](int64_t s, int64_t h) { fwd_task(p, s, h, o, f, c); });
  });
  return {out, ht, hc};
}

// Returns dq, dk, dv, dbeta, dg (or empty), dh0 (or empty).
std::vector<at::Tensor> delta_rule_bwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& beta, const c10::optional<at::Tensor>& g,
                                       const at::Tensor& cu_seqlens, const at::Tensor& chunk_offsets,
                                       const at::Tensor& hc, int64_t chunk, double scale, const at::Tensor& dout,
                                       const c10::optional<at::Tensor>& dht, bool need_dh0) {
  check_inputs({q, k, v, beta, opt_or_empty(g), hc, dout, opt_or_empty(dht)}, q);
  check_bounds(cu_seqlens, chunk_offsets);
  const int64_t nseq = cu_seqlens.numel() - 1, H = q.size(1), K = q.size(2);
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v), dbeta = at::empty_like(beta);
  const bool gated = g.has_value() && g->defined() && g->numel() > 0;
  at::Tensor dg = gated ? at::empty_like(beta) : at::empty({0}, q.options());
  at::Tensor dh0 = need_dh0 ? at::empty({nseq, H, K, v.size(2)}, q.options()) : at::empty({0}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "delta_rule_bwd", [&] {
    const auto p = problem<scalar_t>(q, k, v, beta, g, c10::nullopt, cu_seqlens, chunk_offsets, chunk, scale);
    const Grads<scalar_t> gr{dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(),
                             dbeta.data_ptr<scalar_t>(), gated ? dg.data_ptr<scalar_t>() : nullptr,
                             need_dh0 ? dh0.data_ptr<scalar_t>() : nullptr, dout.data_ptr<scalar_t>(),
                             data_or_null<scalar_t>(dht), hc.data_ptr<scalar_t>()};
    over_heads(nseq, H, [&](int64_t s, int64_t h) { bwd_task(p, gr, s, h); });
  });
  return {dq, dk, dv, dbeta, dg, dh0};
}

void bind_delta_rule(pybind11::module& m) {
  m.def("delta_rule_fwd", &delta_rule_fwd, "the (gated) delta rule, forward (CPU)");
  m.def("delta_rule_bwd", &delta_rule_bwd, "the (gated) delta rule, backward (CPU)");
}
