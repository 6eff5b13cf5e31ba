// seqmix._C: the CUDA kernels of seqmix, bound to Python.
//
// The module reports the compute capabilities it was compiled for, so the
// Python side can refuse a GPU the binary carries no code for instead of
// failing inside a launch, and binds each family's kernels (bind_conv: the
// conv family, csrc/conv_binding.cpp).
#include <torch/extension.h>

#include <vector>

#ifndef SEQMIX_CUDA_ARCHS
#error "setup.py defines SEQMIX_CUDA_ARCHS, the compute capabilities this build targets (e.g. 90 or 80,90)"
#endif

static std::vector<int64_t> cuda_archs() { return {SEQMIX_CUDA_ARCHS}; }

namespace seqmix {
void bind_conv(pybind11::module_& m);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cuda_archs", &cuda_archs, "compute capabilities this extension was compiled for, e.g. [90]");
  seqmix::bind_conv(m);
}
