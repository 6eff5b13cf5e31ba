// Binding of the conv family's CUDA kernels: takes tensors, checks them, allocates the outputs and
// launches through the plain C interface of conv_kernels.h. The caller passes the CUDA stream as an
// integer (torch.cuda.current_stream().cuda_stream), so this file needs no CUDA headers.
// Registered as torch.library ops in seqmix/kernels/conv/cuda.py.
#include <torch/extension.h>

#include <optional>
#include <tuple>

#include "conv_kernels.h"

namespace seqmix {
namespace {

DType dtype_of(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return kFloat32;
    case torch::kFloat16: return kFloat16;
    case torch::kBFloat16: return kBFloat16;
    default: TORCH_CHECK(false, "seqmix._C: unsupported dtype ", t.scalar_type(), " (float32, float16, bfloat16)");
  }
}

void check(const torch::Tensor& t, const char* name, const torch::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), "seqmix._C: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), "seqmix._C: ", name, " is on ", t.device(), ", x on ", like.device());
  TORCH_CHECK(t.is_contiguous(), "seqmix._C: ", name, " must be contiguous");
}

void check_same_dtype(const torch::Tensor& t, const char* name, const torch::Tensor& x) {
  check(t, name, x);
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "seqmix._C: ", name, " must have x's dtype ", x.scalar_type());
}

void check_float32(const torch::Tensor& t, const char* name, const torch::Tensor& x) {
  check(t, name, x);
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, "seqmix._C: ", name, " must be float32");
}

const int64_t* cu_ptr(const torch::Tensor& cu, const torch::Tensor& x) {
  check(cu, "cu_seqlens", x);
  TORCH_CHECK(cu.scalar_type() == torch::kInt64 && cu.dim() == 1 && cu.numel() >= 2,
              "seqmix._C: cu_seqlens must be int64 of shape [N+1]");
  return cu.data_ptr<int64_t>();
}

template <typename T>
T* opt_ptr(const std::optional<torch::Tensor>& t) {
  return t.has_value() ? static_cast<T*>(t->data_ptr()) : nullptr;
}

void check_launch(int status, const char* op) {
  TORCH_CHECK(status == 0, "seqmix._C: ", op, " failed to launch (cudaError ", status, ")");
}

void* as_stream(int64_t stream) { return reinterpret_cast<void*>(static_cast<intptr_t>(stream)); }

// x [L, D], weight [D, W], bias [D]?, h0 [N, D, W-1] float32?; returns (out, final state or empty).
std::tuple<torch::Tensor, torch::Tensor> run_causal_conv1d_fwd(torch::Tensor x, torch::Tensor weight,
                                                           std::optional<torch::Tensor> bias,
                                                           std::optional<torch::Tensor> h0, torch::Tensor cu_seqlens,
                                                           bool silu, bool store_final, int64_t stream) {
  check(x, "x", x);
  check_same_dtype(weight, "weight", x);
  if (bias) check_same_dtype(*bias, "bias", x);
  if (h0) check_float32(*h0, "initial_state", x);
  const int64_t L = x.size(0), D = x.size(1), W = weight.size(1), N = cu_seqlens.numel() - 1;
  auto out = torch::empty_like(x);
  auto f32 = x.options().dtype(torch::kFloat32);
  auto ht = store_final ? torch::empty({N, D, W - 1}, f32) : torch::empty({0}, f32);
  check_launch(seqmix::causal_conv1d_fwd(dtype_of(x), x.data_ptr(), weight.data_ptr(), opt_ptr<void>(bias),
                                         opt_ptr<float>(h0), out.data_ptr(), store_final ? ht.data_ptr<float>() : nullptr,
                                         cu_ptr(cu_seqlens, x), N, L, D, int(W), silu, as_stream(stream)),
               "causal_conv1d_fwd");
  return {out, ht};
}

// Returns (dx, dweight [D, W] float32, dbias [D] float32 or empty, dh0 float32 or empty).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor> run_causal_conv1d_bwd(
    torch::Tensor x, torch::Tensor weight, std::optional<torch::Tensor> bias, std::optional<torch::Tensor> h0,
    torch::Tensor cu_seqlens, bool silu, torch::Tensor dout, std::optional<torch::Tensor> dht, bool need_dh0,
    int64_t stream) {
  check(x, "x", x);
  check_same_dtype(weight, "weight", x);
  check_same_dtype(dout, "dout", x);
  if (bias) check_same_dtype(*bias, "bias", x);
  if (h0) check_float32(*h0, "initial_state", x);
  if (dht) check_float32(*dht, "dfinal_state", x);
  const int64_t L = x.size(0), D = x.size(1), W = weight.size(1), N = cu_seqlens.numel() - 1;
  const int64_t chunks = (L + kConvTokens - 1) / kConvTokens;
  auto f32 = x.options().dtype(torch::kFloat32);
  auto dz = torch::empty({L, D}, f32);
  auto dw_part = torch::empty({chunks, W, D}, f32);
  auto db_part = bias ? torch::empty({chunks, D}, f32) : torch::empty({0}, f32);
  auto dh0 = need_dh0 ? torch::empty({N, D, W - 1}, f32) : torch::empty({0}, f32);
  auto dx = torch::empty_like(x);
  check_launch(seqmix::causal_conv1d_bwd(dtype_of(x), x.data_ptr(), weight.data_ptr(), opt_ptr<void>(bias),
                                         opt_ptr<float>(h0), dout.data_ptr(), opt_ptr<float>(dht), dz.data_ptr<float>(),
                                         dx.data_ptr(), dw_part.data_ptr<float>(),
                                         bias ? db_part.data_ptr<float>() : nullptr,
                                         need_dh0 ? dh0.data_ptr<float>() : nullptr, cu_ptr(cu_seqlens, x), N, L, D,
                                         int(W), silu, as_stream(stream)),
               "causal_conv1d_bwd");
  return {dx, dw_part.sum(0).t().contiguous(), bias ? db_part.sum(0) : db_part, dh0};
}

// x [N, T, D]; state [N, D, W-1] float32, updated in place. Returns out [N, T, D].
torch::Tensor run_causal_conv1d_update(torch::Tensor x, torch::Tensor state, torch::Tensor weight,
                                   std::optional<torch::Tensor> bias, bool silu, int64_t stream) {
  check(x, "x", x);
  check_float32(state, "conv_state", x);
  check_same_dtype(weight, "weight", x);
  if (bias) check_same_dtype(*bias, "bias", x);
  auto out = torch::empty_like(x);
  check_launch(seqmix::causal_conv1d_update(dtype_of(x), x.data_ptr(), state.data_ptr<float>(), weight.data_ptr(),
                                            opt_ptr<void>(bias), out.data_ptr(), x.size(0), x.size(1), x.size(2),
                                            int(weight.size(1)), silu, as_stream(stream)),
               "causal_conv1d_update");
  return out;
}

DynamicConvArgs dynamic_args(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& cu_seqlens,
                             int64_t heads, int64_t pad_left, bool softmax, int64_t seed_lo, int64_t threshold,
                             double scale) {
  check(x, "x", x);
  check_same_dtype(weight, "weight", x);
  TORCH_CHECK(x.dim() == 2 && heads > 0 && x.size(1) % heads == 0, "seqmix._C: x must be [L, H*R]");
  const bool per_token = weight.dim() == 3;
  TORCH_CHECK(weight.size(-2) == heads && (!per_token || weight.size(0) == x.size(0)),
              "seqmix._C: weight must be [L, H, K] or [H, K]");
  TORCH_CHECK(weight.size(-1) <= kMaxTaps, "seqmix._C: dynamic_conv takes K <= ", kMaxTaps);
  DynamicConvArgs a;
  a.dtype = dtype_of(x);
  a.cu_seqlens = cu_ptr(cu_seqlens, x);
  a.n_seq = cu_seqlens.numel() - 1;
  a.L = x.size(0);
  a.H = heads;
  a.R = x.size(1) / heads;
  a.K = weight.size(-1);
  a.pad_left = pad_left;
  a.per_token = per_token;
  a.softmax = softmax;
  a.seed_lo = uint32_t(seed_lo);
  a.threshold = uint32_t(threshold);
  a.scale = float(scale);
  return a;
}

// Returns (out [L, C], lse [L, H] float32 or empty).
std::tuple<torch::Tensor, torch::Tensor> run_dynamic_conv_fwd(torch::Tensor x, torch::Tensor weight,
                                                          torch::Tensor cu_seqlens, int64_t heads, int64_t pad_left,
                                                          bool softmax, int64_t seed_lo, int64_t threshold,
                                                          double scale, int64_t stream) {
  auto a = dynamic_args(x, weight, cu_seqlens, heads, pad_left, softmax, seed_lo, threshold, scale);
  auto out = torch::empty_like(x);
  auto lse = torch::empty({softmax ? a.L : 0, heads}, x.options().dtype(torch::kFloat32));
  check_launch(seqmix::dynamic_conv_fwd(a, x.data_ptr(), weight.data_ptr(), out.data_ptr(), lse.data_ptr<float>(),
                                        as_stream(stream)),
               "dynamic_conv_fwd");
  return {out, lse};
}

// Returns (dx [L, C], dweight in weight's shape and dtype).
std::tuple<torch::Tensor, torch::Tensor> run_dynamic_conv_bwd(torch::Tensor x, torch::Tensor weight, torch::Tensor lse,
                                                          torch::Tensor dout, torch::Tensor cu_seqlens, int64_t heads,
                                                          int64_t pad_left, bool softmax, int64_t seed_lo,
                                                          int64_t threshold, double scale, int64_t stream) {
  auto a = dynamic_args(x, weight, cu_seqlens, heads, pad_left, softmax, seed_lo, threshold, scale);
  check_same_dtype(dout, "dout", x);
  if (softmax) check_float32(lse, "lse", x);
  auto dx = torch::empty_like(x);
  auto dlogits = torch::empty({a.L, a.H, a.K}, x.options().dtype(torch::kFloat32));
  check_launch(seqmix::dynamic_conv_bwd(a, x.data_ptr(), weight.data_ptr(), softmax ? lse.data_ptr<float>() : nullptr,
                                        dout.data_ptr(), dx.data_ptr(), dlogits.data_ptr<float>(), as_stream(stream)),
               "dynamic_conv_bwd");
  auto dweight = a.per_token ? dlogits : dlogits.sum(0);
  return {dx, dweight.to(weight.scalar_type())};
}

}  // namespace

void bind_conv(pybind11::module_& m) {
  m.def("causal_conv1d_fwd", &run_causal_conv1d_fwd);
  m.def("causal_conv1d_bwd", &run_causal_conv1d_bwd);
  m.def("causal_conv1d_update", &run_causal_conv1d_update);
  m.def("dynamic_conv_fwd", &run_dynamic_conv_fwd);
  m.def("dynamic_conv_bwd", &run_dynamic_conv_bwd);
}

}  // namespace seqmix
