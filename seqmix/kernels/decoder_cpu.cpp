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

// Where a layer step's tensor argument comes from at each call: its bound tensor, the block's normed input, or
// a state slot (k >= 0).
constexpr int64_t kBound = -1, kInput = -2;

// A layer step bound to its arguments, reading and writing state slots.
struct BoundStep {
  LayerStep step;
  StepArgs args;                  // the bound arguments; the input and the states filled in at each call
  std::vector<int64_t> sources;   // per tensor argument: kBound, kInput or a state slot
  std::vector<int64_t> outputs;   // per new state the step returns: its slot, or -1 where it is dropped

  // The step's output for `input` and the states in `states`; its new states go into their slots.
  at::Tensor operator()(const at::Tensor& input, std::vector<at::Tensor>& states) {
    for (size_t i = 0; i < sources.size(); ++i) {
      if (sources[i] == kInput) args.tensors[i] = input;
      else if (sources[i] >= 0) args.tensors[i] = states.at(sources[i]);
    }
    std::vector<at::Tensor> out = step(args);
    for (size_t i = 0; i < sources.size(); ++i)  // not kept alive until the next call
      if (sources[i] != kBound) args.tensors[i] = c10::nullopt;
    for (size_t i = 0; i < outputs.size(); ++i)
      if (outputs[i] >= 0) states.at(outputs[i]) = out.at(i + 1);
    return out.at(0);
  }
};

BoundStep bound_step(const std::string& op, std::vector<c10::optional<at::Tensor>> tensors,
                     std::vector<int64_t> sources, std::vector<double> numbers, std::vector<int64_t> integers,
                     std::vector<bool> flags, std::vector<int64_t> outputs, bool in_place) {
  const auto found = layer_steps().find(op);
  TORCH_CHECK(found != layer_steps().end(), "no C++ layer step registered for ", op);
  TORCH_CHECK(sources.size() == tensors.size(), "a layer step needs one source per tensor argument");
  return {found->second,
          {std::move(tensors), std::move(numbers), std::move(integers), std::move(flags), in_place},
          std::move(sources), std::move(outputs)};
}

struct Block {
  BoundStep mixer;
  at::Tensor mixer_norm, mlp_norm, gate_up, down;
  double mixer_eps, mlp_eps;
};

class Decoder {
 public:
  Decoder(at::Tensor embed, at::Tensor norm_weight, double eps)
      : embed_(embed.contiguous()), norm_weight_(std::move(norm_weight)), eps_(eps) {}

  // The decoder owns the states it is given (the LM's generate loop hands each token's back): steps may write
  // their new states over them.
  void add_block(const std::string& op, std::vector<c10::optional<at::Tensor>> tensors, std::vector<int64_t> sources,
                 std::vector<double> numbers, std::vector<int64_t> integers, std::vector<bool> flags,
                 std::vector<int64_t> outputs, at::Tensor mixer_norm, double mixer_eps, at::Tensor mlp_norm,
                 double mlp_eps, at::Tensor gate_up, at::Tensor down) {
    blocks_.push_back({bound_step(op, std::move(tensors), std::move(sources), std::move(numbers),
                                  std::move(integers), std::move(flags), std::move(outputs), true),
                       std::move(mixer_norm), std::move(mlp_norm), std::move(gate_up), std::move(down), mixer_eps,
                       mlp_eps});
  }

  // tokens [B, 1] int64 and the state slots; returns the logits [B, vocab] float32 and the new state slots.
  std::tuple<at::Tensor, std::vector<at::Tensor>> operator()(const at::Tensor& tokens, std::vector<at::Tensor> states) {
    at::Tensor x = embedded(tokens);
    for (Block& block : blocks_) {
      const at::Tensor y = block.mixer(row_norm(x, block.mixer_norm, c10::nullopt, block.mixer_eps, true), states);
      x = residual_swiglu_step(x, y, block.mlp_norm, block.mlp_eps, block.gate_up, block.down);
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

// The iterations of a recurrent-depth layer's core for one token (seqmix/archs/recurrent_depth.py's
// RecurrentDepth.cpu_decoding_step), its blocks added iteration by iteration: per iteration h = e + s W_s^T (the
// adapter's latent half W_s [hidden, hidden], through at::addmm as the layer's _adapt computes it), then each
// sandwich block h = sandwich_swiglu_step(h, step(rms_norm(h) * norm_in)); s, the last iteration's h. A token of
// the default core is 32 iterations of 4 blocks: from Python, three calls each.
class RecurrentCore {
 public:
  RecurrentCore(const at::Tensor& latent_weight, int64_t blocks_per_iteration)
      : latent_weight_t_(latent_weight.t()), per_iteration_(blocks_per_iteration) {
    TORCH_CHECK(blocks_per_iteration > 0, "RecurrentCore: blocks_per_iteration must be positive");
  }

  // The states are the caller's (a layer's step returns new ones, as mix does): no step writes over them.
  void add_block(const std::string& op, std::vector<c10::optional<at::Tensor>> tensors, std::vector<int64_t> sources,
                 std::vector<double> numbers, std::vector<int64_t> integers, std::vector<bool> flags,
                 std::vector<int64_t> outputs, at::Tensor norm_in, at::Tensor mixer_out, at::Tensor mlp_in,
                 at::Tensor mlp_out, double eps, at::Tensor gate_up, at::Tensor down) {
    blocks_.push_back({bound_step(op, std::move(tensors), std::move(sources), std::move(numbers),
                                  std::move(integers), std::move(flags), std::move(outputs), false),
                       std::move(norm_in), std::move(mixer_out), std::move(mlp_in), std::move(mlp_out),
                       std::move(gate_up), std::move(down), eps});
  }

  // s, e [B, hidden] (the start latent and the adapter's input half W_e x) and the state slots; returns s_r and the
  // slots with the new states.
  std::tuple<at::Tensor, std::vector<at::Tensor>> operator()(at::Tensor s, const at::Tensor& e,
                                                            std::vector<at::Tensor> states) {
    TORCH_CHECK(!blocks_.empty() && blocks_.size() % per_iteration_ == 0,
                "RecurrentCore: the blocks must be whole iterations of ", per_iteration_);
    for (size_t first = 0; first < blocks_.size(); first += per_iteration_) {
      at::Tensor h = at::addmm(e, s, latent_weight_t_);
      for (size_t j = first; j < first + per_iteration_; ++j) {
        SandwichBlock& b = blocks_[j];
        const at::Tensor y = b.mixer(row_norm(h, b.norm_in, c10::nullopt, b.eps, true), states);
        h = sandwich_swiglu_step(h, y, b.mixer_out, b.mlp_in, b.mlp_out, b.eps, b.gate_up, b.down);
      }
      s = h;
    }
    return {s, std::move(states)};
  }

 private:
  struct SandwichBlock {
    BoundStep mixer;
    at::Tensor norm_in, mixer_out, mlp_in, mlp_out, gate_up, down;
    double eps;
  };

  at::Tensor latent_weight_t_;
  size_t per_iteration_;
  std::vector<SandwichBlock> blocks_;
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
  using seqmix_cpu::RecurrentCore;
  pybind11::class_<RecurrentCore>(m, "RecurrentCore", "a recurrent-depth core's token (decoder_cpu.cpp)")
      .def(pybind11::init<const at::Tensor&, int64_t>())
      .def("add_block", &RecurrentCore::add_block)
      .def("__call__", &RecurrentCore::operator());
}
