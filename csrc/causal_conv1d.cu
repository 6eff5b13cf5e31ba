// The short causal depthwise convolution: forward, backward and the decoding update.
//
// A thread owns one channel d (consecutive threads, consecutive channels: coalesced rows) and
// walks kConvTokens consecutive packed tokens; blockIdx.x is the token chunk (the large axis),
// blockIdx.y the channel block. Tap j of token t reads the input W-1-j tokens back, or the
// initial state [n, d, W-1] (oldest first) before the sequence start, or zero without one.
#include "conv_common.cuh"

namespace seqmix {
namespace {

constexpr int kThreads = 128;

template <typename T>
__device__ __forceinline__ float input_at(const T* x, const float* h0, int64_t n, int64_t bos, int64_t p, int64_t d,
                                          int64_t D, int W) {
  if (p >= bos) return to_float(x[p * D + d]);
  if (h0 == nullptr) return 0.f;
  return h0[(n * D + d) * (W - 1) + (W - 1) + (p - bos)];
}

template <typename T>
__device__ __forceinline__ float pre_activation(const T* x, const T* w, const T* bias, const float* h0, int64_t n,
                                                int64_t bos, int64_t t, int64_t d, int64_t D, int W) {
  float z = bias ? to_float(bias[d]) : 0.f;
  for (int j = 0; j < W; ++j) z += to_float(w[d * W + j]) * input_at(x, h0, n, bos, t - (W - 1) + j, d, D, W);
  return z;
}

__device__ __forceinline__ float sigmoid(float z) { return 1.f / (1.f + __expf(-z)); }

template <typename T>
__global__ void causal_conv1d_fwd_kernel(const T* x, const T* w, const T* bias, const float* h0, T* out,
                                         const int64_t* cu, int64_t n_seq, int64_t L, int64_t D, int W, bool silu) {
  const int64_t d = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t t0 = int64_t(blockIdx.x) * kConvTokens;
  if (d >= D) return;
  int64_t n = sequence_of(cu, n_seq, t0);
  for (int64_t t = t0; t < min(t0 + kConvTokens, L); ++t) {
    while (t >= cu[n + 1]) ++n;
    float z = pre_activation(x, w, bias, h0, n, cu[n], t, d, D, W);
    out[t * D + d] = from_float<T>(silu ? z * sigmoid(z) : z);
  }
}

// ht[n, d, m] = the input W-1-m tokens before the end of sequence n.
template <typename T>
__global__ void causal_conv1d_final_state_kernel(const T* x, const float* h0, float* ht, const int64_t* cu, int64_t D,
                                                 int W) {
  const int64_t n = blockIdx.x, d = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (d >= D) return;
  for (int m = 0; m < W - 1; ++m) ht[(n * D + d) * (W - 1) + m] = input_at(x, h0, n, cu[n], cu[n + 1] - (W - 1) + m, d, D, W);
}

// dz = dout * act'(z), and the chunk's partial sums of dz * tap_j (weight) and dz (bias).
template <typename T>
__global__ void causal_conv1d_bwd_dz_kernel(const T* x, const T* w, const T* bias, const float* h0, const T* dout,
                                            float* dz, float* dw_part, float* db_part, const int64_t* cu,
                                            int64_t n_seq, int64_t L, int64_t D, int W, bool silu) {
  const int64_t d = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t t0 = int64_t(blockIdx.x) * kConvTokens, t1 = min(t0 + kConvTokens, L);
  if (d >= D) return;
  const int64_t n0 = sequence_of(cu, n_seq, t0);
  int64_t n = n0;
  float db = 0.f;
  for (int64_t t = t0; t < t1; ++t) {
    while (t >= cu[n + 1]) ++n;
    float g = to_float(dout[t * D + d]);
    if (silu) {
      float z = pre_activation(x, w, bias, h0, n, cu[n], t, d, D, W), s = sigmoid(z);
      g *= s * (1.f + z * (1.f - s));
    }
    dz[t * D + d] = g;
    db += g;
  }
  for (int j = 0; j < W; ++j) {
    float acc = 0.f;
    n = n0;
    for (int64_t t = t0; t < t1; ++t) {
      while (t >= cu[n + 1]) ++n;
      acc += dz[t * D + d] * input_at(x, h0, n, cu[n], t - (W - 1) + j, d, D, W);
    }
    dw_part[(int64_t(blockIdx.x) * W + j) * D + d] = acc;
  }
  if (db_part) db_part[int64_t(blockIdx.x) * D + d] = db;
}

// dx[p] = sum_j w[j] dz[p + W-1-j] over outputs inside the sequence, plus the final state's gradient.
template <typename T>
__global__ void causal_conv1d_bwd_dx_kernel(const T* w, const float* dz, const float* dht, T* dx, const int64_t* cu,
                                            int64_t n_seq, int64_t L, int64_t D, int W) {
  const int64_t d = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t t0 = int64_t(blockIdx.x) * kConvTokens;
  if (d >= D) return;
  int64_t n = sequence_of(cu, n_seq, t0);
  for (int64_t p = t0; p < min(t0 + kConvTokens, L); ++p) {
    while (p >= cu[n + 1]) ++n;
    const int64_t eos = cu[n + 1];
    float acc = 0.f;
    for (int j = 0; j < W; ++j) {
      const int64_t t = p + (W - 1 - j);
      if (t < eos) acc += to_float(w[d * W + j]) * dz[t * D + d];
    }
    const int64_t m = p - (eos - (W - 1));
    if (dht && m >= 0) acc += dht[(n * D + d) * (W - 1) + m];
    dx[p * D + d] = from_float<T>(acc);
  }
}

// Gradient of initial-state entry s (the input W-1-s tokens before the start of sequence n).
template <typename T>
__global__ void causal_conv1d_bwd_dh0_kernel(const T* w, const float* dz, const float* dht, float* dh0,
                                             const int64_t* cu, int64_t D, int W) {
  const int64_t n = blockIdx.x, d = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (d >= D) return;
  const int64_t bos = cu[n], eos = cu[n + 1];
  for (int s = 0; s < W - 1; ++s) {
    const int64_t p = bos + s - (W - 1);
    float acc = 0.f;
    for (int j = 0; j < W; ++j) {
      const int64_t t = p + (W - 1 - j);
      if (t >= bos && t < eos) acc += to_float(w[d * W + j]) * dz[t * D + d];
    }
    const int64_t m = p - (eos - (W - 1));
    if (dht && m >= 0) acc += dht[(n * D + d) * (W - 1) + m];
    dh0[(n * D + d) * (W - 1) + s] = acc;
  }
}

// Decoding: T tokens of sequence n continue from its state, which is then overwritten. Each
// thread owns its channel's state, and entry m is written after every read of entries < T+m.
template <typename T>
__global__ void causal_conv1d_update_kernel(const T* x, float* state, const T* w, const T* bias, T* out, int64_t Tn,
                                            int64_t D, int W, bool silu) {
  const int64_t n = blockIdx.x, d = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (d >= D) return;
  float* s = state + (n * D + d) * (W - 1);
  auto window = [&](int64_t pos) { return pos >= 0 ? to_float(x[(n * Tn + pos) * D + d]) : s[W - 1 + pos]; };
  for (int64_t t = 0; t < Tn; ++t) {
    float z = bias ? to_float(bias[d]) : 0.f;
    for (int j = 0; j < W; ++j) z += to_float(w[d * W + j]) * window(t - (W - 1) + j);
    out[(n * Tn + t) * D + d] = from_float<T>(silu ? z * sigmoid(z) : z);
  }
  for (int m = 0; m < W - 1; ++m) s[m] = window(Tn - (W - 1) + m);
}

dim3 chunk_grid(int64_t L, int64_t D) { return dim3(unsigned((L + kConvTokens - 1) / kConvTokens), unsigned((D + kThreads - 1) / kThreads)); }
dim3 seq_grid(int64_t n, int64_t D) { return dim3(unsigned(n), unsigned((D + kThreads - 1) / kThreads)); }

}  // namespace

int causal_conv1d_fwd(DType dtype, const void* x, const void* weight, const void* bias, const float* h0, void* out,
                      float* ht, const int64_t* cu_seqlens, int64_t n_seq, int64_t L, int64_t D, int W, bool silu,
                      void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (L > 0)
      causal_conv1d_fwd_kernel<T><<<chunk_grid(L, D), kThreads, 0, s>>>(
          static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<const T*>(bias), h0,
          static_cast<T*>(out), cu_seqlens, n_seq, L, D, W, silu);
    if (ht && W > 1)
      causal_conv1d_final_state_kernel<T><<<seq_grid(n_seq, D), kThreads, 0, s>>>(static_cast<const T*>(x), h0, ht,
                                                                                  cu_seqlens, D, W);
  });
}

int causal_conv1d_bwd(DType dtype, const void* x, const void* weight, const void* bias, const float* h0,
                      const void* dout, const float* dht, float* dz, void* dx, float* dw_part, float* db_part,
                      float* dh0, const int64_t* cu_seqlens, int64_t n_seq, int64_t L, int64_t D, int W, bool silu,
                      void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* w = static_cast<const T*>(weight);
    if (L > 0) {
      causal_conv1d_bwd_dz_kernel<T><<<chunk_grid(L, D), kThreads, 0, s>>>(
          static_cast<const T*>(x), w, static_cast<const T*>(bias), h0, static_cast<const T*>(dout), dz, dw_part,
          db_part, cu_seqlens, n_seq, L, D, W, silu);
      causal_conv1d_bwd_dx_kernel<T><<<chunk_grid(L, D), kThreads, 0, s>>>(w, dz, dht, static_cast<T*>(dx), cu_seqlens,
                                                                           n_seq, L, D, W);
    }
    if (dh0 && W > 1)
      causal_conv1d_bwd_dh0_kernel<T><<<seq_grid(n_seq, D), kThreads, 0, s>>>(w, dz, dht, dh0, cu_seqlens, D, W);
  });
}

int causal_conv1d_update(DType dtype, const void* x, float* state, const void* weight, const void* bias, void* out,
                         int64_t N, int64_t T, int64_t D, int W, bool silu, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype, [&](auto tag) {
    using E = decltype(tag);
    causal_conv1d_update_kernel<E><<<seq_grid(N, D), kThreads, 0, s>>>(
        static_cast<const E*>(x), state, static_cast<const E*>(weight), static_cast<const E*>(bias),
        static_cast<E*>(out), T, D, W, silu);
  });
}

}  // namespace seqmix
