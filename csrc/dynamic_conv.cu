// LightConv / DynamicConv: out[t, c] = sum_j w[t, h, j] x[t + j - P, c], h = c / R, with the
// softmax over the K taps and the DropConnect mask applied as each tap's weight is read.
//
// Forward and input gradient: a block owns kConvTokens packed tokens of one head (blockIdx.x:
// token chunk, blockIdx.y: head), puts their effective weights in shared memory, and a thread per
// channel of the head walks the tokens. Weight gradient: one block per token reduces
// dout[t, head] . x[t + j - P, head] for every tap, staged in shared memory, and goes back through
// DropConnect and the softmax. The mask hash is the one of seqmix/kernels/conv/dynamic_reference.py.
#include "conv_common.cuh"

namespace seqmix {
namespace {

constexpr int kRowThreads = 256;
constexpr int kSlice = 64;  // channels per shared-memory slice of the weight gradient

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

// Block (token chunk, head): the chunk's effective weights go to shared memory once, so the
// softmax and the mask cost one exp per (token, head, tap), not one per channel.
template <typename T>
__global__ void dynamic_conv_fwd_kernel(DynamicConvArgs a, const T* x, const T* weight, T* out, float* lse_out) {
  extern __shared__ float w_s[];  // [kConvTokens, K]
  const int64_t h = blockIdx.y, C = a.H * a.R, t0 = int64_t(blockIdx.x) * kConvTokens;
  const int64_t nt = min(int64_t(kConvTokens), a.L - t0);
  for (int64_t i = threadIdx.x; i < nt; i += blockDim.x) {
    const int64_t row = weight_row(a, t0 + i, h);
    const float lse = a.softmax ? row_lse(weight + row, a.K) : 0.f;
    if (a.softmax) lse_out[(t0 + i) * a.H + h] = lse;
    for (int64_t j = 0; j < a.K; ++j) w_s[i * a.K + j] = tap_weight(a, weight, row + j, lse);
  }
  __syncthreads();
  const int64_t n0 = sequence_of(a.cu_seqlens, a.n_seq, t0);
  for (int64_t c = h * a.R + threadIdx.x; c < (h + 1) * a.R; c += blockDim.x) {
    int64_t n = n0;
    for (int64_t i = 0; i < nt; ++i) {
      const int64_t t = t0 + i;
      while (t >= a.cu_seqlens[n + 1]) ++n;
      const int64_t bos = a.cu_seqlens[n], eos = a.cu_seqlens[n + 1];
      float acc = 0.f;
      for (int64_t j = 0; j < a.K; ++j) {
        const int64_t p = t + j - a.pad_left;
        if (p >= bos && p < eos) acc += w_s[i * a.K + j] * to_float(x[p * C + c]);
      }
      out[t * C + c] = from_float<T>(acc);
    }
  }
}

// dx[s, c] = sum_j w[t, h, j] dout[t, c] with t = s - j + P inside the sequence. Block (chunk of s,
// head); the weights of rows t = s0 + P - (K-1) + i, i < kConvTokens + K - 1, go to shared memory.
template <typename T>
__global__ void dynamic_conv_bwd_dx_kernel(DynamicConvArgs a, const T* weight, const float* lse, const T* dout, T* dx) {
  extern __shared__ float w_s[];  // [kConvTokens + K - 1, K]
  const int64_t h = blockIdx.y, C = a.H * a.R, s0 = int64_t(blockIdx.x) * kConvTokens;
  const int64_t ns = min(int64_t(kConvTokens), a.L - s0), first = s0 + a.pad_left - (a.K - 1);
  for (int64_t i = threadIdx.x; i < ns + a.K - 1; i += blockDim.x) {
    const int64_t t = first + i;
    if (t < 0 || t >= a.L) continue;
    const int64_t row = weight_row(a, t, h);
    const float row_lse_t = a.softmax ? lse[t * a.H + h] : 0.f;
    for (int64_t j = 0; j < a.K; ++j) w_s[i * a.K + j] = tap_weight(a, weight, row + j, row_lse_t);
  }
  __syncthreads();
  const int64_t n0 = sequence_of(a.cu_seqlens, a.n_seq, s0);
  for (int64_t c = h * a.R + threadIdx.x; c < (h + 1) * a.R; c += blockDim.x) {
    int64_t n = n0;
    for (int64_t s = s0; s < s0 + ns; ++s) {
      while (s >= a.cu_seqlens[n + 1]) ++n;
      const int64_t bos = a.cu_seqlens[n], eos = a.cu_seqlens[n + 1];
      float acc = 0.f;
      for (int64_t j = 0; j < a.K; ++j) {
        const int64_t t = s - j + a.pad_left;
        if (t >= bos && t < eos) acc += w_s[(t - first) * a.K + j] * to_float(dout[t * C + c]);
      }
      dx[s * C + c] = from_float<T>(acc);
    }
  }
}

// Weight gradient, block (token chunk, head): g[t, j] = sum_r dout[t, r] x[t + j - P, r] over the
// head's channels, staged through shared memory in slices of kSlice channels (the chunk's dout rows
// and the x rows its taps read), then back through the DropConnect mask and the softmax:
// dlogit = p * (g - sum_j p g).
template <typename T>
__global__ void dynamic_conv_bwd_dw_kernel(DynamicConvArgs a, const T* x, const T* weight, const float* lse,
                                           const T* dout, float* dlogits) {
  extern __shared__ float smem[];
  __shared__ int64_t bos_s[kConvTokens], eos_s[kConvTokens];
  __shared__ float dot_s[kConvTokens];
  const int64_t h = blockIdx.y, C = a.H * a.R, K = a.K, t0 = int64_t(blockIdx.x) * kConvTokens;
  const int64_t nt = min(int64_t(kConvTokens), a.L - t0), first = t0 - a.pad_left, nx = nt + K - 1;
  float* g = smem;                            // [kConvTokens, K]
  float* dout_s = g + kConvTokens * K;        // [kConvTokens, kSlice]
  float* x_s = dout_s + kConvTokens * kSlice;  // [kConvTokens + K - 1, kSlice]: row i is token first + i
  for (int64_t i = threadIdx.x; i < nt * K; i += blockDim.x) g[i] = 0.f;
  for (int64_t i = threadIdx.x; i < nt; i += blockDim.x) {
    const int64_t n = sequence_of(a.cu_seqlens, a.n_seq, t0 + i);
    bos_s[i] = a.cu_seqlens[n];
    eos_s[i] = a.cu_seqlens[n + 1];
  }
  for (int64_t r0 = 0; r0 < a.R; r0 += kSlice) {
    const int64_t nr = min(int64_t(kSlice), a.R - r0), c0 = h * a.R + r0;
    __syncthreads();  // the previous slice is consumed
    for (int64_t i = threadIdx.x; i < nt * kSlice; i += blockDim.x) {
      const int64_t row = i / kSlice, r = i % kSlice;
      dout_s[i] = r < nr ? to_float(dout[(t0 + row) * C + c0 + r]) : 0.f;
    }
    for (int64_t i = threadIdx.x; i < nx * kSlice; i += blockDim.x) {
      const int64_t p = first + i / kSlice, r = i % kSlice;
      x_s[i] = r < nr && p >= 0 && p < a.L ? to_float(x[p * C + c0 + r]) : 0.f;
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < nt * K; i += blockDim.x) {
      const int64_t row = i / K, j = i % K, p = t0 + row + j - a.pad_left;
      if (p < bos_s[row] || p >= eos_s[row]) continue;  // taps outside the sequence read zero
      float acc = 0.f;
      for (int64_t r = 0; r < nr; ++r) acc += dout_s[row * kSlice + r] * x_s[(row + j) * kSlice + r];
      g[i] += acc;
    }
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < nt * K; i += blockDim.x) {
    const int64_t off = weight_row(a, t0 + i / K, h) + i % K;
    if (a.threshold > 0) g[i] = keep(uint64_t(off), a.seed_lo, a.threshold) ? g[i] * a.scale : 0.f;
  }
  __syncthreads();
  if (a.softmax) {
    for (int64_t row = threadIdx.x; row < nt; row += blockDim.x) {
      const int64_t w_row = weight_row(a, t0 + row, h);
      const float row_lse_t = lse[(t0 + row) * a.H + h];
      float dot = 0.f;
      for (int64_t j = 0; j < K; ++j) dot += __expf(to_float(weight[w_row + j]) - row_lse_t) * g[row * K + j];
      dot_s[row] = dot;
    }
    __syncthreads();
  }
  for (int64_t i = threadIdx.x; i < nt * K; i += blockDim.x) {
    const int64_t row = i / K, t = t0 + row;
    float out = g[i];
    if (a.softmax) out = __expf(to_float(weight[weight_row(a, t, h) + i % K]) - lse[t * a.H + h]) * (out - dot_s[row]);
    dlogits[(t * a.H + h) * K + i % K] = out;
  }
}

// Blocks (token chunk, head) with a thread per channel of the head, in whole warps.
dim3 head_grid(const DynamicConvArgs& a) { return dim3(unsigned((a.L + kConvTokens - 1) / kConvTokens), unsigned(a.H)); }
unsigned head_threads(const DynamicConvArgs& a) { return unsigned(min(int64_t(256), (a.R + 31) / 32 * 32)); }

}  // namespace

int dynamic_conv_fwd(const DynamicConvArgs& a, const void* x, const void* weight, void* out, float* lse, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (a.L > 0)
      dynamic_conv_fwd_kernel<T><<<head_grid(a), head_threads(a), kConvTokens * a.K * sizeof(float), s>>>(
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
    dynamic_conv_bwd_dx_kernel<T><<<head_grid(a), head_threads(a), (kConvTokens + a.K - 1) * a.K * sizeof(float), s>>>(
        a, w, lse, dy, static_cast<T*>(dx));
    const size_t dw_smem = (kConvTokens * a.K + (2 * kConvTokens + a.K - 1) * kSlice) * sizeof(float);
    dynamic_conv_bwd_dw_kernel<T><<<head_grid(a), kRowThreads, dw_smem, s>>>(a, static_cast<const T*>(x), w, lse, dy,
                                                                            dlogits);
  });
}

}  // namespace seqmix
