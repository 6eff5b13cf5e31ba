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
// One task owns one chunk of tokens and one block of channels (the vector lanes) and walks its tokens in
// order: the W rows of xs a token reads were read for the tokens just before (still in L1), so x comes from
// memory once. The backward recomputes pre and dpre = dout silu'(pre) row by row into a ring of W rows, and a
// row p of dx (or of the initial state's gradient, p before the sequence) is sum_j weight[:, j] dpre[p +
// (W-1) - j], complete as soon as dpre[p + W-1] is: it needs the W-1 rows after the chunk, which the task
// recomputes. dweight and dbias go to one partial row per chunk, added up in chunk order at the end: no
// atomics, and the sums do not depend on the number of threads.
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
  int64_t state_at(int64_t seq, int64_t d, int64_t k) const { return (seq * D + d) * (W - 1) + k; }
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

// A task's local rows, `block` channels each (lanes past the block's n channels stay zero): the taps [W],
// the bias, the rows of the initial state [W-1]; for the backward a ring of W rows of dpre, the initial
// state's gradient [W-1] and the sums of dweight [W] and dbias. For the token t at hand, xr[j] points at the
// row of xs of token t - (W-1) + j (in x, or in the initial state's rows) and dr[j] at the ring row of
// dpre[t - j]: the pointers move from token to token, nothing is copied (x is read where it lies).
template <typename T>
struct Local {
  std::vector<T> taps, bias, init, dpre, dinit, dw, db;
  std::vector<const T*> xr;
  std::vector<T*> dr;
  explicit Local(const Conv<T>& p)
      : taps(p.W * p.block), bias(p.block), init(std::max<int64_t>(p.W - 1, 1) * p.block), dpre(p.W * p.block),
        dinit(init.size()), dw(p.W * p.block), db(p.block), xr(p.W), dr(p.W) {}

  // Taps and bias of channels [d0, d0 + n), and the pointers for the chunk's first token: xr[1..W-1] at the
  // rows of the W-1 tokens before t0 (x's, or the initial state's copied here), dr at the ring's rows.
  void start(const Conv<T>& p, const Span& sp, int64_t d0, int64_t n) {
    for (auto* rows : {&taps, &bias, &init}) std::fill(rows->begin(), rows->end(), T(0));
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < p.W; ++j) taps[j * p.block + i] = p.weight[(d0 + i) * p.W + j];
      if (p.bias) bias[i] = p.bias[d0 + i];
    }
    for (int64_t j = 0; j < p.W; ++j) dr[j] = dpre.data() + j * p.block;
    for (int64_t k = 0; k < p.W - 1; ++k) {
      const int64_t pos = sp.t0 - (p.W - 1) + k;
      if (pos >= sp.s) {
        xr[k + 1] = p.x + pos * p.D + d0;
        continue;
      }
      T* row = init.data() + k * p.block;
      if (p.h0) {
        for (int64_t i = 0; i < n; ++i) row[i] = p.h0[p.state_at(sp.seq, d0 + i, pos - sp.s + p.W - 1)];
      }  // else zeros
      xr[k + 1] = row;
    }
  }

  // To token t (from t - 1): xr moves by one row, the newest x's row of t.
  void enter_x(const Conv<T>& p, int64_t t, int64_t d0) {
    std::rotate(xr.begin(), xr.begin() + 1, xr.end());
    xr[p.W - 1] = p.x + t * p.D + d0;
  }
  // From token t to t + 1: the oldest ring row of dpre becomes the newest.
  void next_dpre() { std::rotate(dr.begin(), dr.end() - 1, dr.end()); }
};

// The number of taps: KW where the caller's template fixes it (the loops over taps unroll), else p.W.
template <int KW, typename T>
inline int64_t taps_of(const Conv<T>& p) {
  return KW > 0 ? KW : p.W;
}

// One token's pointers (local.xr or local.dr) in locals: the stores (memcpy) could alias the Local's
// members, so that the compiler would reload those for every vector; with W fixed these live in registers.
template <int KW, typename P>
struct Rows {
  P fixed[KW > 0 ? KW : 1];
  const P* at;
  explicit Rows(const std::vector<P>& ring) : at(ring.data()) {
    if constexpr (KW > 0) {
      std::copy(ring.begin(), ring.end(), fixed);
      at = fixed;
    }
  }
  P operator[](int64_t j) const { return at[j]; }
};

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

// The pre-activation of channels [o, o + count) (count capped at the lanes) of the token whose rows of xs are
// xr: bias + sum_j taps[j] xr[j] (taps [W, block]).
template <int KW, typename T>
inline Vec<T> pre_activation(const Conv<T>& p, const T* bias, const T* taps, const Rows<KW, const T*>& xr,
                             int64_t o, int64_t count) {
  Vec<T> acc = load(bias + o);
  for (int64_t j = 0; j < taps_of<KW>(p); ++j) acc += load(taps + j * p.block + o) * get(xr[j] + o, count);
  return acc;
}

template <int KW, typename T>
void forward_task(const Conv<T>& p, Local<T>& local, int64_t c, int64_t b, T* out, T* ht) {
  const Span sp = span_of(p, c);
  const int64_t d0 = b * p.block, n = std::min(p.block, p.D - d0), vectors = (n + p.lanes - 1) / p.lanes;
  local.start(p, sp, d0, n);
  const T *bias = local.bias.data(), *taps = local.taps.data();
  for (int64_t t = sp.t0; t < sp.t1; ++t) {
    local.enter_x(p, t, d0);
    const Rows<KW, const T*> xr(local.xr);
    T* o = out + t * p.D + d0;
    for (int64_t v = 0; v < vectors; ++v) {
      Vec<T> y = pre_activation<KW>(p, bias, taps, xr, v * p.lanes, n - v * p.lanes);
      if (p.silu) y = y * sigmoid_v<T>(y);
      put(o + v * p.lanes, y, n - v * p.lanes);
    }
  }
  if (ht && sp.t1 == sp.e) {  // the last W-1 rows of xs: xr[1..W-1]
    for (int64_t k = 0; k < p.W - 1; ++k) {
      for (int64_t i = 0; i < n; ++i) ht[p.state_at(sp.seq, d0 + i, k)] = local.xr[k + 1][i];
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

template <int KW, typename T>
void backward_task(const Conv<T>& p, const Grads<T>& g, Local<T>& local, int64_t c, int64_t b) {
  const Span sp = span_of(p, c);
  const int64_t W = taps_of<KW>(p), d0 = b * p.block, n = std::min(p.block, p.D - d0), vectors = (n + p.lanes - 1) / p.lanes;
  local.start(p, sp, d0, n);
  for (auto* rows : {&local.dpre, &local.dinit, &local.dw, &local.db}) std::fill(rows->begin(), rows->end(), T(0));
  const bool sums = g.dw != nullptr;
  // Rows q of dx from the chunk's first, or from the initial state's first row for a sequence's first chunk.
  const int64_t first = sp.t0 == sp.s ? sp.s - (W - 1) : sp.t0;
  const T *bias = local.bias.data(), *taps = local.taps.data();
  T *dw = local.dw.data(), *db = local.db.data();
  alignas(64) T final_grad[Lanes<T>::W];
  for (int64_t t = first; t < sp.t1 + W - 1; local.next_dpre(), ++t) {
    const Rows<KW, T*> dr(local.dr);
    T* dp_row = dr[0];
    if (t >= sp.t0 && t < sp.e) {
      local.enter_x(p, t, d0);
      const Rows<KW, const T*> xr(local.xr);
      const T* dout = g.dout + t * p.D + d0;
      const bool owned = sums && t < sp.t1;  // rows after the chunk are recomputed, not summed
      for (int64_t v = 0; v < vectors; ++v) {
        const int64_t o = v * p.lanes;
        const Vec<T> pre = pre_activation<KW>(p, bias, taps, xr, o, n - o);
        Vec<T> dp = get(dout + o, n - o);
        if (p.silu) {
          const Vec<T> sg = sigmoid_v<T>(pre);
          dp = dp * sg * (T(1) + pre * (T(1) - sg));
        }
        store(dp_row + o, dp);
        if (owned) {
          for (int64_t j = 0; j < W; ++j) {
            T* acc = dw + j * p.block + o;
            store(acc, load(acc) + dp * get(xr[j] + o, n - o));
          }
          store(db + o, load(db + o) + dp);
        }
      }
    } else {
      std::fill(dp_row, dp_row + p.block, T(0));
    }
    const int64_t q = t - (W - 1);  // the row of xs whose gradient is now complete
    if (q < first) continue;
    T* dst = q >= sp.s ? (g.dx ? g.dx + q * p.D + d0 : nullptr) : local.dinit.data() + (q - sp.s + W - 1) * p.block;
    if (!dst) continue;
    const int64_t k = q - (sp.e - (W - 1));  // its column in the final state, if >= 0
    for (int64_t v = 0; v < vectors; ++v) {
      const int64_t o = v * p.lanes;
      Vec<T> acc{};
      for (int64_t j = 0; j < W; ++j) acc += load(taps + j * p.block + o) * load(dr[j] + o);
      if (k >= 0 && g.dht) {
        const int64_t m = std::min<int64_t>(p.lanes, n - o);
        for (int64_t i = 0; i < m; ++i) final_grad[i] = g.dht[p.state_at(sp.seq, d0 + o + i, k)];
        acc += load_part(final_grad, m);
      }
      put(dst + o, acc, q >= sp.s ? n - o : p.lanes);
    }
  }
  if (g.dh0 && sp.t0 == sp.s) {
    for (int64_t k = 0; k < W - 1; ++k)
      for (int64_t i = 0; i < n; ++i) g.dh0[p.state_at(sp.seq, d0 + i, k)] = local.dinit[k * p.block + i];
  }
  if (sums) {
    for (int64_t j = 0; j < W; ++j)
      std::memcpy(g.dw + (c * W + j) * p.D + d0, dw + j * p.block, n * sizeof(T));
    if (g.db) std::memcpy(g.db + c * p.D + d0, db, n * sizeof(T));
  }
}

// Runs task(local, chunk, block) over every chunk and block of channels.
template <typename T, typename F>
void over_tasks(const Conv<T>& p, int64_t tokens, F task) {
  const int64_t blocks = p.blocks(), total = p.num_chunks * blocks;
  const int64_t grain = tokens * p.D < kValuesInline ? std::max<int64_t>(total, 1) : 1;
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    Local<T> local(p);
    for (int64_t i = begin; i < end; ++i) task(local, i / blocks, i % blocks);
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
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(), "causal_conv1d_cpu: x must be [L, D] on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "causal_conv1d_cpu: x must be float32 or float64, got ", x.scalar_type());
  const int64_t D = x.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == D && weight.size(1) >= 1 && weight.is_contiguous() &&
                  weight.scalar_type() == x.scalar_type(),
              "causal_conv1d_cpu: weight must be contiguous [D, W >= 1] in x's dtype");
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
      over_tasks(p, x.size(0), [&](Local<scalar_t>& local, int64_t c, int64_t b) {
        forward_task<decltype(kw)::value>(p, local, c, b, o, h);
      });
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
      over_tasks(p, x.size(0), [&](Local<T>& local, int64_t c, int64_t b) {
        backward_task<decltype(kw)::value>(p, g, local, c, b);
      });
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
