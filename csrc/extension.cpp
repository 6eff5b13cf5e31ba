// seqmix._C: the CUDA kernels of seqmix, bound to Python.
//
// The conv family's kernels land here; until then the module only reports
// the architectures it was compiled for, so the Python side can refuse a GPU
// the binary carries no code for instead of failing inside a launch.
#include <torch/extension.h>

#include <string>

#ifndef SEQMIX_CUDA_ARCHS
#error "setup.py defines SEQMIX_CUDA_ARCHS (the TORCH_CUDA_ARCH_LIST this build targets)"
#endif

static std::string cuda_archs() { return SEQMIX_CUDA_ARCHS; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cuda_archs", &cuda_archs, "TORCH_CUDA_ARCH_LIST this extension was compiled for, e.g. \"9.0\"");
}
