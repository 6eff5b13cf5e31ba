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
#include "../torch_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../args_cpu.h"
#include "../vec_cpu.h"

namespace {

using namespace seqmix_cpu;

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

// A row of V values (token t's v or do of head h) as nv vectors, zero past V (whole vectors too).
template <typename T>
inline void load_row(const T* src, int64_t V, Vec<T>* dst, int64_t nv) {
  constexpr int W = Lanes<T>::W;
  for (int64_t j = 0; j < nv; ++j) {
    const int64_t n = std::clamp<int64_t>(V - j * W, 0, W);
    Vec<T> x{};
    if (n == W) {
      std::memcpy(&x, src + j * W, sizeof(x));
    } else if (n > 0) {
      std::memcpy(&x, src + j * W, n * sizeof(T));
    }
    dst[j] = x;
  }
}

template <typename T>
inline void store_row(T* dst, int64_t V, const Vec<T>* src, int64_t nv) {
  constexpr int W = Lanes<T>::W;
  for (int64_t j = 0; j < nv && j * W < V; ++j)
    std::memcpy(dst + j * W, &src[j], std::min<int64_t>(W, V - j * W) * sizeof(T));
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

// Calls f(i, part) for the rows i in [0, n), part a compile-time 0..3 that sums over rows take as the index of
// their partial sum: four independent chains of multiply-adds, whose accumulators stay in registers (an index
// known only at run time would put them in memory).
template <typename F>
inline void over_rows(int64_t n, const F& f) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    f(i, std::integral_constant<int, 0>{});
    f(i + 1, std::integral_constant<int, 1>{});
    f(i + 2, std::integral_constant<int, 2>{});
    f(i + 3, std::integral_constant<int, 3>{});
  }
  for (; i < n; ++i) f(i, std::integral_constant<int, 0>{});
}

// acc[j][part] += x[i] S[i][j] over the rows i of S (over_rows); the caller zeroes acc and adds it up (add_up).
template <typename T, int NV>
inline void rows_times(const Vec<T>* S, const T* x, int64_t K, Vec<T> (*acc)[4]) {
  over_rows(K, [&](int64_t i, auto part) {
    const Vec<T>* s = S + i * NV;
    for (int j = 0; j < NV; ++j) acc[j][part] += x[i] * s[j];
  });
}

template <typename T, int NV>
inline void add_up(Vec<T> (*acc)[4], Vec<T>* out) {
  for (int j = 0; j < NV; ++j) out[j] = (acc[j][0] + acc[j][1]) + (acc[j][2] + acc[j][3]);
}

// One token of the forward: S <- a S, w = v - S^T k, S <- S + beta k w^T; o = scale S^T q into o (when not
// null) and w into w_out (when not null).
// a x with the decay (kDecay: the gated rule), x itself without (the plain rule: a multiply fewer per value).
template <bool kDecay, typename T, typename X>
inline X decayed(T a, X x) {
  if constexpr (kDecay) {
    return a * x;
  } else {
    return x;
  }
}

template <typename T, int NV, bool kDecay>
inline void fwd_token(const Problem<T>& p, Vec<T>* S, int64_t t, int64_t h, Vec<T>* o, Vec<T>* w_out) {
  const int64_t K = p.K;
  const T* kt = row(p.k, t, h, p.H, K);
  const T a = p.g ? std::exp(p.g[t * p.H + h]) : T(1);
  const T b = p.beta[t * p.H + h];
  Vec<T> acc[NV][4] = {}, u[NV], w[NV];
  rows_times<T, NV>(S, kt, K, acc);
  add_up<T, NV>(acc, u);
  load_row(row(p.v, t, h, p.H, p.V), p.V, w, NV);
  for (int j = 0; j < NV; ++j) {
    w[j] -= a * u[j];
    if (w_out) w_out[j] = w[j];
    w[j] *= b;  // now d = beta w, the row written
  }
  if (!o) {
    for (int64_t i = 0; i < K; ++i)
      for (int j = 0; j < NV; ++j) S[i * NV + j] = decayed<kDecay>(a, S[i * NV + j]) + kt[i] * w[j];
    return;
  }
  const T* qt = row(p.q, t, h, p.H, K);
  Vec<T> acc_o[NV][4] = {};
  over_rows(K, [&](int64_t i, auto part) {
    Vec<T>* s = S + i * NV;
    for (int j = 0; j < NV; ++j) {
      s[j] = decayed<kDecay>(a, s[j]) + kt[i] * w[j];
      acc_o[j][part] += qt[i] * s[j];
    }
  });
  add_up<T, NV>(acc_o, o);
  for (int j = 0; j < NV; ++j) o[j] *= p.scale;
}

template <typename T, int NV, bool kDecay>
void fwd_task(const Problem<T>& p, int64_t s, int64_t h, T* out, T* ht, T* hc) {
  const int64_t K = p.K, H = p.H;
  std::vector<Vec<T>> S(K * NV);
  Vec<T> o[NV];
  state_in(p, p.h0 ? p.h0 + (s * H + h) * K * p.V : nullptr, S.data());
  const int64_t bos = p.cu[s], eos = p.cu[s + 1];
  for (int64_t t = bos; t < eos; ++t) {
    if (hc && (t - bos) % p.chunk == 0) {
      const int64_t c = p.chunk_offsets[s] + (t - bos) / p.chunk;
      std::memcpy(hc + (c * H + h) * p.state_size(), S.data(), K * NV * sizeof(Vec<T>));
    }
    fwd_token<T, NV, kDecay>(p, S.data(), t, h, o, nullptr);
    store_row(out + (t * H + h) * p.V, p.V, o, NV);
  }
  if (ht) state_out(p, S.data(), ht + (s * H + h) * K * p.V);
}

// What a backward task writes and reads besides the inputs.
template <typename T>
struct Grads {
  T *dq, *dk, *dv, *dbeta, *dg, *dh0;
  const T *dout, *dht, *hc;
};

// The reverse of a token (docs/math/deltanet.md, "The token recurrence on the CPU") is two passes over the
// rows of dS: the output's (A: dS += scale q do^T, dd = dS^T k, dq) and then, once dd gives du, the state's
// (B: dk, dS' = dS + k du^T, dg, dS <- a dS'). Each row's work is local to the row, so a row loop does pass B
// of token t + 1 and then pass A of token t: dS is read and written once per token.

// A token's pass A: its rows of q, k, do, w = v - a Sp^T k and d = beta w; the state Sp before it.
template <typename T, int NV>
struct OutputPass {
  int64_t t;
  const Vec<T>* Sp;
  const T *q, *k;
  T a, b;
  Vec<T> dout[NV], w[NV], d[NV];
};

// A token's pass B: its rows of k, d and du (the gradient of u = a Sp^T k), a du, and the state Sp before it.
template <typename T, int NV>
struct StatePass {
  int64_t t;
  const Vec<T>* Sp;
  const T* k;
  T a;
  Vec<T> d[NV], du[NV], adu[NV];
};

template <typename T, int NV>
inline void start_output_pass(const Problem<T>& p, const Grads<T>& g, int64_t t, int64_t h, const Vec<T>* Sp,
                              const Vec<T>* w, OutputPass<T, NV>& A) {
  const int64_t H = p.H, K = p.K;
  A.t = t;
  A.Sp = Sp;
  A.q = row(p.q, t, h, H, K);
  A.k = row(p.k, t, h, H, K);
  A.a = p.g ? std::exp(p.g[t * H + h]) : T(1);
  A.b = p.beta[t * H + h];
  load_row(row(g.dout, t, h, H, p.V), p.V, A.dout, NV);
  for (int j = 0; j < NV; ++j) {
    A.w[j] = w[j];
    A.d[j] = A.b * w[j];
  }
}

// Rows [i0, i0 + n) of pass B of token B (kB) and then pass A of token A (kA), in that order per row.
// Pass A adds into dd_parts and writes the lanes of dq's sums into PA; pass B those of dk's into PB and adds
// into ga_parts (the sum for dg).
template <typename T, int NV, bool kDecay, bool kB, bool kA>
inline void row_passes(const Problem<T>& p, const StatePass<T, NV>& B, const OutputPass<T, NV>& A, Vec<T>* dS,
                       int64_t i0, int64_t n, Vec<T>* PB, Vec<T>* PA, Vec<T> (*dd_parts)[4], Vec<T>* ga_parts) {
  over_rows(n, [&](int64_t r, auto part) {
    const int64_t i = i0 + r;
    Vec<T>* ds = dS + i * NV;
    if constexpr (kB) {
      const Vec<T>* sp = B.Sp + i * NV;
      Vec<T> hk{};
      for (int j = 0; j < NV; ++j) {
        hk += ds[j] * B.d[j] + sp[j] * B.adu[j];
        ds[j] += B.k[i] * B.du[j];
        if constexpr (kDecay) {
          ga_parts[part] += ds[j] * sp[j];
          ds[j] *= B.a;
        }
      }
      PB[r] = hk;
    }
    if constexpr (kA) {
      const Vec<T>* sp = A.Sp + i * NV;
      const T sq = p.scale * A.q[i];
      Vec<T> hq{};
      for (int j = 0; j < NV; ++j) {
        ds[j] += sq * A.dout[j];
        dd_parts[j][part] += A.k[i] * ds[j];
        hq += sp[j] * A.dout[j];
      }
      PA[r] = hq;
    }
  });
}

// Pass B of token B (kB) and pass A of token A (kA) over every row; then their per-token results: dk and dg of
// B; dq, dv, dbeta of A, and A's pass B (into B) for the next call. P: 2 W scratch vectors, rows: 2 (K + W)
// scratch values (the sums of a block of W rows are stored whole).
template <typename T, int NV, bool kDecay, bool kB, bool kA>
inline void token_passes(const Problem<T>& p, const Grads<T>& g, int64_t h, StatePass<T, NV>& B,
                         const OutputPass<T, NV>& A, Vec<T>* dS, Vec<T>* P, T* rows) {
  constexpr int W = Lanes<T>::W;
  const LaneSums<T>& sums = lane_sums<T>();
  const int64_t K = p.K, V = p.V, H = p.H;
  T* rows_b = rows;
  T* rows_a = rows + K + W;
  Vec<T> dd_parts[NV][4] = {}, ga_parts[4] = {};
  for (int64_t i0 = 0; i0 < K; i0 += W) {
    const int64_t n = std::min<int64_t>(W, K - i0);
    row_passes<T, NV, kDecay, kB, kA>(p, B, A, dS, i0, n, P, P + W, dd_parts, ga_parts);
    if constexpr (kB) {
      for (int r = n; r < W; ++r) P[r] = Vec<T>{};
      sums(P, rows_b + i0);
    }
    if constexpr (kA) {
      for (int r = n; r < W; ++r) P[W + r] = Vec<T>{};
      sums(P + W, rows_a + i0);
    }
  }
  if constexpr (kB) {
    std::memcpy(g.dk + (B.t * H + h) * K, rows_b, K * sizeof(T));
    if (kDecay) g.dg[B.t * H + h] = B.a * lane_sum<T>((ga_parts[0] + ga_parts[1]) + (ga_parts[2] + ga_parts[3]));
  }
  if constexpr (kA) {
    // dq = scale S_t do with S_t = a Sp + k d^T.
    Vec<T> ddo{};
    for (int j = 0; j < NV; ++j) ddo += A.d[j] * A.dout[j];
    const T d_dot_do = lane_sum<T>(ddo);
    T* dq = g.dq + (A.t * H + h) * K;
    for (int64_t i = 0; i < K; ++i) dq[i] = p.scale * (A.a * rows_a[i] + A.k[i] * d_dot_do);
    // d = beta w, w = v - u: dv = beta dd, dbeta = dd . w, du = -beta dd.
    Vec<T> dd[NV], dv[NV], db{};
    add_up<T, NV>(dd_parts, dd);
    for (int j = 0; j < NV; ++j) {
      dv[j] = A.b * dd[j];
      db += dd[j] * A.w[j];
    }
    store_row(g.dv + (A.t * H + h) * V, V, dv, NV);
    B.t = A.t;
    B.Sp = A.Sp;
    B.k = A.k;
    B.a = A.a;
    for (int j = 0; j < NV; ++j) {
      B.d[j] = A.d[j];
      B.du[j] = -dv[j];
      B.adu[j] = A.a * B.du[j];
    }
    g.dbeta[A.t * H + h] = lane_sum<T>(db);
  }
}

template <typename T, int NV, bool kDecay>
void bwd_task(const Problem<T>& p, const Grads<T>& g, int64_t s, int64_t h) {
  constexpr int W = Lanes<T>::W;
  const int64_t K = p.K, H = p.H, C = p.chunk, KV = K * NV;
  // The states entering each token of a chunk, and each token's w = v - a Sp^T k.
  std::vector<Vec<T>> states(C * KV), w(C * NV), dS(KV), P(2 * W);
  std::vector<T> rows(2 * (K + W));
  OutputPass<T, NV> A;
  StatePass<T, NV> B;
  state_in(p, g.dht ? g.dht + (s * H + h) * K * p.V : nullptr, dS.data());
  const int64_t bos = p.cu[s], eos = p.cu[s + 1];
  const int64_t chunks = (eos - bos + C - 1) / C;
  for (int64_t c = chunks - 1; c >= 0; --c) {
    const int64_t t0 = bos + c * C, t1 = std::min(t0 + C, eos);
    std::memcpy(states.data(), g.hc + ((p.chunk_offsets[s] + c) * H + h) * p.state_size(), KV * sizeof(Vec<T>));
    for (int64_t t = t0; t < t1; ++t) {
      Vec<T>* Sp = states.data() + (t - t0) * KV;
      if (t + 1 < t1) {  // the state after the chunk's last token is not needed
        std::memcpy(Sp + KV, Sp, KV * sizeof(Vec<T>));
        fwd_token<T, NV, kDecay>(p, Sp + KV, t, h, nullptr, w.data() + (t - t0) * NV);
      } else {
        Vec<T> acc[NV][4] = {}, u[NV];
        rows_times<T, NV>(Sp, row(p.k, t, h, H, K), K, acc);
        add_up<T, NV>(acc, u);
        Vec<T>* wl = w.data() + (t - t0) * NV;
        load_row(row(p.v, t, h, H, p.V), p.V, wl, NV);
        const T a = p.g ? std::exp(p.g[t * H + h]) : T(1);
        for (int j = 0; j < NV; ++j) wl[j] -= a * u[j];
      }
    }
    // The chunk's tokens in reverse; each token's pass B runs with the next one's pass A, the first token's
    // alone (it reads the chunk's states).
    for (int64_t t = t1 - 1; t >= t0; --t) {
      start_output_pass<T, NV>(p, g, t, h, states.data() + (t - t0) * KV, w.data() + (t - t0) * NV, A);
      if (t == t1 - 1) {
        token_passes<T, NV, kDecay, false, true>(p, g, h, B, A, dS.data(), P.data(), rows.data());
      } else {
        token_passes<T, NV, kDecay, true, true>(p, g, h, B, A, dS.data(), P.data(), rows.data());
      }
    }
    token_passes<T, NV, kDecay, true, false>(p, g, h, B, A, dS.data(), P.data(), rows.data());
  }
  if (g.dh0) state_out(p, dS.data(), g.dh0 + (s * H + h) * K * p.V);
}

// The vectors of a task's rows: enough for V values, rounded up to a power of two so that a few widths are
// compiled (kMaxVectors at most, 512 bytes a row whatever the vectors' width: the Python side sends wider heads
// to the reference).
constexpr int kMaxVectors = 512 / kVectorBytes;

inline int64_t row_vectors(int64_t V, int W) {
  int64_t nv = 1;
  while (nv * W < V) nv *= 2;
  return nv;
}

// Calls f(std::integral_constant<int, nv>{}) for nv a power of two in [NV, kMaxVectors] (larger ones as kMaxVectors).
template <int NV, typename F>
void with_power_of_two(int64_t nv, const F& f) {
  if constexpr (NV < kMaxVectors) {
    if (nv > NV) return with_power_of_two<2 * NV>(nv, f);
  }
  f(std::integral_constant<int, NV>{});
}

// Calls f(std::integral_constant<int, nv>, std::bool_constant<decay>) for the problem's vectors per row and
// rule (decay: the gated rule).
template <typename F>
void with_vectors(int64_t nv, bool decay, const F& f) {
  TORCH_CHECK(nv <= kMaxVectors, "delta_rule_cpu: V too large for the C++ kernels");
  with_power_of_two<1>(nv, [&](auto vectors) {
    if (decay) {
      f(vectors, std::true_type{});
    } else {
      f(vectors, std::false_type{});
    }
  });
}

template <typename T>
Problem<T> problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                   const c10::optional<at::Tensor>& g, const c10::optional<at::Tensor>& h0, const at::Tensor& cu,
                   const at::Tensor& chunk_offsets, int64_t chunk, double scale) {
  const int64_t V = v.size(2);
  return {q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), beta.data_ptr<T>(), data_or_null<T>(g),
          data_or_null<T>(h0), cu.data_ptr<int64_t>(), chunk_offsets.data_ptr<int64_t>(), q.size(1), q.size(2), V,
          row_vectors(V, Lanes<T>::W), chunk, static_cast<T>(scale)};
}

// Runs task(sequence, head) over every pair, in parallel over torch's threads.
template <typename F>
void over_heads(int64_t nseq, int64_t H, const F& task) {
  at::parallel_for(0, nseq * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) task(i / H, i % H);
  });
}

}  // namespace

// Returns (o [L, H, V], the final state [Nseq, H, K, V] or empty, the checkpoints [NC, H, K, padded V] or
// empty).
std::vector<at::Tensor> delta_rule_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& beta, const c10::optional<at::Tensor>& g,
                                       const c10::optional<at::Tensor>& h0, const at::Tensor& cu_seqlens,
                                       const at::Tensor& chunk_offsets, int64_t chunk, int64_t num_chunks,
                                       double scale, bool store_final, bool store_chunks) {
  check_tensors("delta_rule_cpu", {q, k, v, beta, opt_or_empty(g), opt_or_empty(h0)}, &q, "q");
  check_offsets("delta_rule_cpu", cu_seqlens, chunk_offsets);
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
    with_vectors(p.nv, p.g != nullptr, [&](auto nv, auto decay) {
      over_heads(nseq, H, [&](int64_t s, int64_t h) {
        fwd_task<scalar_t, decltype(nv)::value, decltype(decay)::value>(p, s, h, o, f, c);
      });
    });
  });
  return {out, ht, hc};
}

// Returns dq, dk, dv, dbeta, dg (or empty), dh0 (or empty).
std::vector<at::Tensor> delta_rule_bwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& beta, const c10::optional<at::Tensor>& g,
                                       const at::Tensor& cu_seqlens, const at::Tensor& chunk_offsets,
                                       const at::Tensor& hc, int64_t chunk, double scale, const at::Tensor& dout,
                                       const c10::optional<at::Tensor>& dht, bool need_dh0) {
  check_tensors("delta_rule_cpu", {q, k, v, beta, opt_or_empty(g), hc, dout, opt_or_empty(dht)}, &q, "q");
  check_offsets("delta_rule_cpu", cu_seqlens, chunk_offsets);
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
    with_vectors(p.nv, p.g != nullptr, [&](auto nv, auto decay) {
      over_heads(nseq, H, [&](int64_t s, int64_t h) {
        bwd_task<scalar_t, decltype(nv)::value, decltype(decay)::value>(p, gr, s, h);
      });
    });
  });
  return {dq, dk, dv, dbeta, dg, dh0};
}

void bind_delta_rule(pybind11::module& m) {
  m.def("delta_rule_fwd", &delta_rule_fwd, "the (gated) delta rule, forward (CPU)");
  m.def("delta_rule_bwd", &delta_rule_bwd, "the (gated) delta rule, backward (CPU)");
}
