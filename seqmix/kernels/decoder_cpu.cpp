// A whole decoding token of an LM in one C++ call (see decoder_cpu.h): seqmix/archs/lm.py's
// LanguageModel._cpu_decoder builds a Decoder from its blocks' bound steps when every block is an RMSNorm, a
// layer whose step is one registered C++ call, and the residual SwiGLU MLP. A token's Python then is one call
// instead of three per block, each of which converted a dozen arguments (docs/design.md, "Twenty-third round").
#include "decoder_cpu.h"

#include <cstring>
#include <map>
#include <string>
#include <tuple>

#include "row_norm_cpu.h"

namespace seqmix_cpu {

namespace {

std::map<std::string, LayerStep>& layer_steps() {
  static std::map<std::string, LayerStep> steps;
  return steps;
}

// Where a layer step's tensor argument comes from at each token: its bound tensor, the block's normed input, or
// a state slot (k >= 0).
constexpr int64_t kBound = -1, kInput = -2;

struct Block {
  LayerStep step;
  StepArgs args;                  // the bound arguments; the input and the states filled in at each token
  std::vector<int64_t> sources;   // per tensor argument: kBound, kInput or a state slot
  std::vector<int64_t> outputs;   // per new state the step returns: its slot, or -1 where it is dropped
  at::Tensor mixer_norm, mlp_norm, gate_up, down;
  double mixer_eps, mlp_eps;
};

class Decoder {
 public:
  Decoder(at::Tensor embed, at::Tensor norm_weight, double eps)
      : embed_(embed.contiguous()), norm_weight_(std::move(norm_weight)), eps_(eps) {}

  void add_block(const std::string& op, std::vector<c10::optional<at::Tensor>> tensors, std::vector<int64_t> sources,
                 std::vector<double> numbers, std::vector<int64_t> integers, std::vector<bool> flags,
                 std::vector<int64_t> outputs, at::Tensor mixer_norm, double mixer_eps, at::Tensor mlp_norm,
                 double mlp_eps, at::Tensor gate_up, at::Tensor down) {
    const auto found = layer_steps().find(op);
    TORCH_CHECK(found != layer_steps().end(), "Decoder: no C++ layer step registered for ", op);
    TORCH_CHECK(sources.size() == tensors.size(), "Decoder: one source per tensor argument");
    blocks_.push_back({found->second,
                       {std::move(tensors), std::move(numbers), std::move(integers), std::move(flags), true},
                       std::move(sources), std::move(outputs), std::move(mixer_norm), std::move(mlp_norm),
                       std::move(gate_up), std::move(down), mixer_eps, mlp_eps});
  }

  // tokens [B, 1] int64 and the state slots; returns the logits [B, vocab] float32 and the new state slots.
  std::tuple<at::Tensor, std::vector<at::Tensor>> operator()(const at::Tensor& tokens, std::vector<at::Tensor> states) {
    at::Tensor x = embedded(tokens);
    for (Block& block : blocks_) {
      const at::Tensor h = row_norm(x, block.mixer_norm, c10::nullopt, block.mixer_eps, true);
      StepArgs& args = block.args;
      for (size_t i = 0; i < block.sources.size(); ++i) {
        const int64_t source = block.sources[i];
        if (source == kInput) args.tensors[i] = h;
        else if (source >= 0) args.tensors[i] = states.at(source);
      }
      std::vector<at::Tensor> out = block.step(args);
      for (size_t i = 0; i < block.sources.size(); ++i)  // not kept alive until the next token
        if (block.sources[i] != kBound) args.tensors[i] = c10::nullopt;
      for (size_t i = 0; i < block.outputs.size(); ++i)
        if (block.outputs[i] >= 0) states.at(block.outputs[i]) = out.at(i + 1);
      x = residual_swiglu_step(x, out[0], block.mlp_norm, block.mlp_eps, block.gate_up, block.down);
    }
    at::Tensor logits = rms_norm_times_weight(x, norm_weight_, eps_, embed_);
    return {logits.scalar_type() == at::kFloat ? logits : logits.to(at::kFloat), std::move(states)};
  }

 private:
  // The embedding's rows (embed_ is contiguous) of tokens [B, 1] (int64, each in [0, V)): [B, D], copied by hand
  // (index_select's set-up costs more than copying a few rows).
  at::Tensor embedded(const at::Tensor& tokens) const {
    TORCH_CHECK(tokens.device().is_cpu() && tokens.scalar_type() == at::kLong && tokens.is_contiguous(),
                "Decoder: tokens must be a contiguous int64 CPU tensor");
    const int64_t B = tokens.numel(), V = embed_.size(0), D = embed_.size(1);
    at::Tensor x = at::empty({B, D}, embed_.options());
    const int64_t* ids = tokens.data_ptr<int64_t>();
    const size_t row_bytes = D * embed_.element_size();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(ids[b] >= 0 && ids[b] < V, "Decoder: token ", ids[b], " is not in [0, ", V, ")");
      std::memcpy(static_cast<char*>(x.data_ptr()) + b * row_bytes,
                  static_cast<const char*>(embed_.data_ptr()) + ids[b] * row_bytes, row_bytes);
    }
    return x;
  }

  at::Tensor embed_, norm_weight_;
  double eps_;
  std::vector<Block> blocks_;
};

}  // namespace

void register_layer_step(const char* op, LayerStep step) { layer_steps()[op] = step; }

}  // namespace seqmix_cpu

void bind_decoder(pybind11::module& m) {
  using seqmix_cpu::Decoder;
  pybind11::class_<Decoder>(m, "Decoder", "an LM's decoding token in one call (decoder_cpu.h)")
      .def(pybind11::init<at::Tensor, at::Tensor, double>())
      .def("add_block", &Decoder::add_block)
      .def("__call__", &Decoder::operator());
}
