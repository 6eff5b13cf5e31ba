// LightConv / DynamicConv: out[t, c] = sum_j w[t, h, j] x[t + j - P, c], h = c / R, with the
// softmax over the K taps and the DropConnect mask applied as each tap's weight is read.
//
// Forward and input gradient: a thread owns one channel and walks kConvTokens packed tokens
// (blockIdx.x: token chunk, blockIdx.y: channel block); the R threads of a head read the same
// weight addresses (broadcast loads). Weight gradient: one block per token reduces
// dout[t, head] . x[t + j - P, head] for every (head, tap) and goes back through DropConnect and
// the softmax in shared memory. The mask hash is the one of seqmix/kernels/conv/dynamic_reference.py.
#include "conv_common.cuh"

namespace seqmix {
namespace {

constexpr int kThreads = 128;
constexpr int kRowThreads = 256;

__device__ __forceinline__ uint64_t mix32(uint64_t h) {
  h ^= h >> 16;
  h = (h * 0x7FEB352Dull) & 0xFFFFFFFFull;
  h ^= h >> 15;
  h = (h * 0x2C1B3C6Dull) & 0xFFFFFFFFull;
  return h ^ (h >> 16);
}

__device__ __forceinline__ bool keep(uint64_t index, uint32_t seed_lo, uint32_t threshold) {
  uint64_t h = mix32((index & 0xFFFFFFFFull) ^ seed_lo);
  h = mix32(h ^ (index >> 32) ^ seed_lo);
  return (h >> 8) >= threshold;
}

// Flat index of weight row (t, h) in weight.
__device__ __forceinline__ int64_t weight_row(const DynamicConvArgs& a, int64_t t, int64_t h) {
  return a.per_token ? (t * a.H + h) * a.K : h * a.K;
}

template <typename T>
__device__ float row_lse(const T* logits, int64_t K) {
  float m = -INFINITY, s = 0.f;
  for (int64_t j = 0; j < K; ++j) m = fmaxf(m, to_float(logits[j]));
  for (int64_t j = 0; j < K; ++j) s += __expf(to_float(logits[j]) - m);
  return m + __logf(s);
}

// The effective weight at flat index off of a row with log-normaliser lse.
template <typename T>
__device__ __forceinline__ float tap_weight(const DynamicConvArgs& a, const T* weight, int64_t off, float lse) {
  float w = to_float(weight[off]);
  if (a.softmax) w = __expf(w - lse);
  if (a.threshold > 0) w = keep(uint64_t(off), a.seed_lo, a.threshold) ? w * a.scale : 0.f;
  return w;
}

template <typename T>
__global__ void dynamic_conv_fwd_kernel(DynamicConvArgs a, const T* x, const T* weight, T* out, float* lse_out) {
  const int64_t C = a.H * a.R, c = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t t0 = int64_t(blockIdx.x) * kConvTokens;
  if (c >= C) return;
  const int64_t h = c / a.R;
  int64_t n = sequence_of(a.cu_seqlens, a.n_seq, t0);
  for (int64_t t = t0; t < min(t0 + kConvTokens, a.L); ++t) {
    while (t >= a.cu_seqlens[n + 1]) ++n;
    const int64_t bos = a.cu_seqlens[n], eos = a.cu_seqlens[n + 1], row = weight_row(a, t, h);
    const float lse = a.softmax ? row_lse(weight + row, a.K) : 0.f;
    float acc = 0.f;
    for (int64_t j = 0; j < a.K; ++j) {
      const int64_t p = t + j - a.pad_left;
      if (p >= bos && p < eos) acc += tap_weight(a, weight, row + j, lse) * to_float(x[p * C + c]);
    }
    out[t * C + c] = from_float<T>(acc);
    if (a.softmax && c % a.R == 0) lse_out[t * a.H + h] = lse;
  }
}

// dx[s, c] = sum_j w[t, h, j] dout[t, c] with t = s - j + P inside the sequence.
template <typename T>
__global__ void dynamic_conv_bwd_dx_kernel(DynamicConvArgs a, const T* weight, const float* lse, const T* dout, T* dx) {
  const int64_t C = a.H * a.R, c = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t s0 = int64_t(blockIdx.x) * kConvTokens;
  if (c >= C) return;
  const int64_t h = c / a.R;
  int64_t n = sequence_of(a.cu_seqlens, a.n_seq, s0);
  for (int64_t s = s0; s < min(s0 + kConvTokens, a.L); ++s) {
    while (s >= a.cu_seqlens[n + 1]) ++n;
    const int64_t bos = a.cu_seqlens[n], eos = a.cu_seqlens[n + 1];
    float acc = 0.f;
    for (int64_t j = 0; j < a.K; ++j) {
      const int64_t t = s - j + a.pad_left;
      if (t < bos || t >= eos) continue;
      const float row_lse_t = a.softmax ? lse[t * a.H + h] : 0.f;
      acc += tap_weight(a, weight, weight_row(a, t, h) + j, row_lse_t) * to_float(dout[t * C + c]);
    }
    dx[s * C + c] = from_float<T>(acc);
  }
}

// For token t: g[h, j] = sum_r dout[t, h*R + r] x[t + j - P, h*R + r], then back through the
// DropConnect mask and the softmax: dlogit = p * (g - sum_j p g).
template <typename T>
__global__ void dynamic_conv_bwd_dw_kernel(DynamicConvArgs a, const T* x, const T* weight, const float* lse,
                                           const T* dout, float* dlogits) {
  extern __shared__ float smem[];
  float* g = smem;                 // [H*K]
  float* p = smem + a.H * a.K;     // [H*K]
  const int64_t t = blockIdx.x, C = a.H * a.R, HK = a.H * a.K;
  const int64_t n = sequence_of(a.cu_seqlens, a.n_seq, t);
  const int64_t bos = a.cu_seqlens[n], eos = a.cu_seqlens[n + 1];
  for (int64_t i = threadIdx.x; i < HK; i += blockDim.x) {
    const int64_t h = i / a.K, j = i % a.K, src = t + j - a.pad_left, off = weight_row(a, t, h) + j;
    float acc = 0.f;
    if (src >= bos && src < eos)
      for (int64_t r = 0; r < a.R; ++r) acc += to_float(dout[t * C + h * a.R + r]) * to_float(x[src * C + h * a.R + r]);
    if (a.threshold > 0) acc = keep(uint64_t(off), a.seed_lo, a.threshold) ? acc * a.scale : 0.f;
    g[i] = acc;
    p[i] = a.softmax ? __expf(to_float(weight[off]) - lse[t * a.H + h]) : 0.f;
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < HK; i += blockDim.x) {
    float out = g[i];
    if (a.softmax) {
      const int64_t row = i - i % a.K;
      float dot = 0.f;
      for (int64_t j = 0; j < a.K; ++j) dot += p[row + j] * g[row + j];
      out = p[i] * (g[i] - dot);
    }
    dlogits[t * HK + i] = out;
  }
}

dim3 chunk_grid(int64_t L, int64_t C) {
  return dim3(unsigned((L + kConvTokens - 1) / kConvTokens), unsigned((C + kThreads - 1) / kThreads));
}

}  // namespace

int dynamic_conv_fwd(const DynamicConvArgs& a, const void* x, const void* weight, void* out, float* lse, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (a.L > 0)
      dynamic_conv_fwd_kernel<T><<<chunk_grid(a.L, a.H * a.R), kThreads, 0, s>>>(
          a, static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<T*>(out), lse);
  });
}

int dynamic_conv_bwd(const DynamicConvArgs& a, const void* x, const void* weight, const float* lse, const void* dout,
                     void* dx, float* dlogits, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (a.L == 0) return;
    const T* w = static_cast<const T*>(weight);
    const T* dy = static_cast<const T*>(dout);
    dynamic_conv_bwd_dx_kernel<T><<<chunk_grid(a.L, a.H * a.R), kThreads, 0, s>>>(a, w, lse, dy, static_cast<T*>(dx));
    dynamic_conv_bwd_dw_kernel<T><<<unsigned(a.L), kRowThreads, 2 * a.H * a.K * sizeof(float), s>>>(
        a, static_cast<const T*>(x), w, lse, dy, dlogits);
  });
}

}  // namespace seqmix
