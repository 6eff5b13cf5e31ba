// The short causal depthwise conv on the CPU for training: forward and backward, float32 and float64
// (the op: seqmix/kernels/conv/__init__.py, causal_conv1d; why C++: docs/design.md, "CPU references
// (issue 14)"). The PyTorch reference makes about W passes over memory each way; here the forward reads x
// once and writes out, the backward reads x and dout once and writes dx.
//
// Inputs arrive packed and contiguous, in the compute dtype (the caller converts): x [L, D], weight [D, W],
// bias [D] (optional), the initial state h0 [N, D, W-1] (optional; zeros), cu_seqlens [N+1] int64 and
// chunk_index [NC, 2] int32 (sequence, chunk within it) of chunks of `chunk` tokens (seqmix/kernels/
// sequences.py). pre[t] = bias + sum_j weight[:, j] xs[t - (W-1) + j] over xs = [h0^T, x] per sequence,
// out = silu?(pre); the final state is xs's last W-1 rows.
//
// One task owns one chunk of tokens and one block of channels. It takes the block one vector of channels
// (the lanes) at a time through the chunk's tokens in order, with the W rows of xs a token reads, the taps
// and, in the backward, the last W values of dpre and the sums of dweight and dbias in registers (widths
// 1-4 are template arguments); so x, dout, out and dx each pass through memory once. The backward recomputes
// pre and dpre = dout silu'(pre) token by token; the gradient of row q of xs (a row of dx, or of the initial
// state's gradient before the sequence) is sum_j weight[:, j] dpre[q + (W-1) - j], complete once dpre[q + W-1]
// is: the W-1 tokens after the chunk are recomputed by the task. dweight and dbias go to one partial row per
// chunk, added up in chunk order at the end: no atomics, and the sums do not depend on the number of threads.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../vec_cpu.h"

namespace {

using namespace seqmix_cpu;

constexpr int64_t kBlockVectors = 16;        // vectors of channels per task: 256 float32 channels
constexpr int64_t kValuesInline = 1 << 15;   // below this many values of x the tasks run on the calling thread
constexpr int kMaxWidth = 16;                // the widest conv (W) the kernels take

// Everything a task reads, with the problem's sizes.
template <typename T>
struct Conv {
  const T *x, *weight, *bias, *h0;
  const int64_t* cu;
  const int32_t* chunk_index;
  int64_t D, W, chunk, num_chunks;
  bool silu;

  static constexpr int64_t lanes = Lanes<T>::W;
  static constexpr int64_t block = kBlockVectors * lanes;
  int64_t blocks() const { return (D + block - 1) / block; }
};

// The tokens of one chunk: [t0, t1) of the sequence [s, e) with index seq.
struct Span {
  int64_t seq, s, e, t0, t1;
};

template <typename T>
Span span_of(const Conv<T>& p, int64_t c) {
  const int64_t seq = p.chunk_index[2 * c], s = p.cu[seq], e = p.cu[seq + 1];
  const int64_t t0 = s + p.chunk_index[2 * c + 1] * p.chunk;
  return {seq, s, e, t0, std::min(e, t0 + p.chunk)};
}

// The number of taps: KW where the caller's template fixes it (the loops over taps unroll), else p.W.
template <int KW, typename T>
inline int64_t taps_of(const Conv<T>& p) {
  return KW > 0 ? KW : p.W;
}

// The first `count` lanes of v to dst (all of them when count >= lanes).
template <typename T>
inline void put(T* dst, Vec<T> v, int64_t count) {
  if (count >= Lanes<T>::W) {
    store(dst, v);
  } else {
    store_part(dst, v, count);
  }
}

template <typename T>
inline Vec<T> get(const T* src, int64_t count) {
  return count >= Lanes<T>::W ? load(src) : load_part(src, count);
}

// Lanes [0, count) of column k of rows [d, d + count) of a [*, stride] array (weight [D, W], a state
// [N, D, W-1]): a strided gather, once per vector and task.
template <typename T>
inline Vec<T> column(const T* a, int64_t d, int64_t stride, int64_t k, int64_t count) {
  alignas(64) T lanes[Lanes<T>::W] = {};
  for (int64_t i = 0; i < std::min<int64_t>(count, Lanes<T>::W); ++i) lanes[i] = a[(d + i) * stride + k];
  return load(lanes);
}

template <typename T>
inline void scatter_column(T* a, int64_t d, int64_t stride, int64_t k, Vec<T> v, int64_t count) {
  alignas(64) T lanes[Lanes<T>::W];
  store(lanes, v);
  for (int64_t i = 0; i < std::min<int64_t>(count, Lanes<T>::W); ++i) a[(d + i) * stride + k] = lanes[i];
}

// A lane walks a column of [L, D] rows, one cache line per token D values apart, which the hardware
// prefetchers do not follow: without this the loads of x missed the cache at every token (the forward of
// [4096, 512] float32 took ~5 ms, ten times a pass over its memory). The row kPrefetch tokens ahead (prefetches
// do not fault, also past the end).
constexpr int64_t kPrefetch = 16;

template <typename T>
inline void prefetch_ahead(const T* a, int64_t D, int64_t t, int64_t d) {
  __builtin_prefetch(a + (t + kPrefetch) * D + d);
}

// One vector of channels [d, d + count) through one chunk: its taps and bias, and a window of the W rows of
// xs the token at hand reads, xw[j] = xs[t - (W-1) + j]. With the width KW fixed these arrays live in
// registers (the loops over them unroll); KW = 0 takes any W <= kMaxWidth, in memory.
template <int KW, typename T>
struct Lane {
  static constexpr int cap = KW > 0 ? KW : kMaxWidth;
  const Conv<T>& p;
  int64_t d, count;
  Vec<T> taps[cap], xw[cap], bias;

  // Taps, bias and the W-1 rows of xs before the chunk (x's, the initial state's, or zeros) in xw[1..W-1].
  Lane(const Conv<T>& p, const Span& sp, int64_t d, int64_t count) : p(p), d(d), count(count) {
    const int64_t W = taps_of<KW>(p);
    for (int64_t j = 0; j < W; ++j) taps[j] = column(p.weight, d, W, j, count);
    bias = p.bias ? get(p.bias + d, count) : Vec<T>{};
    for (int64_t k = 0; k + 1 < W; ++k) {
      const int64_t pos = sp.t0 - (W - 1) + k;
      xw[k + 1] = pos >= sp.s ? get(p.x + pos * p.D + d, count)
                  : p.h0      ? column(p.h0 + sp.seq * p.D * (W - 1), d, W - 1, pos - sp.s + W - 1, count)
                              : Vec<T>{};
    }
  }

  // Moves the window to token t and returns its pre-activation bias + sum_j taps[j] xs[t - (W-1) + j].
  Vec<T> enter(int64_t t) {
    const int64_t W = taps_of<KW>(p);
    prefetch_ahead(p.x, p.D, t, d);
    for (int64_t j = 0; j + 1 < W; ++j) xw[j] = xw[j + 1];
    xw[W - 1] = get(p.x + t * p.D + d, count);
    Vec<T> acc = bias;
    for (int64_t j = 0; j < W; ++j) acc += taps[j] * xw[j];
    return acc;
  }
};

template <int KW, typename T>
void forward_task(const Conv<T>& p, int64_t c, int64_t b, T* out, T* ht) {
  const Span sp = span_of(p, c);
  const int64_t end = std::min(p.D, (b + 1) * p.block);
  for (int64_t d = b * p.block; d < end; d += p.lanes) {
    Lane<KW, T> lane(p, sp, d, end - d);
    for (int64_t t = sp.t0; t < sp.t1; ++t) {
      Vec<T> y = lane.enter(t);
      if (p.silu) y = y * sigmoid_v<T>(y);
      put(out + t * p.D + d, y, end - d);
    }
    if (ht && sp.t1 == sp.e) {  // the last W-1 rows of xs
      for (int64_t k = 0; k + 1 < p.W; ++k)
        scatter_column(ht + sp.seq * p.D * (p.W - 1), d, p.W - 1, k, lane.xw[k + 1], end - d);
    }
  }
}

// What the backward writes: dx [L, D] (or null), dh0 [N, D, W-1] (or null), and per chunk the partial sums
// of dweight [NC, W, D] and dbias [NC, D] (or null).
template <typename T>
struct Grads {
  const T *dout, *dht;
  T *dx, *dh0, *dw, *db;
};

// The backward of one vector of channels through one chunk: tokens t from the chunk's first (W-1 earlier for
// a sequence's first chunk, whose rows are the initial state's) to W-1 past its last, dpre[t - j] kept in
// dpw[j]; at token t the gradient of xs[q], q = t - (W-1), is complete: sum_j taps[j] dpre[q + (W-1) - j].
template <int KW, typename T>
void backward_lane(const Conv<T>& p, const Grads<T>& g, const Span& sp, int64_t c, int64_t d, int64_t count) {
  Lane<KW, T> lane(p, sp, d, count);
  const int64_t W = taps_of<KW>(p), S = W - 1;
  Vec<T> dpw[Lane<KW, T>::cap] = {}, dw[Lane<KW, T>::cap] = {}, db{}, dinit[Lane<KW, T>::cap] = {};
  const int64_t first = sp.t0 == sp.s ? sp.s - S : sp.t0;
  for (int64_t t = first; t < sp.t1 + S; ++t) {
    for (int64_t j = W - 1; j > 0; --j) dpw[j] = dpw[j - 1];
    dpw[0] = Vec<T>{};
    if (t >= sp.t0 && t < sp.e) {
      const Vec<T> pre = lane.enter(t);
      prefetch_ahead(g.dout, p.D, t, d);
      Vec<T> dp = get(g.dout + t * p.D + d, count);
      if (p.silu) {
        const Vec<T> sg = sigmoid_v<T>(pre);
        dp = dp * sg * (T(1) + pre * (T(1) - sg));
      }
      dpw[0] = dp;
      if (t < sp.t1) {  // tokens after the chunk are recomputed, not summed
        for (int64_t j = 0; j < W; ++j) dw[j] += dp * lane.xw[j];
        db += dp;
      }
    }
    const int64_t q = t - S;
    if (q < first) continue;
    Vec<T> acc{};
    for (int64_t j = 0; j < W; ++j) acc += lane.taps[j] * dpw[j];
    const int64_t k = q - (sp.e - S);  // q's column in the final state, if >= 0
    if (k >= 0 && g.dht) acc += column(g.dht + sp.seq * p.D * S, d, S, k, count);
    if (q < sp.s) {
      dinit[q - sp.s + S] = acc;
    } else if (g.dx) {
      put(g.dx + q * p.D + d, acc, count);
    }
  }
  if (g.dh0 && sp.t0 == sp.s) {
    for (int64_t k = 0; k < S; ++k) scatter_column(g.dh0 + sp.seq * p.D * S, d, S, k, dinit[k], count);
  }
  if (g.dw) {
    for (int64_t j = 0; j < W; ++j) put(g.dw + (c * W + j) * p.D + d, dw[j], count);
    if (g.db) put(g.db + c * p.D + d, db, count);
  }
}

template <int KW, typename T>
void backward_task(const Conv<T>& p, const Grads<T>& g, int64_t c, int64_t b) {
  const Span sp = span_of(p, c);
  const int64_t end = std::min(p.D, (b + 1) * p.block);
  for (int64_t d = b * p.block; d < end; d += p.lanes) backward_lane<KW>(p, g, sp, c, d, end - d);
}

// Runs task(chunk, block) over every chunk and block of channels.
template <typename T, typename F>
void over_tasks(const Conv<T>& p, int64_t tokens, F task) {
  const int64_t blocks = p.blocks(), total = p.num_chunks * blocks;
  const int64_t grain = tokens * p.D < kValuesInline ? std::max<int64_t>(total, 1) : 1;
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) task(i / blocks, i % blocks);
  });
}

// Calls run(std::integral_constant<int, KW>{}) with KW = W for the common widths 1-4 (their loops over the
// taps unroll), 0 (any width) otherwise.
template <typename F>
void with_width(int64_t W, F run) {
  switch (W) {
    case 1: return run(std::integral_constant<int, 1>{});
    case 2: return run(std::integral_constant<int, 2>{});
    case 3: return run(std::integral_constant<int, 3>{});
    case 4: return run(std::integral_constant<int, 4>{});
    default: return run(std::integral_constant<int, 0>{});
  }
}

// Sequences without tokens have no chunk: their final state is the initial state, and the gradient of the
// initial state is the final state's.
template <typename T>
void empty_sequences(const Conv<T>& p, int64_t N, const T* from, T* to) {
  const int64_t per = p.D * (p.W - 1);
  for (int64_t seq = 0; seq < N; ++seq) {
    if (p.cu[seq] != p.cu[seq + 1]) continue;
    if (from) {
      std::memcpy(to + seq * per, from + seq * per, per * sizeof(T));
    } else {
      std::fill(to + seq * per, to + (seq + 1) * per, T(0));
    }
  }
}

const at::Tensor* present(const c10::optional<at::Tensor>& t) { return t.has_value() ? &*t : nullptr; }

template <typename T>
Conv<T> problem(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                const c10::optional<at::Tensor>& h0, const at::Tensor& cu_seqlens, const at::Tensor& chunk_index,
                int64_t chunk, bool silu) {
  Conv<T> p;
  p.x = x.data_ptr<T>();
  p.weight = weight.data_ptr<T>();
  p.bias = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  p.h0 = h0.has_value() ? h0->data_ptr<T>() : nullptr;
  p.cu = cu_seqlens.data_ptr<int64_t>();
  p.chunk_index = chunk_index.data_ptr<int32_t>();
  p.D = x.size(1);
  p.W = weight.size(1);
  p.chunk = chunk;
  p.num_chunks = chunk_index.size(0);
  p.silu = silu;
  return p;
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                  const c10::optional<at::Tensor>& h0, const at::Tensor& cu_seqlens, const at::Tensor& chunk_index) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(),
              "causal_conv1d_cpu: x must be contiguous [L, D] on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "causal_conv1d_cpu: x must be float32 or float64, got ", x.scalar_type());
  const int64_t D = x.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == D && weight.size(1) >= 1 && weight.size(1) <= kMaxWidth &&
                  weight.is_contiguous() && weight.scalar_type() == x.scalar_type(),
              "causal_conv1d_cpu: weight must be contiguous [D, W] in x's dtype, 1 <= W <= ", kMaxWidth);
  for (const at::Tensor* t : {present(bias), present(h0)}) {
    TORCH_CHECK(!t || (t->is_contiguous() && t->scalar_type() == x.scalar_type() && t->device().is_cpu()),
                "causal_conv1d_cpu: bias and the initial state must be contiguous, in x's dtype, on the CPU");
  }
  TORCH_CHECK(!bias.has_value() || bias->numel() == D, "causal_conv1d_cpu: bias must be [D]");
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kLong && cu_seqlens.is_contiguous() && cu_seqlens.dim() == 1,
              "causal_conv1d_cpu: cu_seqlens must be int64 [N+1]");
  TORCH_CHECK(!h0.has_value() || (h0->dim() == 3 && h0->size(0) == cu_seqlens.size(0) - 1 && h0->size(1) == D &&
                                  h0->size(2) == weight.size(1) - 1),
              "causal_conv1d_cpu: the initial state must be [N, D, W-1]");
  TORCH_CHECK(chunk_index.scalar_type() == at::kInt && chunk_index.is_contiguous() && chunk_index.dim() == 2,
              "causal_conv1d_cpu: chunk_index must be int32 [NC, 2]");
}

// Returns (out [L, D], final state [N, D, W-1] or an empty tensor).
std::vector<at::Tensor> causal_conv1d_fwd(const at::Tensor& x, const at::Tensor& weight,
                                          const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& h0,
                                          const at::Tensor& cu_seqlens, const at::Tensor& chunk_index, int64_t chunk,
                                          bool silu, bool store_final) {
  check_inputs(x, weight, bias, h0, cu_seqlens, chunk_index);
  const int64_t N = cu_seqlens.size(0) - 1, D = x.size(1), W = weight.size(1);
  at::Tensor out = at::empty_like(x);
  at::Tensor ht = store_final ? at::empty({N, D, W - 1}, x.options()) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_cpu_fwd", [&] {
    const Conv<scalar_t> p = problem<scalar_t>(x, weight, bias, h0, cu_seqlens, chunk_index, chunk, silu);
    scalar_t* o = out.data_ptr<scalar_t>();
    scalar_t* h = store_final && W > 1 ? ht.data_ptr<scalar_t>() : nullptr;
    with_width(W, [&](auto kw) {
      over_tasks(p, x.size(0), [&](int64_t c, int64_t b) { forward_task<decltype(kw)::value>(p, c, b, o, h); });
    });
    if (h) empty_sequences(p, N, p.h0, h);
  });
  return {out, ht};
}

// Returns (dx, dweight [D, W], dbias [D], dh0 [N, D, W-1]), each an empty tensor where not asked for.
std::vector<at::Tensor> causal_conv1d_bwd(const at::Tensor& x, const at::Tensor& weight,
                                          const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& h0,
                                          const at::Tensor& cu_seqlens, const at::Tensor& chunk_index, int64_t chunk,
                                          bool silu, const at::Tensor& dout, const c10::optional<at::Tensor>& dht,
                                          bool need_dx, bool need_dweight, bool need_dh0) {
  check_inputs(x, weight, bias, h0, cu_seqlens, chunk_index);
  TORCH_CHECK(dout.sizes() == x.sizes() && dout.is_contiguous() && dout.scalar_type() == x.scalar_type(),
              "causal_conv1d_cpu: dout must be contiguous, x's shape and dtype");
  const int64_t N = cu_seqlens.size(0) - 1, D = x.size(1), W = weight.size(1), NC = chunk_index.size(0);
  TORCH_CHECK(!dht.has_value() || (dht->is_contiguous() && dht->scalar_type() == x.scalar_type() &&
                                   dht->numel() == N * D * (W - 1)),
              "causal_conv1d_cpu: the final state's gradient must be contiguous [N, D, W-1] in x's dtype");
  const auto opts = x.options();
  const at::Tensor empty = at::empty({0}, opts);
  at::Tensor dx = need_dx ? at::empty_like(x) : empty;
  at::Tensor dh0 = need_dh0 ? at::empty({N, D, W - 1}, opts) : empty;
  at::Tensor dw_part = need_dweight ? at::empty({NC, W, D}, opts) : empty;
  at::Tensor db_part = need_dweight && bias.has_value() ? at::empty({NC, D}, opts) : empty;
  at::Tensor dweight = need_dweight ? at::zeros({W, D}, opts) : empty;
  at::Tensor dbias = need_dweight && bias.has_value() ? at::zeros({D}, opts) : empty;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_cpu_bwd", [&] {
    using T = scalar_t;
    const Conv<T> p = problem<T>(x, weight, bias, h0, cu_seqlens, chunk_index, chunk, silu);
    auto ptr = [](at::Tensor& t) { return t.numel() ? t.data_ptr<T>() : nullptr; };
    const Grads<T> g{dout.data_ptr<T>(), dht.has_value() && W > 1 ? dht->data_ptr<T>() : nullptr, ptr(dx),
                     W > 1 ? ptr(dh0) : nullptr, ptr(dw_part), ptr(db_part)};
    with_width(W, [&](auto kw) {
      over_tasks(p, x.size(0), [&](int64_t c, int64_t b) { backward_task<decltype(kw)::value>(p, g, c, b); });
    });
    if (g.dh0) empty_sequences(p, N, g.dht, g.dh0);
    // The partial sums in chunk order, each channel's apart.
    at::parallel_for(0, D, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t c = 0; c < NC; ++c) {
        if (g.dw) {
          for (int64_t j = 0; j < W; ++j) {
            T* acc = dweight.data_ptr<T>() + j * D;
            const T* part = g.dw + (c * W + j) * D;
            for (int64_t d = begin; d < end; ++d) acc[d] += part[d];
          }
        }
        if (g.db) {
          T* acc = dbias.data_ptr<T>();
          const T* part = g.db + c * D;
          for (int64_t d = begin; d < end; ++d) acc[d] += part[d];
        }
      }
    });
  });
  return {dx, need_dweight ? dweight.t().contiguous() : dweight, dbias, dh0};
}

}  // namespace

void bind_conv_train(pybind11::module& m) {
  m.def("causal_conv1d_fwd", &causal_conv1d_fwd, "the short causal conv's forward for training (CPU)");
  m.def("causal_conv1d_bwd", &causal_conv1d_bwd, "the short causal conv's backward (CPU)");
}
