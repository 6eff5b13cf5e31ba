// C interface of the conv family's CUDA kernels (csrc/*.cu), called by the binding in
// csrc/conv_binding.cpp. Only plain types cross it: raw pointers, sizes, a dtype code and the
// CUDA stream as an opaque pointer, so the .cu files need no torch headers and the binding no
// CUDA headers. Every function returns 0 on success or a cudaError_t code from the launch.
#pragma once

#include <cstdint>

namespace seqmix {

// Element type of the activations (x, weight, bias, out and their gradients).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Packed sequences: tokens [L, D]; cu_seqlens [n_seq + 1] int64; states [n_seq, D, W-1] float32.
int causal_conv1d_fwd(DType dtype, const void* x, const void* weight, const void* bias, const float* h0, void* out,
                      float* ht, const int64_t* cu_seqlens, int64_t n_seq, int64_t L, int64_t D, int W, bool silu,
                      void* stream);

// dz [L, D], dw_part [ceil(L / kConvTokens), W, D], db_part [ceil(L / kConvTokens), D] (or null),
// dh0 [n_seq, D, W-1] (or null) float32; dx [L, D] in dtype.
int causal_conv1d_bwd(DType dtype, const void* x, const void* weight, const void* bias, const float* h0,
                      const void* dout, const float* dht, float* dz, void* dx, float* dw_part, float* db_part,
                      float* dh0, const int64_t* cu_seqlens, int64_t n_seq, int64_t L, int64_t D, int W, bool silu,
                      void* stream);

// x, out [N, T, D]; state [N, D, W-1] float32, updated in place.
int causal_conv1d_update(DType dtype, const void* x, float* state, const void* weight, const void* bias, void* out,
                         int64_t N, int64_t T, int64_t D, int W, bool silu, void* stream);

// Tokens per block of the causal conv kernels (the rows of dw_part / db_part).
constexpr int kConvTokens = 32;

// LightConv / DynamicConv on packed sequences: x, out [L, C], C = H*R; weight [L, H, K] when
// per_token else [H, K] (logits when softmax); lse [L, H] float32. DropConnect keeps a tap when
// the hash of (seed_lo, its flat weight index) clears threshold (0: off); kept taps scale by scale.
struct DynamicConvArgs {
  DType dtype;
  const int64_t* cu_seqlens;
  int64_t n_seq, L, H, R, K, pad_left;
  bool per_token, softmax;
  uint32_t seed_lo, threshold;
  float scale;
};

int dynamic_conv_fwd(const DynamicConvArgs& a, const void* x, const void* weight, void* out, float* lse, void* stream);

// dx [L, C] in dtype; dlogits [L, H, K] float32: the gradient of each token's weight row (for
// LightConv the binding sums the rows). Both directions need K <= kMaxTaps.
int dynamic_conv_bwd(const DynamicConvArgs& a, const void* x, const void* weight, const float* lse, const void* dout,
                     void* dx, float* dlogits, void* stream);

// The largest K the kernels' shared memory takes (at most (kConvTokens + K - 1) * K floats in the
// forward and input gradient, kConvTokens * K + (2 * kConvTokens + K - 1) * 64 in the weight gradient).
constexpr int64_t kMaxTaps = 64;

}  // namespace seqmix
