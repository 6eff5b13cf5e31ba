// The parts of torch the C++ CPU kernels use: tensors, the dtype dispatch, at::parallel_for, the few ATen ops
// they call, and pybind11 with torch's tensor casters for each source's bind_<name>. Not <torch/extension.h>:
// it pulls in the whole C++ frontend (torch::nn, the optimizers, autograd), 49 s of parsing in every source
// against 15 s for these on a 2-core AMD EPYC (docs/design.md, "Eighth round").
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>
