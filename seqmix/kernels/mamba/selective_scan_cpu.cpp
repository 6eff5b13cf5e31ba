// Mamba-1's selective scan on the CPU: forward and backward, float32 and float64
// (the math: docs/math/mamba.md; why C++: docs/design.md, "CPU references (issue 14)").
//
// Inputs arrive packed and contiguous: u, delta, z [L, D], B, C [L, G, N] (channel d reads group
// d / (D / G)), A [D, N], D and delta_bias [D], the initial state h0 [Nseq, D, N], and the sequence
// boundaries cu_seqlens [Nseq + 1] (int64). Everything is in the compute dtype (the caller converts).
// With delta_weight [D, R], delta is its low-rank factor [L, R] instead (Mamba's dt_proj): each token's step
// sizes are computed where they are read, sum_r delta[t, r] delta_weight[:, r], and the backward returns the
// factor's and the weight's gradients, so that neither the [L, D] step sizes nor their gradient is written
// (docs/design.md, "Thirtieth round").
//
// One task owns one sequence and a block of channels and scans its tokens in order, keeping the
// block's [channels, N] state in a local array that stays in L1. Channels are the vector lanes
// (W per vector, state laid out [vector][n][lane]): u, delta, z, y are rows of consecutive channels,
// B[n] and C[n] are one value broadcast over the lanes when a vector lies inside one group, and the
// sums over n (y, du, d(delta')) add vectors, never lanes. Only dB and dC (sums over the channels of
// a group) reduce across lanes, once per group and token.
//
// The decays exp(delta' A) are computed as 2^(delta' A log2 e) with A log2 e in the lanes (exp2_v saves exp_v's
// range reduction), and each token's step sizes delta' (a softplus: a long chain of dependent operations per
// vector) for all of a task's vectors before its state updates, so that the chains overlap one another rather
// than each waiting behind a vector's N updates (docs/design.md, "Fifteenth round").
//
// The forward stores the state entering every chunk of `chunk` tokens (for the backward), in the
// same lane layout, [NC, ceil(D / 16) * 16 * N]. The backward walks a sequence's chunks from the
// last: it recomputes the chunk's states (and decays) from the checkpoint into a buffer of the task
// (L2-sized), then runs the reverse recurrence over them. dB and dC go to one partial buffer per
// block of channels, dA and dD to one per sequence; the caller adds them up: no atomics, and the
// result does not depend on the schedule (the blocks, so the order of the sums, follow from the sizes
// and the number of threads).
#include "../torch_cpu.h"

#include "../args_cpu.h"
#include "../vec_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <memory>
#include <vector>

namespace {

using namespace seqmix_cpu;

constexpr int64_t kPad = 16;                 // channels are padded to a multiple of this in checkpoints
constexpr int64_t kStateBudget = 4096;       // state values per task: 16 KiB of float32, kept in L1
constexpr int kAhead = 4;                    // tokens between a row's prefetch and its use (prefetch_token)
constexpr int kTokens = 4;                   // tokens a pass of the backward's reverse recurrence (bwd_tokens)
constexpr int kRanks = 8;                    // ranks of a low-rank delta's gradients a pass (low_rank_grads)

// A low-rank delta's rank rounded up to whole passes of kRanks: the rows of the padded weight and factor.
inline int64_t rank_passes(int64_t rank) { return (rank + kRanks - 1) / kRanks * kRanks; }

// Everything a task reads, with the problem's sizes.
template <typename T>
struct Problem {
  const T *u, *delta, *A, *B, *C, *D, *z, *bias, *h0;
  const int64_t* cu;
  const int64_t* chunk_offsets;
  int64_t L, dim, G, N, nseq, chunk;
  bool softplus;
  const T* weight_t = nullptr;  // with a low-rank delta [L, rank]: delta_weight transposed, [rank, D]
  int64_t rank = 0;
  int64_t per_group() const { return dim / G; }
  int64_t padded() const { return (dim + kPad - 1) / kPad * kPad; }
};

// A task's block of channels: vectors [v0, v1) of W lanes, channels [v0 W, min(v1 W, dim)).
struct Block {
  int64_t index, v0, v1;
};

struct BlockPlan {
  int64_t vectors, per_block, count;
};

// Blocks of whole vectors: the state fits the L1 budget, and there are at least as many tasks as threads.
template <typename T>
BlockPlan plan_blocks(const Problem<T>& p) {
  constexpr int W = Lanes<T>::W;
  const int64_t vectors = (p.dim + W - 1) / W;
  const int64_t threads = at::get_num_threads();
  int64_t count = std::max<int64_t>((vectors * W * p.N + kStateBudget - 1) / kStateBudget,
                                    (threads + p.nseq - 1) / p.nseq);
  count = std::min(count, vectors);
  const int64_t per_block = (vectors + count - 1) / count;
  return {vectors, per_block, (vectors + per_block - 1) / per_block};
}

// One token's values of the W channels from c0 of a [*, dim] row (zeros past the last channel).
template <typename T>
inline Vec<T> load_row(const T* row, int64_t c0, int64_t dim) {
  const int64_t n = dim - c0;
  return n >= Lanes<T>::W ? load(row + c0) : load_part(row + c0, n);
}

template <typename T>
inline void store_row(T* row, Vec<T> v, int64_t c0, int64_t dim) {
  const int64_t n = dim - c0;
  if (n >= Lanes<T>::W) {
    store(row + c0, v);
  } else {
    store_part(row + c0, v, n);
  }
}

// Prefetches token t's values of the W channels from c0 in each [*, dim] tensor of `rows` (null ones skipped):
// the backward's, kAhead tokens before they are read (later in the recompute, earlier in the reverse
// pass). Each token's rows are a new stretch of memory, dim values apart, which the hardware's prefetcher
// reached too late (docs/design.md, "Fourteenth round"; the forward gained nothing from it).
template <typename T>
inline void prefetch_token(std::initializer_list<const T*> rows, int64_t t, int64_t c0, int64_t dim) {
  for (const T* r : rows)
    if (r) __builtin_prefetch(r + t * dim + c0);
}

// Token t's delta of the W channels from c0 from its low-rank factor: sum_r delta[t, r] weight_t[r, c0:].
template <typename T>
inline Vec<T> low_rank_delta(const Problem<T>& p, int64_t t, int64_t c0) {
  const T* factor = p.delta + t * p.rank;
  Vec<T> acc{};
  for (int64_t r = 0; r < p.rank; ++r) acc += splat<T>(factor[r]) * load_row(p.weight_t + r * p.dim, c0, p.dim);
  return acc;
}

// delta' of one vector of channels: delta + bias, then softplus; `slope` gets d(delta') / d(delta).
template <typename T>
inline Vec<T> step_sizes(const Problem<T>& p, int64_t t, int64_t c0, Vec<T>* slope) {
  Vec<T> raw = p.weight_t ? low_rank_delta(p, t, c0) : load_row(p.delta + t * p.dim, c0, p.dim);
  if (p.bias) raw += load_row(p.bias, c0, p.dim);
  if (p.softplus) return softplus_v<T>(raw, slope);
  *slope = splat<T>(T(1));
  return raw;
}

template <typename T>
inline bool in_one_group(const Problem<T>& p, int64_t c0) {
  return (std::min<int64_t>(c0 + Lanes<T>::W, p.dim) - 1) / p.per_group() == c0 / p.per_group();
}

// B_t or C_t for the vector at channel c0: N vectors, each lane its channel's group row (a broadcast
// when the vector lies in one group).
template <typename T>
inline void group_rows(const Problem<T>& p, const T* X, int64_t t, int64_t c0, Vec<T>* out) {
  constexpr int W = Lanes<T>::W;
  const int64_t pg = p.per_group();
  const T* row = X + t * p.G * p.N;
  if (in_one_group(p, c0)) {
    const T* x = row + (c0 / pg) * p.N;
    for (int64_t n = 0; n < p.N; ++n) out[n] = splat<T>(x[n]);
    return;
  }
  for (int64_t n = 0; n < p.N; ++n)
    for (int c = 0; c < W; ++c) out[n][c] = row[(std::min(c0 + c, p.dim - 1) / pg) * p.N + n];
}

// B_t[n] or C_t[n] for one vector of channels: a broadcast of the group's row when the vector lies in
// one group (kOne), else the lanes group_rows gathered.
template <typename T, bool kOne>
struct Rows {
  const T* row;
  const Vec<T>* lanes;
  Vec<T> operator[](int64_t n) const {
    if constexpr (kOne) {
      return splat<T>(row[n]);
    } else {
      return lanes[n];
    }
  }
};

// The token's rows of B or C for the vector at c0, as `Rows<T, kOne>` (gathering into `lanes` if not kOne).
template <typename T, bool kOne>
inline Rows<T, kOne> rows_of(const Problem<T>& p, const T* X, int64_t t, int64_t c0, Vec<T>* lanes) {
  if constexpr (kOne) {
    return {X + t * p.G * p.N + (c0 / p.per_group()) * p.N, nullptr};
  } else {
    group_rows(p, X, t, c0, lanes);
    return {nullptr, lanes};
  }
}

// The state of a block between [dim, N] (the layout of h0, A, the final state and dh0) and lanes
// ([vector][n], lane = channel).
template <typename T>
void state_to_lanes(const Problem<T>& p, const T* src, const Block& b, Vec<T>* h) {
  constexpr int W = Lanes<T>::W;
  for (int64_t v = b.v0; v < b.v1; ++v)
    for (int64_t n = 0; n < p.N; ++n) {
      Vec<T> x{};
      for (int c = 0; c < W; ++c) {
        const int64_t d = v * W + c;
        if (src && d < p.dim) x[c] = src[d * p.N + n];
      }
      h[(v - b.v0) * p.N + n] = x;
    }
}

template <typename T>
void state_from_lanes(const Problem<T>& p, const Vec<T>* h, const Block& b, T* dst) {
  constexpr int W = Lanes<T>::W;
  for (int64_t v = b.v0; v < b.v1; ++v)
    for (int64_t n = 0; n < p.N; ++n)
      for (int c = 0; c < W; ++c) {
        const int64_t d = v * W + c;
        if (d < p.dim) dst[d * p.N + n] = h[(v - b.v0) * p.N + n][c];
      }
}

// A [dim, N] as lanes (state_to_lanes) times log2 e: the exponents of the decays 2^(delta' A log2 e) (exp2_v).
template <typename T>
void log2_decay_rates(const Problem<T>& p, const Block& b, Vec<T>* a) {
  state_to_lanes(p, p.A, b, a);
  for (int64_t i = 0; i < (b.v1 - b.v0) * p.N; ++i) a[i] *= Consts<T>::log2e;
}

// A checkpoint holds every channel in lanes: vector v's state at v * W * N.
template <typename T>
T* checkpoint(const Problem<T>& p, T* hc, int64_t chunk_id, const Block& b) {
  return hc + chunk_id * p.padded() * p.N + b.v0 * Lanes<T>::W * p.N;
}

// One token of one vector of channels: h = exp(delta' A) h + delta' u B, returns y = h . C (before D and z);
// a2 is A log2 e. Four independent sums over n keep the multiply-adds from waiting on each other.
template <typename T, bool kOne>
inline Vec<T> fwd_token(Vec<T>* h, const Vec<T>* a2, Vec<T> dl, Vec<T> du, Rows<T, kOne> Bn, Rows<T, kOne> Cn,
                        int64_t N) {
  Vec<T> y[4] = {};
  int64_t n = 0;
  for (; n + 4 <= N; n += 4)
    for (int k = 0; k < 4; ++k) {
      h[n + k] = exp2_v<T>(dl * a2[n + k]) * h[n + k] + du * Bn[n + k];
      y[k] += h[n + k] * Cn[n + k];
    }
  for (; n < N; ++n) {
    h[n] = exp2_v<T>(dl * a2[n]) * h[n] + du * Bn[n];
    y[0] += h[n] * Cn[n];
  }
  return (y[0] + y[1]) + (y[2] + y[3]);
}

template <typename T>
void scan_fwd_task(const Problem<T>& p, const Block& b, int64_t s, T* out, T* ht, T* hc) {
  constexpr int W = Lanes<T>::W;
  const int64_t nv = b.v1 - b.v0, N = p.N, VN = nv * N;
  // dls, gates: the token's delta' and z silu'd (z sigmoid(z)) per vector, computed before its state updates.
  std::vector<Vec<T>> h(VN), a2(VN), Bt(N), Ct(N), dls(nv), gates(nv);
  state_to_lanes(p, p.h0 ? p.h0 + s * p.dim * N : nullptr, b, h.data());
  log2_decay_rates(p, b, a2.data());
  const int64_t bos = p.cu[s], eos = p.cu[s + 1];
  for (int64_t t = bos; t < eos; ++t) {
    if (hc && (t - bos) % p.chunk == 0)
      std::memcpy(checkpoint(p, hc, p.chunk_offsets[s] + (t - bos) / p.chunk, b), h.data(), VN * sizeof(Vec<T>));
    for (int64_t v = 0; v < nv; ++v) {
      const int64_t c0 = (b.v0 + v) * W;
      Vec<T> slope;
      dls[v] = step_sizes(p, t, c0, &slope);
      if (p.z) {
        const Vec<T> zz = load_row(p.z + t * p.dim, c0, p.dim);
        gates[v] = zz * sigmoid_v<T>(zz);
      }
    }
    for (int64_t v = 0; v < nv; ++v) {
      const int64_t c0 = (b.v0 + v) * W;
      const Vec<T> dl = dls[v];
      const Vec<T> uu = load_row(p.u + t * p.dim, c0, p.dim);
      Vec<T>* hv = h.data() + v * N;
      const Vec<T>* av = a2.data() + v * N;
      Vec<T> y = in_one_group(p, c0)
          ? fwd_token<T, true>(hv, av, dl, dl * uu, rows_of<T, true>(p, p.B, t, c0, nullptr),
                               rows_of<T, true>(p, p.C, t, c0, nullptr), N)
          : fwd_token<T, false>(hv, av, dl, dl * uu, rows_of<T, false>(p, p.B, t, c0, Bt.data()),
                                rows_of<T, false>(p, p.C, t, c0, Ct.data()), N);
      if (p.D) y += load_row(p.D, c0, p.dim) * uu;
      if (p.z) y *= gates[v];
      store_row(out + t * p.dim, y, c0, p.dim);
    }
  }
  if (ht) state_from_lanes(p, h.data(), b, ht + s * p.dim * N);
}

// Gradients a backward task writes: rows of the per-token ones, and its slices of the partial sums.
template <typename T>
struct Grads {
  // dB, dC: [blocks, L, G, N]; dA: [Nseq, D, N]; dD and ddelta_bias (dbias): [Nseq, D]; with a low-rank delta,
  // ddelta [blocks, L, rank] and dweight, delta_weight's transposed, [Nseq, rank, D]
  T *du, *ddelta, *dz, *dB, *dC, *dA, *dD, *dbias, *dh0, *dweight;
  const T *dout, *dht, *hc;
};

// Adds the lanes of acc [N] (the vector at channel c0, or a run of vectors in its group) into rows
// [G][N] of a partial buffer, one sum per group the lanes cover, and zeroes acc.
template <typename T>
inline void add_over_channels(const Problem<T>& p, Vec<T>* acc, int64_t c0, T* rows) {
  constexpr int W = Lanes<T>::W;
  const int64_t pg = p.per_group();
  if (in_one_group(p, c0)) {
    T* row = rows + (c0 / pg) * p.N;
    const LaneSums<T>& sums = lane_sums<T>();
    alignas(sizeof(Vec<T>)) T part[W];
    for (int64_t n0 = 0; n0 < p.N; n0 += W) {  // W of the N sums at once, acc's vectors their scratch
      const int64_t m = std::min<int64_t>(W, p.N - n0);
      std::fill(acc + n0 + m, acc + n0 + W, Vec<T>{});
      sums(acc + n0, part);
      store_upto(row + n0, load_upto(row + n0, m) + load(part), m);
    }
  } else {
    for (int64_t c = 0; c < std::min<int64_t>(W, p.dim - c0); ++c) {
      T* row = rows + ((c0 + c) / pg) * p.N;
      for (int64_t n = 0; n < p.N; ++n) row[n] += acc[n][c];
    }
  }
  std::fill(acc, acc + p.N, Vec<T>{});
}

// The chunk's states again in the backward: the token's decays e = exp(delta' A) and h = e h_prev + delta' u B
// (a2 is A log2 e).
template <typename T, bool kOne>
inline void recompute_token(Vec<T>* h, Vec<T>* e, const Vec<T>* h_prev, const Vec<T>* a2, Vec<T> dl, Vec<T> du,
                            Rows<T, kOne> Bn, int64_t N) {
  for (int64_t n = 0; n < N; ++n) {
    e[n] = exp2_v<T>(dl * a2[n]);
    h[n] = e[n] * h_prev[n] + du * Bn[n];
  }
}

// sum_n h[n] C[n], four independent sums.
template <typename T, bool kOne>
inline Vec<T> dot_rows(const Vec<T>* h, Rows<T, kOne> Cn, int64_t N) {
  Vec<T> y[4] = {};
  int64_t n = 0;
  for (; n + 4 <= N; n += 4)
    for (int k = 0; k < 4; ++k) y[k] += h[n + k] * Cn[n + k];
  for (; n < N; ++n) y[0] += h[n] * Cn[n];
  return (y[0] + y[1]) + (y[2] + y[3]);
}

// The reverse recurrence for one vector of channels over a pass of K tokens, later ones first (docs/math/mamba.md,
// "Backward"): dh (the gradient of the state after the pass, from later tokens) gets each token's dy C and
// leaves as the gradient of the state before the pass; dA and, per token k, the group sums accB[k] and accC[k]
// (of dB and dC, rows NW apart) accumulate; sb[k] and sa[k] get the token's dh . B and sum over n of
// d(delta' A) A, the parts of du and d(delta'). Token k's states are h_prev[k] (before it) and h[k] (after),
// its decays e[k]. A state element's gradient and dA stay in registers across the pass: a load and a store of
// each per K tokens instead of per token (docs/design.md, "Twelfth round").
template <typename T, bool kOne, int K>
inline void bwd_tokens(Vec<T>* dh, Vec<T>* dA, Vec<T>* accB, Vec<T>* accC, int64_t NW, Vec<T>* sb, Vec<T>* sa,
                       const Vec<T>* const* h_prev, const Vec<T>* const* h, const Vec<T>* const* e, const Vec<T>* a,
                       const Vec<T>* dl, const Vec<T>* du, const Vec<T>* dy, const Rows<T, kOne>* Bn,
                       const Rows<T, kOne>* Cn, int64_t N) {
  Vec<T> b[K] = {}, c[K] = {};
  for (int64_t n = 0; n < N; ++n) {
    Vec<T> grad = dh[n], acc = dA[n];
    const Vec<T> an = a[n];
    for (int k = 0; k < K; ++k) {
      const Vec<T> d = grad + dy[k] * Cn[k][n];  // the gradient of the state after token k
      accC[k * NW + n] += dy[k] * h[k][n];
      accB[k * NW + n] += d * du[k];
      b[k] += d * Bn[k][n];
      grad = d * e[k][n];                       // ... and before it
      const Vec<T> dlog = grad * h_prev[k][n];  // ... of delta' A, through the decay
      acc += dlog * dl[k];
      c[k] += dlog * an;
    }
    dh[n] = grad;
    dA[n] = acc;
  }
  for (int k = 0; k < K; ++k) {
    sb[k] = b[k];
    sa[k] = c[k];
  }
}

// With a low-rank delta, a chunk's gradients from its d(delta) dds [nt, nv] (tokens t0 on, the block's vectors),
// after its reverse recurrence: the factor's, dd . weight_t[r] over the block's channels for each token and rank
// (rows of `factor` [L, rank]; sums [whole blocks of W and of kRanks] its scratch), and weight_t's, dd factor[t, r]
// summed over the tokens into dweight [nv, rank padded to kRanks] (`padded` [CH, rank padded to kRanks], zeros past
// the rank, takes the chunk's factor rows once). kRanks ranks at a time, their sums in registers over a chunk's
// tokens: adding into dweight in memory at every token and vector gained a third as much over the old dt_proj
// product (docs/design.md, "Thirtieth round").
template <typename T>
void low_rank_grads(const Problem<T>& p, const Block& b, int64_t t0, int64_t nt, const Vec<T>* dds, Vec<T>* sums,
                    T* padded, Vec<T>* dweight, T* factor) {
  constexpr int W = Lanes<T>::W;
  const int64_t nv = b.v1 - b.v0, R = p.rank, RK = rank_passes(R);
  const LaneSums<T>& lanes = lane_sums<T>();
  alignas(sizeof(Vec<T>)) T part[W];
  for (int64_t i = 0; i < nt; ++i) {
    for (int64_t r0 = 0; r0 < R; r0 += kRanks) {
      Vec<T> acc[kRanks]{};
      for (int64_t v = 0; v < nv; ++v) {
        const Vec<T> dd = dds[i * nv + v];
        const int64_t c0 = (b.v0 + v) * W;
        for (int k = 0; k < kRanks; ++k) acc[k] += dd * load_row(p.weight_t + (r0 + k) * p.dim, c0, p.dim);
      }
      std::copy(acc, acc + kRanks, sums + r0);
    }
    T* row = factor + (t0 + i) * R;
    for (int64_t r0 = 0; r0 < R; r0 += W) {  // W ranks' lane sums at once
      lanes(sums + r0, part);
      std::copy(part, part + std::min<int64_t>(W, R - r0), row + r0);
    }
  }
  for (int64_t i = 0; i < nt; ++i) std::copy(p.delta + (t0 + i) * R, p.delta + (t0 + i + 1) * R, padded + i * RK);
  for (int64_t v = 0; v < nv; ++v)
    for (int64_t r0 = 0; r0 < R; r0 += kRanks) {
      Vec<T>* out = dweight + v * RK + r0;
      Vec<T> acc[kRanks];
      std::copy(out, out + kRanks, acc);
      for (int64_t i = 0; i < nt; ++i) {
        const T* f = padded + i * RK + r0;
        const Vec<T> dd = dds[i * nv + v];
        for (int k = 0; k < kRanks; ++k) acc[k] += dd * splat<T>(f[k]);
      }
      std::copy(acc, acc + kRanks, out);
    }
}

template <typename T>
void scan_bwd_task(const Problem<T>& p, const Grads<T>& g, const Block& b, int64_t s) {
  constexpr int W = Lanes<T>::W;
  const int64_t nv = b.v1 - b.v0, N = p.N, VN = nv * N, CH = p.chunk;
  // accB, accC: a pass's tokens' sums, each padded to whole blocks of W (add_over_channels sums W at once).
  const int64_t NW = (N + W - 1) / W * W;
  std::vector<Vec<T>> a(VN), a2(VN), dh(VN), dA(VN), Bt(kTokens * N), Ct(kTokens * N), accB(kTokens * NW),
      accC(kTokens * NW), dD(nv), dbias(nv);
  // With a low-rank delta: the chunk's d(delta) [CH, nv], low_rank_grads' scratch (zeroed: LaneSums reads whole
  // blocks of W, and the padded factor rows past the rank), and delta_weight's gradient per vector and rank [nv,
  // rank padded to kRanks].
  const int64_t RK = rank_passes(p.rank);
  std::vector<Vec<T>> dds(p.weight_t ? CH * nv : 0), rank_sums(RK + W), dweight(nv * RK);
  std::vector<T> padded_factor(CH * RK);
  // A pass's u, dy (through the gate), and the recurrence's sums sb and sa, per token and vector: [kTokens, nv].
  std::vector<Vec<T>> us(kTokens * nv), dys(us.size()), sbs(us.size()), sas(us.size());
  // The chunk's states (slot 0 the checkpoint, slot i + 1 after its token i), decays, delta' and its slope.
  // Written before they are read: not zeroed (a std::vector would clear hundreds of KiB per task).
  std::unique_ptr<Vec<T>[]> hs(new Vec<T>[(CH + 1) * VN]), es(new Vec<T>[CH * VN]), dls(new Vec<T>[CH * nv]),
      slopes(new Vec<T>[CH * nv]);
  state_to_lanes(p, p.A, b, a.data());  // A itself for the gradients, a2 for the recomputed decays
  log2_decay_rates(p, b, a2.data());
  state_to_lanes(p, g.dht ? g.dht + s * p.dim * N : nullptr, b, dh.data());
  const int64_t bos = p.cu[s], eos = p.cu[s + 1];
  const int64_t chunks = (eos - bos + CH - 1) / CH;
  const int64_t GN = p.G * N;
  T* dB_rows = g.dB + b.index * p.L * GN;
  T* dC_rows = g.dC + b.index * p.L * GN;
  for (int64_t j = chunks - 1; j >= 0; --j) {
    const int64_t t0 = bos + j * CH, nt = std::min(CH, eos - t0);
    std::memcpy(hs.get(), checkpoint(p, const_cast<T*>(g.hc), p.chunk_offsets[s] + j, b), VN * sizeof(Vec<T>));
    for (int64_t i = 0; i < nt; ++i) {
      const int64_t t = t0 + i;
      for (int64_t v = 0; v < nv; ++v) dls[i * nv + v] = step_sizes(p, t, (b.v0 + v) * W, &slopes[i * nv + v]);
      for (int64_t v = 0; v < nv; ++v) {
        const int64_t c0 = (b.v0 + v) * W;
        if (i + kAhead < nt) prefetch_token<T>({p.weight_t ? nullptr : p.delta, p.u}, t + kAhead, c0, p.dim);
        const Vec<T> dl = dls[i * nv + v];
        const Vec<T> du = dl * load_row(p.u + t * p.dim, c0, p.dim);
        const Vec<T>* av = a2.data() + v * N;
        const Vec<T>* hp = hs.get() + i * VN + v * N;
        Vec<T>* hn = hs.get() + (i + 1) * VN + v * N;
        Vec<T>* ev = es.get() + i * VN + v * N;
        if (in_one_group(p, c0)) {
          recompute_token<T, true>(hn, ev, hp, av, dl, du, rows_of<T, true>(p, p.B, t, c0, nullptr), N);
        } else {
          recompute_token<T, false>(hn, ev, hp, av, dl, du, rows_of<T, false>(p, p.B, t, c0, Bt.data()), N);
        }
      }
    }
    // The reverse recurrence in passes of up to kTokens tokens (i1, i1 - 1, ...): the rows of u, dout, z and of
    // the per-token gradients are read and written token by token (each a row of channels, as they lie), the
    // recurrence itself runs one vector of channels at a time over the pass's tokens.
    for (int64_t i1 = nt - 1; i1 >= 0; i1 -= kTokens) {
      const int64_t count = std::min<int64_t>(kTokens, i1 + 1);
      for (int64_t k = 0; k < count; ++k) {  // u, and dy through the gate (y before it recomputed from the state)
        const int64_t i = i1 - k, t = t0 + i;
        for (int64_t v = 0; v < nv; ++v) {
          const int64_t c0 = (b.v0 + v) * W;
          const Vec<T> uu = load_row(p.u + t * p.dim, c0, p.dim);
          if (i >= kAhead) prefetch_token<T>({p.u, g.dout, p.z}, t - kAhead, c0, p.dim);
          Vec<T> dy = load_row(g.dout + t * p.dim, c0, p.dim);
          if (p.z) {
            const Vec<T>* hn = hs.get() + (i + 1) * VN + v * N;
            const Vec<T> skip = p.D ? load_row(p.D, c0, p.dim) : Vec<T>{};
            const Vec<T> y = skip * uu + (in_one_group(p, c0)
                                              ? dot_rows<T, true>(hn, rows_of<T, true>(p, p.C, t, c0, nullptr), N)
                                              : dot_rows<T, false>(hn, rows_of<T, false>(p, p.C, t, c0, Ct.data()), N));
            const Vec<T> zz = load_row(p.z + t * p.dim, c0, p.dim);
            const Vec<T> sig = sigmoid_v<T>(zz);
            store_row(g.dz + t * p.dim, dy * y * sig * (T(1) + zz * (T(1) - sig)), c0, p.dim);
            dy *= zz * sig;
          }
          us[k * nv + v] = uu;
          dys[k * nv + v] = dy;
        }
      }
      for (int64_t v = 0; v < nv; ++v) {
        const int64_t c0 = (b.v0 + v) * W;
        const bool one = in_one_group(p, c0);
        const Vec<T>*hp[kTokens], *hn[kTokens], *ev[kTokens];
        Vec<T> dl[kTokens], du[kTokens], dy[kTokens];
        Rows<T, true> Bn1[kTokens], Cn1[kTokens];
        Rows<T, false> Bn[kTokens], Cn[kTokens];
        for (int64_t k = 0; k < count; ++k) {
          const int64_t i = i1 - k, t = t0 + i;
          hp[k] = hs.get() + i * VN + v * N;
          hn[k] = hp[k] + VN;
          ev[k] = es.get() + i * VN + v * N;
          dl[k] = dls[i * nv + v];
          du[k] = dl[k] * us[k * nv + v];
          dy[k] = dys[k * nv + v];
          if (one) {
            Bn1[k] = rows_of<T, true>(p, p.B, t, c0, nullptr);
            Cn1[k] = rows_of<T, true>(p, p.C, t, c0, nullptr);
          } else {
            Bn[k] = rows_of<T, false>(p, p.B, t, c0, Bt.data() + k * N);
            Cn[k] = rows_of<T, false>(p, p.C, t, c0, Ct.data() + k * N);
          }
        }
        Vec<T>* dhv = dh.data() + v * N;
        Vec<T>* dAv = dA.data() + v * N;
        const Vec<T>* av = a.data() + v * N;
        Vec<T> sb[kTokens], sa[kTokens];
        as_constant<kTokens>(count, [&](auto tokens) {
          constexpr int K = decltype(tokens)::value;
          if (one) {
            bwd_tokens<T, true, K>(dhv, dAv, accB.data(), accC.data(), NW, sb, sa, hp, hn, ev, av, dl, du, dy, Bn1,
                                   Cn1, N);
          } else {
            bwd_tokens<T, false, K>(dhv, dAv, accB.data(), accC.data(), NW, sb, sa, hp, hn, ev, av, dl, du, dy, Bn,
                                    Cn, N);
          }
        });
        for (int64_t k = 0; k < count; ++k) {
          sbs[k * nv + v] = sb[k];
          sas[k * nv + v] = sa[k];
        }
        // dB and dC sum over a group's channels: the lanes are added once per run of vectors in one group.
        const int64_t next = c0 + W;
        if (v == nv - 1 || !one || !in_one_group(p, next) || next / p.per_group() != c0 / p.per_group()) {
          for (int64_t k = 0; k < count; ++k) {
            const int64_t t = t0 + i1 - k;
            add_over_channels(p, accB.data() + k * NW, c0, dB_rows + t * GN);
            add_over_channels(p, accC.data() + k * NW, c0, dC_rows + t * GN);
          }
        }
      }
      for (int64_t k = 0; k < count; ++k) {  // d(delta) and du, row by row
        const int64_t i = i1 - k, t = t0 + i;
        for (int64_t v = 0; v < nv; ++v) {
          const int64_t c0 = (b.v0 + v) * W;
          const Vec<T> uu = us[k * nv + v], dy = dys[k * nv + v], sb = sbs[k * nv + v];
          const Vec<T> skip = p.D ? load_row(p.D, c0, p.dim) : Vec<T>{};
          const Vec<T> dd = (sas[k * nv + v] + uu * sb) * slopes[i * nv + v];
          if (p.weight_t) {
            dds[i * nv + v] = dd;
          } else {
            store_row(g.ddelta + t * p.dim, dd, c0, p.dim);
          }
          store_row(g.du + t * p.dim, dls[i * nv + v] * sb + skip * dy, c0, p.dim);
          dD[v] += dy * uu;
          dbias[v] += dd;
        }
      }
    }
    if (p.weight_t)
      low_rank_grads(p, b, t0, nt, dds.data(), rank_sums.data(), padded_factor.data(), dweight.data(),
                     g.ddelta + b.index * p.L * p.rank);
  }
  state_from_lanes(p, dA.data(), b, g.dA + s * p.dim * N);
  for (int64_t v = b.v0; v < b.v1; ++v)
    for (int c = 0; c < W && v * W + c < p.dim; ++c) {
      g.dD[s * p.dim + v * W + c] = dD[v - b.v0][c];
      if (g.dbias) g.dbias[s * p.dim + v * W + c] = dbias[v - b.v0][c];
      for (int64_t r = 0; r < p.rank; ++r)
        g.dweight[(s * p.rank + r) * p.dim + v * W + c] = dweight[(v - b.v0) * RK + r][c];
    }
  if (g.dh0) state_from_lanes(p, dh.data(), b, g.dh0 + s * p.dim * N);
}

template <typename T>
Problem<T> problem(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                   const at::Tensor& C, const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                   const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& h0,
                   const at::Tensor& cu, const at::Tensor& chunk_offsets, int64_t chunk, bool softplus) {
  return {u.data_ptr<T>(), delta.data_ptr<T>(), A.data_ptr<T>(), B.data_ptr<T>(), C.data_ptr<T>(),
          data_or_null<T>(D), data_or_null<T>(z), data_or_null<T>(bias), data_or_null<T>(h0),
          cu.data_ptr<int64_t>(), chunk_offsets.data_ptr<int64_t>(),
          u.size(0), u.size(1), B.size(1), B.size(2), cu.numel() - 1, chunk, softplus};
}

// delta_weight [D, R] transposed for the kernels (the step sizes' low-rank weight), or empty without one; delta
// must then be [L, R].
at::Tensor low_rank_weight(const at::Tensor& u, const at::Tensor& delta, const c10::optional<at::Tensor>& weight) {
  if (!weight.has_value()) {
    TORCH_CHECK(delta.sizes() == u.sizes(), "selective_scan_cpu: delta must be [L, D] like u");
    return at::Tensor();
  }
  TORCH_CHECK(weight->dim() == 2 && weight->size(0) == u.size(1) && delta.dim() == 2 &&
                  delta.size(0) == u.size(0) && delta.size(1) == weight->size(1) && weight->size(1) > 0,
              "selective_scan_cpu: with delta_weight [D, R], delta must be [L, R]");
  TORCH_CHECK(weight->device().is_cpu() && weight->scalar_type() == u.scalar_type(),
              "selective_scan_cpu: delta_weight must be a CPU tensor in u's dtype");
  // Zero rows past the rank, to whole blocks of kRanks (low_rank_grads reads them).
  const int64_t rank = weight->size(1);
  at::Tensor weight_t = at::zeros({rank_passes(rank), u.size(1)}, weight->options());
  weight_t.narrow(0, 0, rank).copy_(weight->t());
  return weight_t;
}

template <typename T>
void set_low_rank(Problem<T>& p, const at::Tensor& weight_t, int64_t rank) {
  if (!weight_t.defined()) return;
  p.weight_t = weight_t.data_ptr<T>();
  p.rank = rank;
}

// Runs task(block, sequence) over every (sequence, block of channels), in parallel over torch's threads.
template <typename T, typename F>
void over_tasks(const Problem<T>& p, const BlockPlan& plan, const F& task) {
  at::parallel_for(0, p.nseq * plan.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t s = i / plan.count, k = i % plan.count;
      const Block b{k, k * plan.per_block, std::min((k + 1) * plan.per_block, plan.vectors)};
      task(b, s);
    }
  });
}

}  // namespace

// Returns (out [L, D], final state [Nseq, D, N] or empty, checkpoints [NC, padded D * N] or empty). With
// delta_weight [D, R], delta is [L, R] (see the top of the file).
std::vector<at::Tensor> selective_scan_fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                           const at::Tensor& B, const at::Tensor& C,
                                           const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                                           const c10::optional<at::Tensor>& bias,
                                           const c10::optional<at::Tensor>& delta_weight,
                                           const c10::optional<at::Tensor>& h0, const at::Tensor& cu_seqlens,
                                           const at::Tensor& chunk_offsets, int64_t chunk, int64_t num_chunks,
                                           bool softplus, bool store_final, bool store_chunks) {
  check_tensors("selective_scan_cpu",
                {u, delta, A, B, C, opt_or_empty(D), opt_or_empty(z), opt_or_empty(bias), opt_or_empty(h0)});
  check_offsets("selective_scan_cpu", cu_seqlens, chunk_offsets);
  const at::Tensor weight_t = low_rank_weight(u, delta, delta_weight);
  const int64_t nseq = cu_seqlens.numel() - 1, dim = u.size(1), N = A.size(1);
  at::Tensor out = at::empty_like(u);
  at::Tensor ht = store_final ? at::empty({nseq, dim, N}, u.options()) : at::empty({0}, u.options());
  const int64_t padded = (dim + kPad - 1) / kPad * kPad;
  at::Tensor hc = store_chunks ? at::empty({num_chunks, padded * N}, u.options()) : at::empty({0}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_fwd", [&] {
    auto p = problem<scalar_t>(u, delta, A, B, C, D, z, bias, h0, cu_seqlens, chunk_offsets, chunk, softplus);
    set_low_rank(p, weight_t, weight_t.defined() ? delta.size(1) : 0);
    const auto plan = plan_blocks(p);
    scalar_t* o = out.data_ptr<scalar_t>();
    scalar_t* f = store_final ? ht.data_ptr<scalar_t>() : nullptr;
    scalar_t* c = store_chunks ? hc.data_ptr<scalar_t>() : nullptr;
    over_tasks(p, plan, [&](const Block& b, int64_t s) { scan_fwd_task(p, b, s, o, f, c); });
  });
  return {out, ht, hc};
}

// Returns du, ddelta, dz (or empty), dA [Nseq, D, N], dB and dC [blocks, L, G, N], dD [Nseq, D], dh0 (or
// empty), ddelta_bias [Nseq, D] (or empty without delta_bias), ddelta_weight: the caller sums the partial buffers
// over their first dimension. With delta_weight [D, R], ddelta is the factor's, [blocks, L, R], and ddelta_weight
// its transpose's, [Nseq, R, D] (else empty).
std::vector<at::Tensor> selective_scan_bwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                           const at::Tensor& B, const at::Tensor& C,
                                           const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                                           const c10::optional<at::Tensor>& bias,
                                           const c10::optional<at::Tensor>& delta_weight, const at::Tensor& cu_seqlens,
                                           const at::Tensor& chunk_offsets, const at::Tensor& hc, int64_t chunk,
                                           bool softplus, const at::Tensor& dout,
                                           const c10::optional<at::Tensor>& dht, bool need_dh0) {
  check_tensors("selective_scan_cpu",
                {u, delta, A, B, C, opt_or_empty(D), opt_or_empty(z), opt_or_empty(bias), hc, dout, opt_or_empty(dht)});
  check_offsets("selective_scan_cpu", cu_seqlens, chunk_offsets);
  const int64_t nseq = cu_seqlens.numel() - 1, L = u.size(0), dim = u.size(1), G = B.size(1), N = A.size(1);
  const at::Tensor weight_t = low_rank_weight(u, delta, delta_weight);
  const int64_t rank = weight_t.defined() ? delta.size(1) : 0;
  at::Tensor du = at::empty_like(u), ddelta;
  at::Tensor dweight = rank ? at::empty({nseq, rank, dim}, u.options()) : at::empty({0}, u.options());
  at::Tensor dz = z.has_value() ? at::empty_like(u) : at::empty({0}, u.options());
  at::Tensor dA = at::empty({nseq, dim, N}, u.options()), dD = at::empty({nseq, dim}, u.options());
  at::Tensor dh0 = need_dh0 ? at::empty({nseq, dim, N}, u.options()) : at::empty({0}, u.options());
  at::Tensor dbias = bias.has_value() ? at::empty({nseq, dim}, u.options()) : at::empty({0}, u.options());
  at::Tensor dB, dC;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_bwd", [&] {
    auto p = problem<scalar_t>(u, delta, A, B, C, D, z, bias, c10::nullopt, cu_seqlens, chunk_offsets, chunk,
                               softplus);
    set_low_rank(p, weight_t, rank);
    const auto plan = plan_blocks(p);
    // Zeroed: a block adds only into the groups its channels read.
    dB = at::zeros({plan.count, L, G, N}, u.options());
    dC = at::zeros({plan.count, L, G, N}, u.options());
    // Every block's task writes the factor's rows of its sequence's tokens.
    ddelta = rank ? at::empty({plan.count, L, rank}, u.options()) : at::empty_like(u);
    const Grads<scalar_t> g{du.data_ptr<scalar_t>(), ddelta.data_ptr<scalar_t>(),
                            z.has_value() ? dz.data_ptr<scalar_t>() : nullptr, dB.data_ptr<scalar_t>(),
                            dC.data_ptr<scalar_t>(), dA.data_ptr<scalar_t>(), dD.data_ptr<scalar_t>(),
                            bias.has_value() ? dbias.data_ptr<scalar_t>() : nullptr,
                            need_dh0 ? dh0.data_ptr<scalar_t>() : nullptr,
                            rank ? dweight.data_ptr<scalar_t>() : nullptr, dout.data_ptr<scalar_t>(),
                            data_or_null<scalar_t>(dht), hc.data_ptr<scalar_t>()};
    over_tasks(p, plan, [&](const Block& b, int64_t s) { scan_bwd_task(p, g, b, s); });
  });
  return {du, ddelta, dz, dA, dB, dC, dD, dh0, dbias, dweight};
}

void bind_selective_scan(pybind11::module& m) {
  m.def("selective_scan_fwd", &selective_scan_fwd, "Mamba-1 selective scan, forward (CPU)");
  m.def("selective_scan_bwd", &selective_scan_bwd, "Mamba-1 selective scan, backward (CPU)");
}
