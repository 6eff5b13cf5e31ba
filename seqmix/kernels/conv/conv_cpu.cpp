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
// One task owns one chunk of tokens and one block of channels and walks the chunk's tokens in order, a row
// of the block at a time: the rows of x, dout, out and dx stream through memory once, in the order they lie,
// while the block's taps (transposed to [W, block]), its bias and, in the backward, the last W rows of dpre
// and the sums of dweight and dbias stay in small arrays in L1. (A lane of channels walked down a column of
// rows D values apart missed the cache at every token: docs/design.md, "Fifth round: the short conv walks
// rows; a fused SwiGLU".) The backward recomputes pre and dpre = dout silu'(pre) token by token; the gradient
// of row q of xs (a row of dx, or of the initial state's gradient before the sequence) is sum_j weight[:, j]
// dpre[q + (W-1) - j], complete once dpre[q + W-1] is: the W-1 tokens after the chunk are recomputed by the
// task. dweight and dbias go to one partial row per chunk, added up in chunk order at the end: no atomics,
// and the sums do not depend on the number of threads.
#include "../torch_cpu.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../vec_cpu.h"

namespace {

using namespace seqmix_cpu;

constexpr int64_t kBlockVectors = 1024 / kVectorBytes;  // vectors of channels per task: 256 float32 channels
constexpr int64_t kValuesInline = 1 << 15;  // below this many values of x the tasks run on the calling thread

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

// Rows of a block's slice of a [*, S] array (weight [D, W], a state [N, D, W-1]) from its first row on:
// row(j)[i] = a[i * S + j] for the n rows i and the S columns j (a transposition, once per task), and back.
template <typename T, typename Row>
void columns_to_rows(const T* a, int64_t n, int64_t S, const Row& row) {
  for (int64_t j = 0; j < S; ++j)
    for (int64_t i = 0; i < n; ++i) row(j)[i] = a[i * S + j];
}

template <typename T, typename Row>
void rows_to_columns(T* a, int64_t n, int64_t S, const Row& row) {
  for (int64_t j = 0; j < S; ++j)
    for (int64_t i = 0; i < n; ++i) a[i * S + j] = row(j)[i];
}

// A task's block of channels [d0, d0 + n) of one chunk: the taps transposed, taps[j][i] = weight[d0 + i, j],
// the bias, and the W-1 rows of xs before the sequence's first token (the initial state's, or zeros) when
// the chunk reads them. With the width KW fixed the loops over taps unroll; KW = 0 takes any W <= kMaxConvWidth.
template <int KW, typename T>
struct Block {
  static constexpr int cap = KW > 0 ? KW : kMaxConvWidth;
  static constexpr int64_t size = Conv<T>::block;
  const Conv<T>& p;
  const Span& sp;
  int64_t d0, n;
  alignas(64) T taps[cap][size] = {};
  alignas(64) T bias[size] = {};
  alignas(64) T head[cap][size] = {};

  // Lanes past n stay zeros: the last vector of a block computes on them and stores only its first lanes.
  Block(const Conv<T>& p, const Span& sp, int64_t b) : p(p), sp(sp), d0(b * size), n(std::min(size, p.D - d0)) {
    const int64_t W = taps_of<KW>(p), S = W - 1;
    columns_to_rows(p.weight + d0 * W, n, W, [&](int64_t j) { return taps[j]; });
    if (p.bias) std::copy(p.bias + d0, p.bias + d0 + n, bias);
    if (sp.t0 - S < sp.s && p.h0)  // the chunk reads the initial state's rows
      columns_to_rows(p.h0 + (sp.seq * p.D + d0) * S, n, S, [&](int64_t j) { return head[j]; });
  }

  // The block's part of xs's row at token pos (pos >= sp.s - (W-1)).
  const T* row(int64_t pos) const {
    return pos >= sp.s ? p.x + pos * p.D + d0 : head[pos - sp.s + taps_of<KW>(p) - 1];
  }

  // rows[j] = the rows token t reads, xs[t - (W-1) + j].
  void rows_of(int64_t t, const T** rows) const {
    const int64_t W = taps_of<KW>(p);
    for (int64_t j = 0; j < W; ++j) rows[j] = row(t - (W - 1) + j);
  }

  // The pre-activation bias + sum_j taps[j] rows[j] of lanes [v, v + m).
  Vec<T> pre(const T* const* rows, int64_t v, int64_t m) const {
    Vec<T> acc = load(bias + v);
    for (int64_t j = 0; j < taps_of<KW>(p); ++j) acc += load(taps[j] + v) * load_upto(rows[j] + v, m);
    return acc;
  }
};

template <int KW, typename T>
void forward_task(const Conv<T>& p, int64_t c, int64_t b, T* out, T* ht) {
  const Span sp = span_of(p, c);
  const Block<KW, T> k(p, sp, b);
  const T* rows[Block<KW, T>::cap];
  for (int64_t t = sp.t0; t < sp.t1; ++t) {
    k.rows_of(t, rows);
    T* o = out + t * p.D + k.d0;
    for (int64_t v = 0; v < k.n; v += p.lanes) {
      Vec<T> y = k.pre(rows, v, k.n - v);
      if (p.silu) y = y * sigmoid_v<T>(y);
      store_upto(o + v, y, k.n - v);
    }
  }
  if (ht && sp.t1 == sp.e) {  // the last W-1 rows of xs, to [N, D, W-1]
    const int64_t S = p.W - 1;
    rows_to_columns(ht + (sp.seq * p.D + k.d0) * S, k.n, S, [&](int64_t j) { return k.row(sp.e - S + j); });
  }
}

// What the backward writes: dx [L, D] (or null), dh0 [N, D, W-1] (or null), and per chunk the partial sums
// of dweight [NC, W, D] and dbias [NC, D] (or null).
template <typename T>
struct Grads {
  const T *dout, *dht;
  T *dx, *dh0, *dw, *db;
};

// The backward of one chunk and block: tokens t from the chunk's first (W-1 earlier for a sequence's first
// chunk, whose rows are the initial state's) to W-1 past its last, the rows dpre[t - j] in dp[(t - j) % W];
// at token t the gradient of xs[q], q = t - (W-1), is complete: sum_j taps[j] dpre[q + (W-1) - j].
template <int KW, typename T>
void backward_task(const Conv<T>& p, const Grads<T>& g, int64_t c, int64_t b) {
  constexpr int cap = Block<KW, T>::cap;
  constexpr int64_t size = Block<KW, T>::size;
  const Span sp = span_of(p, c);
  const Block<KW, T> k(p, sp, b);
  const int64_t W = taps_of<KW>(p), S = W - 1, n = k.n;
  alignas(64) T dp[cap][size], dw[cap][size], db[size], dinit[cap][size], dfinal[cap][size];
  std::fill(&dw[0][0], &dw[0][0] + cap * size, T(0));
  std::fill(db, db + size, T(0));
  // The final state's gradient, row j for xs[e - S + j], where the chunk computes those rows' gradients.
  const bool ends = g.dht && sp.t1 > sp.e - S;
  if (ends) columns_to_rows(g.dht + (sp.seq * p.D + k.d0) * S, n, S, [&](int64_t j) { return dfinal[j]; });
  const int64_t first = sp.t0 == sp.s ? sp.s - S : sp.t0;
  const T* rows[cap];
  const T* dps[cap];
  for (int64_t t = first; t < sp.t1 + S; ++t) {
    T* dpt = dp[(t - first) % W];
    if (t >= sp.t0 && t < sp.e) {
      k.rows_of(t, rows);
      const T* dor = g.dout + t * p.D + k.d0;
      const bool inside = t < sp.t1;  // tokens after the chunk are recomputed, not summed
      for (int64_t v = 0; v < n; v += p.lanes) {
        const int64_t m = n - v;
        Vec<T> d = load_upto(dor + v, m);
        if (p.silu) {
          const Vec<T> pre = k.pre(rows, v, m), sg = sigmoid_v<T>(pre);
          d = d * sg * (T(1) + pre * (T(1) - sg));
        }
        store(dpt + v, d);
        if (inside) {
          for (int64_t j = 0; j < W; ++j) store(dw[j] + v, load(dw[j] + v) + d * load_upto(rows[j] + v, m));
          store(db + v, load(db + v) + d);
        }
      }
    } else {
      std::fill(dpt, dpt + size, T(0));
    }
    const int64_t q = t - S;
    if (q < first) continue;
    T* dst = q < sp.s ? dinit[q - sp.s + S] : g.dx ? g.dx + q * p.D + k.d0 : nullptr;
    if (!dst) continue;
    for (int64_t j = 0; j < W; ++j) dps[j] = dp[(t - j - first) % W];
    const T* fin = ends && q >= sp.e - S ? dfinal[q - (sp.e - S)] : nullptr;
    for (int64_t v = 0; v < n; v += p.lanes) {
      Vec<T> acc = fin ? load(fin + v) : Vec<T>{};
      for (int64_t j = 0; j < W; ++j) acc += load(k.taps[j] + v) * load(dps[j] + v);
      store_upto(dst + v, acc, n - v);
    }
  }
  if (g.dh0 && sp.t0 == sp.s)
    rows_to_columns(g.dh0 + (sp.seq * p.D + k.d0) * S, n, S, [&](int64_t j) { return dinit[j]; });
  if (g.dw) {
    for (int64_t j = 0; j < W; ++j) std::copy(dw[j], dw[j] + n, g.dw + (c * W + j) * p.D + k.d0);
    if (g.db) std::copy(db, db + n, g.db + c * p.D + k.d0);
  }
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
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == D && weight.size(1) >= 1 && weight.size(1) <= kMaxConvWidth &&
                  weight.is_contiguous() && weight.scalar_type() == x.scalar_type(),
              "causal_conv1d_cpu: weight must be contiguous [D, W] in x's dtype, 1 <= W <= ", kMaxConvWidth);
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
