// Mamba-1's selective scan on the CPU: forward and backward, float32 and float64
// (the math: docs/math/mamba.md; why C++: docs/design.md, "CPU references (issue 14)").
//
// Inputs arrive packed and contiguous: u, delta, z [L, D], B, C [L, G, N] (channel d reads group
// d / (D / G)), A [D, N], D and delta_bias [D], the initial state h0 [Nseq, D, N], and the sequence
// boundaries cu_seqlens [Nseq + 1] (int64). Everything is in the compute dtype (the caller converts).
//
// One task owns one sequence and a block of channels and scans its tokens in order, keeping the
// block's [channels, N] state in a local array that stays in L1. Channels are the vector lanes
// (W per vector, state laid out [vector][n][lane]): u, delta, z, y are rows of consecutive channels,
// B[n] and C[n] are one value broadcast over the lanes when a vector lies inside one group, and the
// sums over n (y, du, d(delta')) add vectors, never lanes. Only dB and dC (sums over the channels of
// a group) reduce across lanes, once per group and token.
//
// The forward stores the state entering every chunk of `chunk` tokens (for the backward), in the
// same lane layout, [NC, ceil(D / 16) * 16 * N]. The backward walks a sequence's chunks from the
// last: it recomputes the chunk's states (and decays) from the checkpoint into a buffer of the task
// (L2-sized), then runs the reverse recurrence over them. dB and dC go to one partial buffer per
// block of channels, dA and dD to one per sequence; the caller adds them up: no atomics, and the
// result does not depend on the number of threads' schedule.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kPad = 16;            // channels are padded to a multiple of this in checkpoints
constexpr int64_t kStateBudget = 4096;  // state values per task: 16 KiB of float32, kept in L1
constexpr double kSoftplusThreshold = 20.0;  // as F.softplus: x itself above it

// exp(x) written so that loops over lanes vectorise (std::exp is a libm call per element):
// x = k ln2 + r, |r| <= ln2 / 2, exp(r) by its Taylor polynomial, 2^k built in the exponent bits.
// Below the smallest normal it returns 0 (the exact limit of the strong decays), above the largest
// float infinity.
inline float exp_vec(float x) {
  const float xc = std::min(std::max(x, -87.0f), 88.0f);
  const float k = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = xc - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  const float scale = __builtin_bit_cast(float, bits);
  const float e = p * scale;
  return x < -87.0f ? 0.0f : (x > 88.0f ? std::numeric_limits<float>::infinity() : e);
}

inline double exp_vec(double x) {
  const double xc = std::min(std::max(x, -708.0), 709.0);
  const double k = std::floor(xc * 1.4426950408889634074 + 0.5);
  double r = xc - k * 6.93147180369123816490e-01;
  r = r - k * 1.90821492927058770002e-10;
  // Taylor to r^13: |r| <= 0.347, remainder < 1e-17.
  double p = 1.0 / 6227020800.0;
  const double coef[] = {1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0,
                         1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0};
  for (double c : coef) p = p * r + c;
  const int64_t bits = (static_cast<int64_t>(k) + 1023) << 52;
  const double scale = __builtin_bit_cast(double, bits);
  const double e = p * scale;
  return x < -708.0 ? 0.0 : (x > 709.0 ? std::numeric_limits<double>::infinity() : e);
}

template <typename T>
inline T softplus(T x) {
  return x > T(kSoftplusThreshold) ? x : std::log1p(std::exp(x));
}

template <typename T>
inline T silu_gate(T z, T* sig) {
  *sig = T(1) / (T(1) + std::exp(-z));
  return z * *sig;
}

// Lanes per vector: 64 bytes (one AVX-512 register, two AVX2 ones).
template <typename T>
constexpr int lanes() { return 64 / sizeof(T); }

// Everything a task reads, with the problem's sizes.
template <typename T>
struct Problem {
  const T *u, *delta, *A, *B, *C, *D, *z, *bias, *h0;
  const int64_t* cu;
  const int64_t* chunk_offsets;
  int64_t L, dim, G, N, nseq, chunk;
  bool softplus;
  int64_t per_group() const { return dim / G; }
  int64_t padded() const { return (dim + kPad - 1) / kPad * kPad; }
};

// A task's block of channels: vectors [v0, v1) of W lanes, channels [v0 W, min(v1 W, dim)).
struct Block {
  int64_t index, v0, v1;
};

template <typename T, int W>
struct BlockPlan {
  int64_t vectors, per_block, count;
};

// Blocks of whole vectors: the state fits the L1 budget, and there are at least as many tasks as threads.
template <typename T, int W>
BlockPlan<T, W> plan_blocks(const Problem<T>& p) {
  const int64_t vectors = (p.dim + W - 1) / W;
  const int64_t threads = at::get_num_threads();
  int64_t count = std::max<int64_t>((vectors * W * p.N + kStateBudget - 1) / kStateBudget,
                                    (threads + p.nseq - 1) / p.nseq);
  count = std::min(count, vectors);
  const int64_t per_block = (vectors + count - 1) / count;
  return {vectors, per_block, (vectors + per_block - 1) / per_block};
}

// Per-lane values of one token: a row of W channels from channel c0 (zeros past the last channel).
template <typename T, int W>
inline void load_row(T* dst, const T* src, int64_t c0, int64_t dim) {
  const int64_t n = std::min<int64_t>(W, dim - c0);
  if (n == W) {
    for (int c = 0; c < W; ++c) dst[c] = src[c0 + c];
  } else {
    for (int c = 0; c < W; ++c) dst[c] = c < n ? src[c0 + c] : T(0);
  }
}

template <typename T, int W>
inline void store_row(T* dst, const T* src, int64_t c0, int64_t dim) {
  const int64_t n = std::min<int64_t>(W, dim - c0);
  for (int c = 0; c < n; ++c) dst[c0 + c] = src[c];
}

// delta' of one vector of channels: delta + bias, then softplus; `raw` keeps delta + bias.
template <typename T, int W>
inline void step_sizes(const Problem<T>& p, int64_t t, int64_t c0, T* dl, T* raw) {
  load_row<T, W>(raw, p.delta + t * p.dim, c0, p.dim);
  if (p.bias) {
    T b[W];
    load_row<T, W>(b, p.bias, c0, p.dim);
    for (int c = 0; c < W; ++c) raw[c] += b[c];
  }
  for (int c = 0; c < W; ++c) dl[c] = p.softplus ? softplus(raw[c]) : raw[c];
}

// B_t or C_t for one vector: [N][W], each lane its channel's group row (a broadcast when the vector
// lies in one group).
template <typename T, int W>
inline bool in_one_group(const Problem<T>& p, int64_t c0) {
  return (std::min<int64_t>(c0 + W, p.dim) - 1) / p.per_group() == c0 / p.per_group();
}

template <typename T, int W>
inline void group_rows(const Problem<T>& p, const T* X, int64_t t, int64_t c0, T* out) {
  const int64_t pg = p.per_group();
  const T* row = X + t * p.G * p.N;
  if (in_one_group<T, W>(p, c0)) {
    const T* x = row + (c0 / pg) * p.N;
    for (int64_t n = 0; n < p.N; ++n)
      for (int c = 0; c < W; ++c) out[n * W + c] = x[n];
    return;
  }
  for (int64_t n = 0; n < p.N; ++n)
    for (int c = 0; c < W; ++c) out[n * W + c] = row[(std::min(c0 + c, p.dim - 1) / pg) * p.N + n];
}

// The state of a block between [dim, N] (the layout of h0, the final state and dh0) and lanes.
template <typename T, int W>
void state_to_lanes(const Problem<T>& p, const T* src, const Block& b, T* h) {
  for (int64_t v = b.v0; v < b.v1; ++v)
    for (int64_t n = 0; n < p.N; ++n)
      for (int c = 0; c < W; ++c) {
        const int64_t d = v * W + c;
        h[((v - b.v0) * p.N + n) * W + c] = src && d < p.dim ? src[d * p.N + n] : T(0);
      }
}

template <typename T, int W>
void state_from_lanes(const Problem<T>& p, const T* h, const Block& b, T* dst) {
  for (int64_t v = b.v0; v < b.v1; ++v)
    for (int64_t n = 0; n < p.N; ++n)
      for (int c = 0; c < W; ++c) {
        const int64_t d = v * W + c;
        if (d < p.dim) dst[d * p.N + n] = h[((v - b.v0) * p.N + n) * W + c];
      }
}

// A checkpoint row holds every channel in lanes: vector v's state at v * W * N.
template <typename T, int W>
T* checkpoint(const Problem<T>& p, T* hc, int64_t chunk_id, const Block& b) {
  return hc + chunk_id * p.padded() * p.N + b.v0 * W * p.N;
}

template <typename T, int W>
void scan_fwd_task(const Problem<T>& p, const Block& b, int64_t s, T* out, T* ht, T* hc) {
  const int64_t nv = b.v1 - b.v0, N = p.N, VN = nv * N * W;
  std::vector<T> h(VN), a(VN), Bt(N * W), Ct(N * W);
  state_to_lanes<T, W>(p, p.h0 ? p.h0 + s * p.dim * N : nullptr, b, h.data());
  state_to_lanes<T, W>(p, p.A, b, a.data());
  const int64_t bos = p.cu[s], eos = p.cu[s + 1];
  for (int64_t t = bos; t < eos; ++t) {
    if (hc && (t - bos) % p.chunk == 0)
      std::memcpy(checkpoint<T, W>(p, hc, p.chunk_offsets[s] + (t - bos) / p.chunk, b), h.data(), VN * sizeof(T));
    for (int64_t v = 0; v < nv; ++v) {
      const int64_t c0 = (b.v0 + v) * W;
      T dl[W], raw[W], uu[W], du[W], y[W];
      step_sizes<T, W>(p, t, c0, dl, raw);
      load_row<T, W>(uu, p.u + t * p.dim, c0, p.dim);
      group_rows<T, W>(p, p.B, t, c0, Bt.data());
      group_rows<T, W>(p, p.C, t, c0, Ct.data());
      for (int c = 0; c < W; ++c) {
        du[c] = dl[c] * uu[c];
        y[c] = T(0);
      }
      T* hv = h.data() + v * N * W;
      const T* av = a.data() + v * N * W;
      for (int64_t n = 0; n < N; ++n) {
        T* hr = hv + n * W;
        const T *ar = av + n * W, *br = Bt.data() + n * W, *cr = Ct.data() + n * W;
#pragma omp simd
        for (int c = 0; c < W; ++c) {
          const T hn = exp_vec(dl[c] * ar[c]) * hr[c] + du[c] * br[c];
          hr[c] = hn;
          y[c] += hn * cr[c];
        }
      }
      if (p.D) {
        T d[W];
        load_row<T, W>(d, p.D, c0, p.dim);
        for (int c = 0; c < W; ++c) y[c] += d[c] * uu[c];
      }
      if (p.z) {
        T zz[W], sig;
        load_row<T, W>(zz, p.z + t * p.dim, c0, p.dim);
        for (int c = 0; c < W; ++c) y[c] *= silu_gate(zz[c], &sig);
      }
      store_row<T, W>(out + t * p.dim, y, c0, p.dim);
    }
  }
  if (ht) state_from_lanes<T, W>(p, h.data(), b, ht + s * p.dim * N);
}

// Gradients a backward task writes: rows of the per-token ones, and its slices of the partial sums.
template <typename T>
struct Grads {
  T *du, *ddelta, *dz, *dB, *dC, *dA, *dD, *dh0;  // dB, dC: [blocks, L, G, N]; dA: [Nseq, D, N]; dD: [Nseq, D]
  const T *dout, *dht, *hc;
};

// Adds the lanes of acc [N][W] (the vector at channel c0, or a run of vectors in its group) into rows
// [G][N] of a partial buffer, one sum per group the lanes cover, and zeroes acc.
template <typename T, int W>
inline void add_over_channels(const Problem<T>& p, T* acc, int64_t c0, T* rows) {
  const int64_t pg = p.per_group();
  if (in_one_group<T, W>(p, c0)) {
    T* row = rows + (c0 / pg) * p.N;
    for (int64_t n = 0; n < p.N; ++n) {
      T s = T(0);
      for (int c = 0; c < W; ++c) s += acc[n * W + c];
      row[n] += s;
    }
  } else {
    for (int64_t c = 0; c < std::min<int64_t>(W, p.dim - c0); ++c) {
      T* row = rows + ((c0 + c) / pg) * p.N;
      for (int64_t n = 0; n < p.N; ++n) row[n] += acc[n * W + c];
    }
  }
  std::fill(acc, acc + p.N * W, T(0));
}

template <typename T, int W>
void scan_bwd_task(const Problem<T>& p, const Grads<T>& g, const Block& b, int64_t s) {
  const int64_t nv = b.v1 - b.v0, N = p.N, VN = nv * N * W, CH = p.chunk;
  std::vector<T> a(VN), dh(VN), dA(VN, T(0)), Bt(N * W), Ct(N * W), accB(N * W, T(0)), accC(N * W, T(0));
  std::vector<T> hs((CH + 1) * VN), es(CH * VN), dls(CH * nv * W), raws(CH * nv * W);
  std::vector<T> dD(nv * W, T(0));
  state_to_lanes<T, W>(p, p.A, b, a.data());
  state_to_lanes<T, W>(p, g.dht ? g.dht + s * p.dim * N : nullptr, b, dh.data());
  const int64_t bos = p.cu[s], eos = p.cu[s + 1];
  const int64_t chunks = (eos - bos + CH - 1) / CH;
  const int64_t GN = p.G * N;
  T* dB_rows = g.dB + b.index * p.L * GN;
  T* dC_rows = g.dC + b.index * p.L * GN;
  for (int64_t j = chunks - 1; j >= 0; --j) {
    const int64_t t0 = bos + j * CH, nt = std::min(CH, eos - t0);
    // The chunk's states: slot 0 the checkpoint, slot i + 1 after token t0 + i; es[i] that token's decays.
    std::memcpy(hs.data(), checkpoint<T, W>(p, const_cast<T*>(g.hc), p.chunk_offsets[s] + j, b), VN * sizeof(T));
    for (int64_t i = 0; i < nt; ++i) {
      const int64_t t = t0 + i;
      for (int64_t v = 0; v < nv; ++v) {
        const int64_t c0 = (b.v0 + v) * W;
        T* dl = dls.data() + (i * nv + v) * W;
        T uu[W], du[W];
        step_sizes<T, W>(p, t, c0, dl, raws.data() + (i * nv + v) * W);
        load_row<T, W>(uu, p.u + t * p.dim, c0, p.dim);
        group_rows<T, W>(p, p.B, t, c0, Bt.data());
        for (int c = 0; c < W; ++c) du[c] = dl[c] * uu[c];
        const T* av = a.data() + v * N * W;
        const T* hp = hs.data() + i * VN + v * N * W;
        T* hn = hs.data() + (i + 1) * VN + v * N * W;
        T* ev = es.data() + i * VN + v * N * W;
        for (int64_t n = 0; n < N; ++n) {
          const T *ar = av + n * W, *hpr = hp + n * W, *br = Bt.data() + n * W;
          T *er = ev + n * W, *hr = hn + n * W;
#pragma omp simd
          for (int c = 0; c < W; ++c) {
            const T e = exp_vec(dl[c] * ar[c]);
            er[c] = e;
            hr[c] = e * hpr[c] + du[c] * br[c];
          }
        }
      }
    }
    for (int64_t i = nt - 1; i >= 0; --i) {
      const int64_t t = t0 + i;
      for (int64_t v = 0; v < nv; ++v) {
        const int64_t c0 = (b.v0 + v) * W;
        const T* dl = dls.data() + (i * nv + v) * W;
        const T* raw = raws.data() + (i * nv + v) * W;
        const T* av = a.data() + v * N * W;
        const T* hp = hs.data() + i * VN + v * N * W;
        const T* hn = hs.data() + (i + 1) * VN + v * N * W;
        const T* ev = es.data() + i * VN + v * N * W;
        T* dhv = dh.data() + v * N * W;
        T* dAv = dA.data() + v * N * W;
        T uu[W], dy[W], sdb[W], skip[W];
        load_row<T, W>(uu, p.u + t * p.dim, c0, p.dim);
        load_row<T, W>(dy, g.dout + t * p.dim, c0, p.dim);
        group_rows<T, W>(p, p.B, t, c0, Bt.data());
        group_rows<T, W>(p, p.C, t, c0, Ct.data());
        if (p.D) {
          load_row<T, W>(skip, p.D, c0, p.dim);
        } else {
          for (int c = 0; c < W; ++c) skip[c] = T(0);
        }
        if (p.z) {  // y before the gate, recomputed from the state
          T y[W], zz[W], dz[W];
          for (int c = 0; c < W; ++c) y[c] = skip[c] * uu[c];
          for (int64_t n = 0; n < N; ++n)
            for (int c = 0; c < W; ++c) y[c] += hn[n * W + c] * Ct[n * W + c];
          load_row<T, W>(zz, p.z + t * p.dim, c0, p.dim);
          for (int c = 0; c < W; ++c) {
            T sig;
            const T gate = silu_gate(zz[c], &sig);
            dz[c] = dy[c] * y[c] * sig * (T(1) + zz[c] * (T(1) - sig));
            dy[c] *= gate;
          }
          store_row<T, W>(g.dz + t * p.dim, dz, c0, p.dim);
        }
        T dbdot[W], ddl[W];
        for (int c = 0; c < W; ++c) {
          sdb[c] = dl[c] * uu[c];
          dbdot[c] = T(0);
          ddl[c] = T(0);
        }
        for (int64_t n = 0; n < N; ++n) {
          const int64_t k = n * W;
          const T *cr = Ct.data() + k, *br = Bt.data() + k, *hnr = hn + k, *hpr = hp + k, *er = ev + k, *ar = av + k;
          T *dhr = dhv + k, *dAr = dAv + k, *accCr = accC.data() + k, *accBr = accB.data() + k;
#pragma omp simd
          for (int c = 0; c < W; ++c) {
            const T d = dhr[c] + dy[c] * cr[c];  // the gradient of the state after token t
            accCr[c] += dy[c] * hnr[c];
            accBr[c] += d * sdb[c];
            dbdot[c] += d * br[c];
            const T back = d * er[c];  // the gradient of the state before token t
            const T dlog = back * hpr[c];  // of delta' A, through the decay
            dAr[c] += dlog * dl[c];
            ddl[c] += dlog * ar[c];
            dhr[c] = back;
          }
        }
        T du[W];
        for (int c = 0; c < W; ++c) {
          ddl[c] += uu[c] * dbdot[c];
          if (p.softplus && raw[c] <= T(kSoftplusThreshold)) ddl[c] /= T(1) + std::exp(-raw[c]);
          du[c] = dl[c] * dbdot[c] + skip[c] * dy[c];
          dD[v * W + c] += dy[c] * uu[c];
        }
        store_row<T, W>(g.ddelta + t * p.dim, ddl, c0, p.dim);
        store_row<T, W>(g.du + t * p.dim, du, c0, p.dim);
        // dB and dC sum over a group's channels: the lanes are added once per run of vectors in one group.
        const int64_t next = c0 + W;
        if (v == nv - 1 || !in_one_group<T, W>(p, c0) || !in_one_group<T, W>(p, next) ||
            next / p.per_group() != c0 / p.per_group()) {
          add_over_channels<T, W>(p, accB.data(), c0, dB_rows + t * GN);
          add_over_channels<T, W>(p, accC.data(), c0, dC_rows + t * GN);
        }
      }
    }
  }
  state_from_lanes<T, W>(p, dA.data(), b, g.dA + s * p.dim * N);
  for (int64_t d = b.v0 * W; d < std::min(b.v1 * W, p.dim); ++d) g.dD[s * p.dim + d] = dD[d - b.v0 * W];
  if (g.dh0) state_from_lanes<T, W>(p, dh.data(), b, g.dh0 + s * p.dim * N);
}

template <typename T>
const T* data_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() && t->numel() > 0 ? t->data_ptr<T>() : nullptr;
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

// Runs task(block, sequence) over every (sequence, block of channels), in parallel over torch's threads.
template <typename T, int W, typename F>
void over_tasks(const Problem<T>& p, const BlockPlan<T, W>& plan, const F& task) {
  at::parallel_for(0, p.nseq * plan.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t s = i / plan.count, k = i % plan.count;
      const Block b{k, k * plan.per_block, std::min((k + 1) * plan.per_block, plan.vectors)};
      task(b, s);
    }
  });
}

void check_inputs(const std::vector<at::Tensor>& tensors) {
  for (const auto& t : tensors) {
    if (!t.defined()) continue;
    TORCH_CHECK(t.device().is_cpu(), "selective_scan_cpu: tensors must be on the CPU");
    TORCH_CHECK(t.is_contiguous(), "selective_scan_cpu: tensors must be contiguous");
  }
}

at::Tensor opt_or_empty(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

}  // namespace

// Returns (out [L, D], final state [Nseq, D, N] or empty, checkpoints [NC, padded D * N] or empty).
std::vector<at::Tensor> selective_scan_fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                           const at::Tensor& B, const at::Tensor& C,
                                           const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                                           const c10::optional<at::Tensor>& bias,
                                           const c10::optional<at::Tensor>& h0, const at::Tensor& cu_seqlens,
                                           const at::Tensor& chunk_offsets, int64_t chunk, int64_t num_chunks,
                                           bool softplus, bool store_final, bool store_chunks) {
  check_inputs({u, delta, A, B, C, opt_or_empty(D), opt_or_empty(z), opt_or_empty(bias), opt_or_empty(h0),
                cu_seqlens, chunk_offsets});
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kLong && chunk_offsets.scalar_type() == at::kLong,
              "selective_scan_cpu: cu_seqlens and chunk_offsets must be int64");
  const int64_t nseq = cu_seqlens.numel() - 1, dim = u.size(1), N = A.size(1);
  at::Tensor out = at::empty_like(u);
  at::Tensor ht = store_final ? at::empty({nseq, dim, N}, u.options()) : at::empty({0}, u.options());
  const int64_t padded = (dim + kPad - 1) / kPad * kPad;
  at::Tensor hc = store_chunks ? at::empty({num_chunks, padded * N}, u.options()) : at::empty({0}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_fwd", [&] {
    constexpr int W = lanes<scalar_t>();
    const auto p = problem<scalar_t>(u, delta, A, B, C, D, z, bias, h0, cu_seqlens, chunk_offsets, chunk, softplus);
    const auto plan = plan_blocks<scalar_t, W>(p);
    scalar_t* o = out.data_ptr<scalar_t>();
    scalar_t* f = store_final ? ht.data_ptr<scalar_t>() : nullptr;
    scalar_t* c = store_chunks ? hc.data_ptr<scalar_t>() : nullptr;
    over_tasks<scalar_t, W>(p, plan, [&](const Block& b, int64_t s) { scan_fwd_task<scalar_t, W>(p, b, s, o, f, c); });
  });
  return {out, ht, hc};
}

// Returns du, ddelta, dz (or empty), dA [Nseq, D, N], dB and dC [blocks, L, G, N], dD [Nseq, D], dh0 (or
// empty): the caller sums the partial buffers over their first dimension.
std::vector<at::Tensor> selective_scan_bwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                           const at::Tensor& B, const at::Tensor& C,
                                           const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                                           const c10::optional<at::Tensor>& bias, const at::Tensor& cu_seqlens,
                                           const at::Tensor& chunk_offsets, const at::Tensor& hc, int64_t chunk,
                                           bool softplus, const at::Tensor& dout,
                                           const c10::optional<at::Tensor>& dht, bool need_dh0) {
  check_inputs({u, delta, A, B, C, opt_or_empty(D), opt_or_empty(z), opt_or_empty(bias), cu_seqlens, chunk_offsets,
                hc, dout, opt_or_empty(dht)});
  const int64_t nseq = cu_seqlens.numel() - 1, L = u.size(0), dim = u.size(1), G = B.size(1), N = A.size(1);
  at::Tensor du = at::empty_like(u), ddelta = at::empty_like(u);
  at::Tensor dz = z.has_value() ? at::empty_like(u) : at::empty({0}, u.options());
  at::Tensor dA = at::empty({nseq, dim, N}, u.options()), dD = at::empty({nseq, dim}, u.options());
  at::Tensor dh0 = need_dh0 ? at::empty({nseq, dim, N}, u.options()) : at::empty({0}, u.options());
  at::Tensor dB, dC;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_bwd", [&] {
    constexpr int W = lanes<scalar_t>();
    const auto p = problem<scalar_t>(u, delta, A, B, C, D, z, bias, c10::nullopt, cu_seqlens, chunk_offsets, chunk,
                                     softplus);
    const auto plan = plan_blocks<scalar_t, W>(p);
    // Zeroed: a block adds only into the groups its channels read.
    dB = at::zeros({plan.count, L, G, N}, u.options());
    dC = at::zeros({plan.count, L, G, N}, u.options());
    const Grads<scalar_t> g{du.data_ptr<scalar_t>(), ddelta.data_ptr<scalar_t>(),
                            z.has_value() ? dz.data_ptr<scalar_t>() : nullptr, dB.data_ptr<scalar_t>(),
                            dC.data_ptr<scalar_t>(), dA.data_ptr<scalar_t>(), dD.data_ptr<scalar_t>(),
                            need_dh0 ? dh0.data_ptr<scalar_t>() : nullptr, dout.data_ptr<scalar_t>(),
                            data_or_null<scalar_t>(dht), hc.data_ptr<scalar_t>()};
    over_tasks<scalar_t, W>(p, plan, [&](const Block& b, int64_t s) { scan_bwd_task<scalar_t, W>(p, g, b, s); });
  });
  return {du, ddelta, dz, dA, dB, dC, dD, dh0};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("selective_scan_fwd", &selective_scan_fwd, "Mamba-1 selective scan, forward (CPU)");
  m.def("selective_scan_bwd", &selective_scan_bwd, "Mamba-1 selective scan, backward (CPU)");
}
