// Device helpers shared by the conv family's CUDA kernels: element conversion, the sequence a
// packed token belongs to, and the launch-status convention of conv_kernels.h.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "conv_kernels.h"

namespace seqmix {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// The packed sequence holding token t: the largest n with cu[n] <= t (empty sequences skipped).
__device__ __forceinline__ int64_t sequence_of(const int64_t* cu, int64_t n_seq, int64_t t) {
  int64_t lo = 0, hi = n_seq - 1;
  while (lo < hi) {
    int64_t mid = (lo + hi + 1) / 2;
    if (cu[mid] <= t) lo = mid; else hi = mid - 1;
  }
  return lo;
}

inline int launch_status() { return static_cast<int>(cudaGetLastError()); }

// Calls body.template operator()<T>() with T the element type of dtype.
template <typename Body>
int dispatch_dtype(DType dtype, Body&& body) {
  switch (dtype) {
    case kFloat32: body(float{}); break;
    case kFloat16: body(__half{}); break;
    case kBFloat16: body(__nv_bfloat16{}); break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
  return launch_status();
}

}  // namespace seqmix
