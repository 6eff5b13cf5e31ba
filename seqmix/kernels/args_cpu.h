// The tensor arguments of the C++ CPU kernels' entry points (seqmix/kernels/cpu.py builds them), written once:
// optional tensors as tensors and data pointers (absent: undefined or empty), and the checks of the inputs
// and of the packed sequences' offsets.
#pragma once

#include "torch_cpu.h"

#include <vector>

namespace seqmix_cpu {

// The dtype the kernels compute in for inputs like `like`: float64 for float64, else float32.
inline at::ScalarType compute_dtype(const at::Tensor& like) {
  return like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline at::Tensor opt_or_empty(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

template <typename T>
T* data_or_null(const c10::optional<at::Tensor>& t) {
  return data_or_null<T>(opt_or_empty(t));
}

// Every present tensor on the CPU and contiguous, and with `like` in like's dtype (`like_name` in the message).
inline void check_tensors(const char* kernel, const std::vector<at::Tensor>& tensors, const at::Tensor* like = nullptr,
                          const char* like_name = "") {
  for (const auto& t : tensors) {
    if (!t.defined() || t.numel() == 0) continue;
    TORCH_CHECK(t.device().is_cpu(), kernel, ": tensors must be on the CPU");
    TORCH_CHECK(t.is_contiguous(), kernel, ": tensors must be contiguous");
    TORCH_CHECK(!like || t.scalar_type() == like->scalar_type(), kernel, ": tensors must all be in ", like_name,
                "'s dtype");
  }
}

// The packed sequences' boundaries [Nseq + 1] and first chunks [Nseq + 1]: int64 and contiguous.
inline void check_offsets(const char* kernel, const at::Tensor& cu_seqlens, const at::Tensor& chunk_offsets) {
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kLong && chunk_offsets.scalar_type() == at::kLong, kernel,
              ": cu_seqlens and chunk_offsets must be int64");
  TORCH_CHECK(cu_seqlens.is_contiguous() && chunk_offsets.is_contiguous(), kernel,
              ": cu_seqlens and chunk_offsets must be contiguous");
}

}  // namespace seqmix_cpu
