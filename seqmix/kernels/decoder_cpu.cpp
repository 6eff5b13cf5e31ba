// The decoding programs (see decoder_cpu.h): a whole LM token in one C++ call, which seqmix/archs/lm.py's
// LanguageModel._cpu_decoder builds from its blocks' bound steps when every block is an RMSNorm, a layer whose step
// is one registered C++ call or an hourglass layer's program, and the residual SwiGLU MLP; a recurrent-depth
// layer's core iterations; an hourglass layer's token. A token's Python then is one call instead of three per
// block, each of which converted a dozen arguments (docs/design.md, "Twenty-third round" to "Twenty-fifth round").
#include "decoder_cpu.h"

#include <ATen/ops/bitwise_and.h>
#include <ATen/ops/bitwise_not.h>
#include <ATen/ops/bitwise_or.h>
#include <ATen/ops/clamp.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/cosine_similarity.h>
#include <ATen/ops/div.h>
#include <ATen/ops/eq.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/full.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/gt.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/log_softmax.h>
#include <ATen/ops/lt.h>
#include <ATen/ops/masked_fill.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/rsub.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
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

  // The step's output for `input` and the states in `states`; its new states go into their slots of `written`
  // (`states` itself, or where the caller keeps them apart).
  at::Tensor operator()(const at::Tensor& input, const std::vector<at::Tensor>& states,
                        std::vector<at::Tensor>& written) {
    for (size_t i = 0; i < sources.size(); ++i) {
      if (sources[i] == kInput) args.tensors[i] = input;
      else if (sources[i] >= 0) args.tensors[i] = states.at(sources[i]);
    }
    std::vector<at::Tensor> out = step(args);
    for (size_t i = 0; i < sources.size(); ++i)  // not kept alive until the next call
      if (sources[i] != kBound) args.tensors[i] = c10::nullopt;
    for (size_t i = 0; i < outputs.size(); ++i)
      if (outputs[i] >= 0) written.at(outputs[i]) = out.at(i + 1);
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

// What an LM block's mixer is to a program: a function of the block's normed input, the program's state slots
// (written where it leaves new states) and the token ids [B] (nothing where the program has none): a layer
// step bound to its arguments, or an hourglass layer's token.
using BlockMixer = std::function<at::Tensor(const at::Tensor&, std::vector<at::Tensor>&,
                                            const c10::optional<at::Tensor>&)>;

// An LM block (seqmix/archs/lm.py's Block): x + mixer(rms_norm(x) * mixer_norm), then the residual SwiGLU MLP.
struct Block {
  BlockMixer mixer;
  at::Tensor mixer_norm, mlp_norm, gate_up, down;
  double mixer_eps, mlp_eps;

  at::Tensor operator()(const at::Tensor& x, std::vector<at::Tensor>& states,
                        const c10::optional<at::Tensor>& tokens) {
    const at::Tensor y = mixer(row_norm(x, mixer_norm, c10::nullopt, mixer_eps, true), states, tokens);
    return residual_swiglu_step(x, y, mlp_norm, mlp_eps, gate_up, down);
  }
};

// The LM blocks a program runs (the decoder's, an hourglass's inner ones), added from Python (step_cpu._add_block):
// a LayerCall's op and arguments, the slots of its states, and the block's norms and MLP.
class LmBlocks {
 public:
  void add_block(const std::string& op, std::vector<c10::optional<at::Tensor>> tensors, std::vector<int64_t> sources,
                 std::vector<double> numbers, std::vector<int64_t> integers, std::vector<bool> flags,
                 std::vector<int64_t> outputs, at::Tensor mixer_norm, double mixer_eps, at::Tensor mlp_norm,
                 double mlp_eps, at::Tensor gate_up, at::Tensor down) {
    BoundStep step = bound_step(op, std::move(tensors), std::move(sources), std::move(numbers), std::move(integers),
                                std::move(flags), std::move(outputs), in_place_);
    BlockMixer mixer = [step](const at::Tensor& input, std::vector<at::Tensor>& states,
                              const c10::optional<at::Tensor>&) mutable { return step(input, states, states); };
    add(std::move(mixer), std::move(mixer_norm), mixer_eps, std::move(mlp_norm), mlp_eps, std::move(gate_up),
        std::move(down));
  }

 protected:
  // `in_place`: the program owns the states it is given, so steps may write their new states over them (StepArgs).
  explicit LmBlocks(bool in_place) : in_place_(in_place) {}

  void add(BlockMixer mixer, at::Tensor mixer_norm, double mixer_eps, at::Tensor mlp_norm, double mlp_eps,
           at::Tensor gate_up, at::Tensor down) {
    blocks_.push_back({std::move(mixer), std::move(mixer_norm), std::move(mlp_norm), std::move(gate_up),
                       std::move(down), mixer_eps, mlp_eps});
  }

  std::vector<Block> blocks_;

 private:
  bool in_place_;
};

// The iterations of a recurrent-depth layer's core for one token (seqmix/archs/recurrent_depth.py's
// RecurrentDepth.cpu_decoding_step), its blocks added iteration by iteration: per iteration h = e + s W_s^T (the
// adapter's latent half W_s [hidden, hidden], through at::addmm as the layer's _adapt computes it), then each
// sandwich block h = sandwich_swiglu_step(h, step(rms_norm(h) * norm_in)); s, the last iteration's h. A token of
// the default core is 32 iterations of 4 blocks: from Python, three calls each. With `keep_last` (the bounded
// state) every iteration reads the states given and the last iteration run leaves the new ones.
// With the adaptive exit (set_exit; RecurrentDepth._exit, the KL criterion) a row whose latent has exited keeps
// it: after each iteration s = where(done, s, h); its predictions log_softmax(readout(s)) (the LM's final norm and
// head: rms_norm_times_weight) against the previous iteration's give KL(p_i || p_{i-1}), and a row exits at
// iteration i + 1 once that falls below the threshold. With `keep_last` the iterations stop when every row has
// exited, as the layer's do.
class RecurrentCore {
 public:
  RecurrentCore(const at::Tensor& latent_weight, int64_t blocks_per_iteration, bool keep_last)
      : latent_weight_t_(latent_weight.t()), per_iteration_(blocks_per_iteration), keep_last_(keep_last) {
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

  // The adaptive exit at KL below `threshold`, the readout's RMSNorm (norm_weight, eps) and head [V, hidden].
  void set_exit(double threshold, at::Tensor norm_weight, double eps, at::Tensor head) {
    TORCH_CHECK(threshold >= 0, "RecurrentCore: the exit threshold must be >= 0");
    exit_ = Exit{threshold, std::move(norm_weight), eps, std::move(head)};
  }

  // s, e [B, hidden] (the start latent and the adapter's input half W_e x) and the state slots; returns s_r, the
  // slots with the new states, and with the exit each row's iterations [B] int64.
  std::tuple<at::Tensor, std::vector<at::Tensor>, c10::optional<at::Tensor>> operator()(
      at::Tensor s, const at::Tensor& e, std::vector<at::Tensor> states) {
    TORCH_CHECK(!blocks_.empty() && blocks_.size() % per_iteration_ == 0,
                "RecurrentCore: the blocks must be whole iterations of ", per_iteration_);
    const int64_t r = blocks_.size() / per_iteration_;
    std::vector<at::Tensor> kept = keep_last_ ? states : std::vector<at::Tensor>();
    std::vector<at::Tensor>& written = keep_last_ ? kept : states;
    at::Tensor done, steps, prev;
    if (exit_) {
      done = at::zeros({s.size(0)}, s.options().dtype(at::kBool));
      steps = at::full({s.size(0)}, r, s.options().dtype(at::kLong));
    }
    for (int64_t i = 0; i < r; ++i) {
      at::Tensor h = at::addmm(e, s, latent_weight_t_);
      for (size_t j = i * per_iteration_; j < (i + 1) * per_iteration_; ++j) {
        SandwichBlock& b = blocks_[j];
        const at::Tensor y = b.mixer(row_norm(h, b.norm_in, c10::nullopt, b.eps, true), states, written);
        h = sandwich_swiglu_step(h, y, b.mixer_out, b.mlp_in, b.mlp_out, b.eps, b.gate_up, b.down);
      }
      if (exit_) h = exited(i, s, h, prev, done, steps);
      s = h;
      if (exit_ && keep_last_ && i < r - 1 && done.all().item<bool>()) break;
    }
    if (keep_last_) states = std::move(kept);
    return {s, std::move(states), exit_ ? c10::optional<at::Tensor>(steps) : c10::nullopt};
  }

 private:
  struct SandwichBlock {
    BoundStep mixer;
    at::Tensor norm_in, mixer_out, mlp_in, mlp_out, gate_up, down;
    double eps;
  };

  struct Exit {
    double threshold;
    at::Tensor norm_weight;
    double eps;
    at::Tensor head;
  };

  // Iteration i's latent h with the exited rows' kept from s; their exits recorded (done, steps; prev, the log
  // predictions, updated), in RecurrentDepth._exit's tensor ops.
  at::Tensor exited(int64_t i, const at::Tensor& s, const at::Tensor& h, at::Tensor& prev, at::Tensor& done,
                    at::Tensor& steps) const {
    const at::Tensor next = at::where(done.unsqueeze(-1), s, h);
    const at::Tensor logits = rms_norm_times_weight(next, exit_->norm_weight, exit_->eps, exit_->head);
    const at::Tensor cur = at::log_softmax(logits.to(at::kFloat), -1);
    if (i > 0) {
      const at::Tensor kl = at::clamp_min(at::sum(at::mul(at::exp(cur), at::sub(cur, prev)), -1), 0);
      const at::Tensor newly = at::bitwise_and(at::bitwise_not(done), at::lt(kl, exit_->threshold));
      steps.masked_fill_(newly, i + 1);
      done.bitwise_or_(newly);
    }
    prev = cur;
    return next;
  }

  at::Tensor latent_weight_t_;
  size_t per_iteration_;
  bool keep_last_;
  c10::optional<Exit> exit_;
  std::vector<SandwichBlock> blocks_;
};

// An hourglass layer's decoding token (seqmix/archs/hourglass.py), x [B, D], with its tensor ops as the layer's
// Python step computes them (the products at::linear's, F.linear's at a decoding step's rows), so the two agree
// bit for bit. Where only some of a batch's tokens are boundaries, the inner blocks run on every row and the
// others keep their inner states (keep_rows).
// - pooling (Hourglass._pooling_step: the gumbel and entropy modes' predictor, every stride-th position, or the
//   whitespace mode's closing token ids, given with each call): the open segment's float32 sum and count take the
//   token; where a token closes its segment, the segment's mean through down_norm, the inner blocks and up_norm
//   is the float32 row it and its sequence's next tokens read (`last`).
//   States: position [B] int64, last, sum [B, D] and count [B] float32, then the inner blocks' slots.
// - hnet (Hourglass._hnet_step): p = (1 - cos(W_q prev, W_k x)) / 2 (1 at a sequence's first token); where a
//   token is a boundary (p > 0.5) it runs through the inner blocks and up_norm into its EMA, e = p z + (1 - p) e;
//   the output is e times a straight-through 1 plus W_r x. States: position, prev and ema [B, D] float32, then the
//   inner blocks' slots.
class HourglassStep : public LmBlocks {
 public:
  using Token = std::tuple<at::Tensor, std::vector<at::Tensor>>;  // the layer's output and its new states

  static HourglassStep pooling(c10::optional<at::Tensor> hidden_weight, c10::optional<at::Tensor> hidden_bias,
                               c10::optional<at::Tensor> logit_weight, c10::optional<at::Tensor> logit_bias,
                               int64_t stride, std::vector<int64_t> closers, at::Tensor down_norm, double down_eps,
                               at::Tensor up_norm, double up_eps) {
    const bool predicts = hidden_weight.has_value() && logit_weight.has_value();
    TORCH_CHECK(predicts + (stride > 0) + !closers.empty() == 1,
                "HourglassStep.pooling: one of the predictor's weights, a positive stride or the closing tokens");
    HourglassStep step(false, std::move(up_norm), up_eps);
    step.weights_ = {std::move(hidden_weight), std::move(hidden_bias), std::move(logit_weight),
                     std::move(logit_bias)};
    step.stride_ = stride;
    step.closers_ = std::move(closers);
    step.down_norm_ = std::move(down_norm);
    step.down_eps_ = down_eps;
    return step;
  }

  static HourglassStep hnet(at::Tensor q_weight, at::Tensor k_weight, at::Tensor residual_weight, at::Tensor up_norm,
                            double up_eps) {
    HourglassStep step(true, std::move(up_norm), up_eps);
    step.weights_ = {std::move(q_weight), std::move(k_weight), std::move(residual_weight)};
    return step;
  }

  // x [B, D], the states (see above) and, for closing token ids, the tokens [B] int64; the output [B, D] in x's
  // dtype and the new states.
  Token operator()(const at::Tensor& x, std::vector<at::Tensor> states, const c10::optional<at::Tensor>& tokens) {
    const size_t own = hnet_ ? 3 : 4;
    const int64_t B = x.dim() == 2 ? x.size(0) : -1;
    TORCH_CHECK(B >= 0 && states.size() >= own, "HourglassStep: x [B, D] and the layer's states");
    TORCH_CHECK(states[0].scalar_type() == at::kLong && states[0].dim() == 1 && states[0].size(0) == B,
                "HourglassStep: state['position'] must be int64 [B]");
    TORCH_CHECK(closers_.empty() || (tokens && tokens->scalar_type() == at::kLong && tokens->numel() == B),
                "HourglassStep: the whitespace boundaries need the tokens [B] int64");
    return hnet_ ? hnet_token(x, std::move(states)) : pooling_token(x, std::move(states), tokens);
  }

 private:
  // The states are the caller's (the layer's step returns new ones): no step writes over them.
  HourglassStep(bool hnet, at::Tensor up_norm, double up_eps)
      : LmBlocks(false), hnet_(hnet), up_norm_(std::move(up_norm)), up_eps_(up_eps) {}

  // The inner blocks on h [B, D], then up_norm, in float32.
  at::Tensor inner(at::Tensor h, std::vector<at::Tensor>& states) {
    for (Block& block : blocks_) h = block(h, states, c10::nullopt);
    return row_norm(h, up_norm_, c10::nullopt, up_eps_, true).to(at::kFloat);
  }

  // The slots from `first` on (the inner blocks') of `ran` in the rows where `rows` [B] (bool) is set and of
  // `old` elsewhere, as hourglass.py's _rows_where: a tensor written in place (the same in both) stays as it is.
  static void keep_rows(const at::Tensor& rows, std::vector<at::Tensor>& ran, const std::vector<at::Tensor>& old,
                        size_t first) {
    for (size_t k = first; k < ran.size(); ++k) {
      if (ran[k].is_same(old[k])) continue;
      std::vector<int64_t> shape(ran[k].dim(), 1);
      shape[0] = -1;
      ran[k] = at::where(rows.view(shape), ran[k], old[k]);
    }
  }

  Token pooling_token(const at::Tensor& x, std::vector<at::Tensor> states, const c10::optional<at::Tensor>& tokens) {
    const at::Tensor closes = closing(x, states[0], tokens);
    const at::Tensor total = at::add(states[2], x.to(at::kFloat)), count = at::add(states[3], 1);
    states[0] = at::add(states[0], 1);
    states[2] = total;
    states[3] = count;
    if (closes.any().item<bool>()) {  // the inner blocks run only when a segment closes
      const std::vector<at::Tensor> old = states;
      const at::Tensor mean = at::div(total, count.unsqueeze(1)).to(x.scalar_type());
      const at::Tensor last = inner(row_norm(mean, down_norm_, c10::nullopt, down_eps_, true), states);
      if (closes.all().item<bool>()) {
        states[1] = last;
        states[2] = at::zeros_like(total);
        states[3] = at::zeros_like(count);
      } else {  // the rows whose tokens do not close keep their inner states
        keep_rows(closes, states, old, 4);
        const at::Tensor rows = closes.unsqueeze(1);
        states[1] = at::where(rows, last, old[1]);
        states[2] = at::where(rows, at::zeros_like(total), total);
        states[3] = at::where(closes, at::zeros_like(count), count);
      }
    }
    return std::make_tuple(states[1].to(x.scalar_type()), std::move(states));
  }

  // Whether each row's token closes its segment, [B] bool: the predictor's logit above 0, a stride-th position,
  // or one of the closing token ids.
  at::Tensor closing(const at::Tensor& x, const at::Tensor& position, const c10::optional<at::Tensor>& tokens) const {
    const int64_t B = x.size(0);
    if (closers_.empty() && stride_ == 0) {
      const at::Tensor hidden = at::gelu(at::linear(x, *weights_[0], weights_[1]));
      return at::gt(at::linear(hidden, *weights_[2], weights_[3]).to(at::kFloat).view({B}), 0);
    }
    at::Tensor closes = at::empty({B}, position.options().dtype(at::kBool));
    const at::Tensor ids = closers_.empty() ? position.contiguous() : tokens->contiguous();
    for (int64_t b = 0; b < B; ++b) {
      const int64_t id = ids.data_ptr<int64_t>()[b];
      closes.data_ptr<bool>()[b] = closers_.empty() ? (id + 1) % stride_ == 0
                                                    : std::find(closers_.begin(), closers_.end(), id) != closers_.end();
    }
    return closes;
  }

  Token hnet_token(const at::Tensor& x, std::vector<at::Tensor> states) {
    const at::Tensor q = at::linear(states[1].to(x.scalar_type()), *weights_[0]).to(at::kFloat);
    const at::Tensor cos = at::cosine_similarity(q, at::linear(x, *weights_[1]).to(at::kFloat), -1);
    const at::Tensor p = at::where(at::eq(states[0], 0), at::ones_like(cos),
                                   at::clamp(at::div(at::rsub(cos, 1), 2), 0.0, 1.0)).contiguous();
    const at::Tensor hard = at::gt(p, 0.5);
    at::Tensor ema = states[2];
    if (hard.any().item<bool>()) {  // the inner blocks run only at a boundary
      const std::vector<at::Tensor> old = states;
      const at::Tensor pc = at::clamp(p, 1e-4, 1 - 1e-4).unsqueeze(1);
      const at::Tensor moved = at::add(at::mul(pc, inner(x, states)), at::mul(at::rsub(pc, 1), ema));
      if (hard.all().item<bool>()) {
        ema = moved;
      } else {  // the rows of other tokens keep their EMA and inner states
        keep_rows(hard, states, old, 3);
        ema = at::where(hard.unsqueeze(1), moved, ema);
      }
    }
    const at::Tensor selected = at::where(hard, p, at::rsub(p, 1));
    const at::Tensor one = at::add(at::sub(selected, selected), 1.0);  // the straight-through 1 (its NaNs too)
    at::Tensor out = at::add(at::mul(ema.to(x.scalar_type()), one.unsqueeze(1).to(x.scalar_type())),
                             at::linear(x, *weights_[2]));
    states[0] = at::add(states[0], 1);
    states[1] = x.to(at::kFloat);
    states[2] = ema.to(at::kFloat);
    return std::make_tuple(std::move(out), std::move(states));
  }

  bool hnet_;
  std::vector<c10::optional<at::Tensor>> weights_;  // the predictor's (pooling) or q, k, residual (hnet)
  int64_t stride_ = 0;
  std::vector<int64_t> closers_;
  at::Tensor down_norm_, up_norm_;
  double down_eps_ = 0, up_eps_;
};

// The decoder owns the states it is given (the LM's generate loop hands each token's back): its steps write their
// new states over them where they can.
class Decoder : public LmBlocks {
 public:
  Decoder(at::Tensor embed, at::Tensor norm_weight, double eps)
      : LmBlocks(true), embed_(embed.contiguous()), norm_weight_(std::move(norm_weight)), eps_(eps) {}

  // A block whose mixer is an hourglass layer's token (HourglassStep, shared with its Python step), over the state
  // slots `slots` (the layer's state keys in the step's order), with the block's norms and MLP.
  void add_hourglass_block(std::shared_ptr<HourglassStep> layer, std::vector<int64_t> slots, at::Tensor mixer_norm,
                           double mixer_eps, at::Tensor mlp_norm, double mlp_eps, at::Tensor gate_up,
                           at::Tensor down) {
    BlockMixer mixer = [layer, slots](const at::Tensor& input, std::vector<at::Tensor>& states,
                                      const c10::optional<at::Tensor>& tokens) {
      std::vector<at::Tensor> own;
      own.reserve(slots.size());
      for (const int64_t slot : slots) own.push_back(states.at(slot));
      auto [y, written] = (*layer)(input, std::move(own), tokens);
      for (size_t k = 0; k < slots.size(); ++k) states[slots[k]] = std::move(written.at(k));
      return y;
    };
    add(std::move(mixer), std::move(mixer_norm), mixer_eps, std::move(mlp_norm), mlp_eps, std::move(gate_up),
        std::move(down));
  }

  // tokens [B, 1] int64 and the state slots; returns the logits [B, vocab] float32 and the new state slots.
  std::tuple<at::Tensor, std::vector<at::Tensor>> operator()(const at::Tensor& tokens, std::vector<at::Tensor> states) {
    at::Tensor x = embedded(tokens);
    const at::Tensor ids = tokens.view({-1});
    for (Block& block : blocks_) x = block(x, states, ids);
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
};

}  // namespace

void register_layer_step(const char* op, LayerStep step) { layer_steps()[op] = step; }

}  // namespace seqmix_cpu

void bind_decoder(pybind11::module& m) {
  using seqmix_cpu::Decoder;
  pybind11::class_<Decoder>(m, "Decoder", "an LM's decoding token in one call (decoder_cpu.h)")
      .def(pybind11::init<at::Tensor, at::Tensor, double>())
      .def("add_block", &Decoder::add_block)
      .def("add_hourglass_block", &Decoder::add_hourglass_block)
      .def("__call__", &Decoder::operator());
  using seqmix_cpu::RecurrentCore;
  pybind11::class_<RecurrentCore>(m, "RecurrentCore", "a recurrent-depth core's token (decoder_cpu.cpp)")
      .def(pybind11::init<const at::Tensor&, int64_t, bool>())
      .def("add_block", &RecurrentCore::add_block)
      .def("set_exit", &RecurrentCore::set_exit)
      .def("__call__", &RecurrentCore::operator());
  using seqmix_cpu::HourglassStep;
  // Held by a shared pointer: an LM's decoder shares the layer's program with its Python step.
  pybind11::class_<HourglassStep, std::shared_ptr<HourglassStep>>(
      m, "HourglassStep", "an hourglass layer's decoding token (decoder_cpu.cpp)")
      .def_static("pooling", &HourglassStep::pooling)
      .def_static("hnet", &HourglassStep::hnet)
      .def("add_block", &HourglassStep::add_block)
      .def("__call__", &HourglassStep::operator());
}
