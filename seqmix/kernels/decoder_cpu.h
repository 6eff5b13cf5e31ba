// The decoding programs (decoder_cpu.cpp): an LM's whole token in one C++ call (the embedding's rows, each block's
// RMSNorm, mixer step (a layer's, or an hourglass layer's token) and residual SwiGLU MLP, the final norm and the
// head), a recurrent-depth layer's core
// iterations for one token (its adaptive exit too), and an hourglass layer's token. The layers' one-token steps (the
// Mamba-2, Mamba, (Gated) DeltaNet, GLA, attention and conv layers' *_step functions) register themselves here under
// their torch.library op's name, each as a function of its arguments gathered by type (StepArgs), so that a program
// built from Python (seqmix/kernels/step_cpu.py, LayerCall) calls them with the arguments their Python ops take.
#pragma once

#include "torch_cpu.h"

#include <vector>

namespace seqmix_cpu {

// A layer step's arguments, each kind in the order of the step function's parameters: tensors (absent optional
// ones empty), floats, integers and flags; `in_place`: the caller owns the state tensors given, so a step may write
// its new state over them (the decoder's calls; a layer op called from Python returns new ones).
struct StepArgs {
  std::vector<c10::optional<at::Tensor>> tensors;
  std::vector<double> numbers;
  std::vector<int64_t> integers;
  std::vector<bool> flags;
  bool in_place = false;
  const at::Tensor& t(size_t i) const { return *tensors[i]; }
};

// A layer step: its output [B, hidden] and then its new state tensors, in the order of its Python op's outputs.
using LayerStep = std::vector<at::Tensor> (*)(const StepArgs&);

// Makes `step` the decoder's step for layers whose LayerCall names `op` (a torch.library op's name).
void register_layer_step(const char* op, LayerStep step);

// The parts around the layers: an LM block's, a recurrent-depth core block's (mlp_step_cpu.cpp), the head's
// (row_norm_cpu.cpp).
at::Tensor residual_swiglu_step(const at::Tensor& x, const at::Tensor& y, const at::Tensor& norm_weight, double eps,
                                const at::Tensor& gate_up, const at::Tensor& down);
at::Tensor rms_norm_times_weight(const at::Tensor& x, const at::Tensor& norm_weight, double eps,
                                 const at::Tensor& weight);
at::Tensor sandwich_swiglu_step(const at::Tensor& s, const at::Tensor& y, const at::Tensor& mixer_out_weight,
                                const at::Tensor& mlp_in_weight, const at::Tensor& mlp_out_weight, double eps,
                                const at::Tensor& gate_up, const at::Tensor& down);

}  // namespace seqmix_cpu
