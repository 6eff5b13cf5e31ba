"""The decoding steps as one C++ call each on CPU tensors (built by seqmix/kernels/cpu.py): the recurrent rules'
(the delta rule and gated delta rule, GLA and Mamba-2's SSD; recurrent_step_cpu.cpp), the short causal conv's
(conv/conv_step_cpu.cpp) and the row norms of seqmix/archs/modules.py without autograd (RMSNorm, gated or not,
and l2_normalize; row_norm_cpu.cpp); the Mamba-2, Mamba, (Gated) DeltaNet and GLA layers' steps with their
projections (:func:`mamba2_step`, :func:`mamba_step`, :func:`deltanet_step`, :func:`gla_layer_step`; the layers
ask :func:`serves_layer`) and attention's into its preallocated caches (:func:`attention_step`,
attention_step_cpu.cpp); and the LM's: a block's residual add and MLP (:func:`residual_swiglu_step`,
mlp_step_cpu.cpp; recurrent depth's sandwich block's, :func:`sandwich_swiglu_step`), the final norm and the head
(:func:`rms_norm_times_weight`).

The step functions (``seqmix.kernels.<family>.step``) hand a call here when :func:`serves` says so: CPU
tensors, no gradient wanted (the C++ steps have no backward; autograd keeps the tensor ops), and the C++
kernels built (else the tensor ops serve, and ``seqmix.kernels.explain`` says why). Each is a custom op of
seqmix/kernels/library.py: eagerly the extension is called directly (torch.library's dispatch costs about as
much as the kernel at decoding sizes), under ``torch.compile`` it is the torch.library op with a fake
implementation, so a decoding step traces into one graph; a step bound once for a loop of tokens takes its
op's ``bind`` (:meth:`~seqmix.kernels.library.CustomOp.bind`). Outputs come in the first input's dtype, states
in float32 (float64 for float64 inputs), as the tensor-op steps return them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from seqmix.kernels import cpu
from seqmix.kernels.backend import reporting, select_backend
from seqmix.kernels.library import CustomOp, custom_op
from seqmix.kernels.op import wants_grad
from seqmix.kernels.sequences import reference_dtype


def serves(op: str, like: Tensor, *tensors: Tensor | None) -> bool:
    """Whether the C++ step takes this call of ``op`` (``like`` is its first input, ``tensors`` all of
    them): the automatic choice between ``cpu`` and ``reference`` (``SEQMIX_BACKEND`` steers it)."""
    limit = "a gradient is wanted" if wants_grad(*tensors) else None
    if not reporting() and not os.environ.get("SEQMIX_BACKEND"):
        # select_backend's automatic choice in a third of its time (about 1 us; a step is a few us).
        return limit is None and like.device.type == "cpu" and cpu.unavailable() is None
    return select_backend(op, None, like.device, ("cpu", "reference"), {"cpu": limit}) == "cpu"


# The dtypes whose decoding steps take the C++ call (the layers' and the LM's: serves_layer, serves_step): the
# tensor-op steps round a half-precision layer's values between their ops, the C++ steps would not.
_STEP_DTYPES = (torch.float32, torch.float64)


def serves_layer(op: str, x: Tensor, state: dict[str, Tensor], layer: torch.nn.Module) -> bool:
    """Whether a layer's decoding step takes ``op``, its one C++ call with its projections: :func:`serves`
    for x, the state and the layer's parameters (only gathered with autograd on: without it no gradient is
    wanted, and a parameter's look-up costs as much as a small op), with x float32 or float64."""
    if x.dtype not in _STEP_DTYPES:
        return False
    return serves(op, x, x, *((*state.values(), *layer.parameters()) if torch.is_grad_enabled() else ()))


def serves_step(op: str, x: Tensor, *tensors: Tensor) -> bool:
    """Whether a decoding step's part of the LM (the residual, norms and MLP after a mixer; the final norm and the
    head) takes ``op``, its one C++ call: :func:`serves` for x, and x and ``tensors`` (the other inputs, the
    weights) in one dtype, float32 or float64. The caller has checked that autograd is off."""
    dt = x.dtype
    return dt in _STEP_DTYPES and all(t.dtype == dt for t in tensors) and serves(op, x)


def serves_when_ready(like: Tensor, *tensors: Tensor | None) -> bool:
    """Whether the row norms (seqmix/archs/modules.py) take their C++ call: CPU tensors, no gradient wanted,
    ``SEQMIX_BACKEND`` not ``reference``, and the C++ kernels ready without a compile (:func:`cpu.ready`).
    The norms never build them: training's evaluation and the trainer's banner run them without autograd
    too, and a run that only trains must not wait for a compile for the norms' microseconds. Not a recorded
    choice, so the banner does not list it."""
    return (like.device.type == "cpu" and not wants_grad(like, *tensors)
            and os.environ.get("SEQMIX_BACKEND") != "reference" and cpu.ready())


def _state_like(state: Tensor, like: Tensor) -> Tensor:
    return state.new_empty(state.shape, dtype=reference_dtype(like))


def _projected_like(x: Tensor, out_weight: Tensor) -> Tensor:
    """A layer step's output: x [B, hidden] through the output projection out_weight [hidden, inner]."""
    return x.new_empty(x.shape[0], out_weight.shape[0])


@custom_op("seqmix::delta_rule_step_cpu", mutates_args=())
def _delta_rule_op(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, state: Tensor,
                   scale: float) -> tuple[Tensor, Tensor]:
    o, S = cpu.extension().delta_rule_step(q, k, v, beta, g, state, scale)
    return o, S


@_delta_rule_op.register_fake
def _(q, k, v, beta, g, state, scale):
    return v.new_empty(v.shape, dtype=q.dtype), _state_like(state, q)


@custom_op("seqmix::gla_step_cpu", mutates_args=())
def _gla_op(q: Tensor, k: Tensor, v: Tensor, g: Tensor, state: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    o, S = cpu.extension().gla_step(q, k, v, g, state, scale)
    return o, S


@_gla_op.register_fake
def _(q, k, v, g, state, scale):
    return v.new_empty(v.shape, dtype=q.dtype), _state_like(state, q)


@custom_op("seqmix::ssd_step_cpu", mutates_args=())
def _ssd_op(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, state: Tensor, D: Tensor | None,
            z: Tensor | None, dt_bias: Tensor | None, dt_softplus: bool, dt_min: float,
            dt_max: float) -> tuple[Tensor, Tensor]:
    y, h = cpu.extension().ssd_step(x, dt, A, B, C, state, D, z, dt_bias, dt_softplus, dt_min, dt_max)
    return y, h


@_ssd_op.register_fake
def _(x, dt, A, B, C, state, D, z, dt_bias, dt_softplus, dt_min, dt_max):
    return x.new_empty(x.shape), _state_like(state, x)


def delta_rule_step(q, k, v, beta, g, state, scale: float):
    """``seqmix.kernels.deltanet.step``'s update (``g`` [B, H] or None) in one call; returns (o, state)."""
    return _delta_rule_op(q, k, v, beta, g, state, scale)


def gla_step(q, k, v, g, state, scale: float):
    """``seqmix.kernels.gated_linear_attention.step.gla_step``'s update in one call; returns (o, state)."""
    return _gla_op(q, k, v, g, state, scale)


def ssd_step(x, dt, A, B, C, state, D, z, dt_bias, dt_softplus: bool, dt_limit: tuple[float, float]):
    """``seqmix.kernels.mamba2.step.ssd_step``'s update in one call; returns (y, state)."""
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    return _ssd_op(x, dt, A, B, C, state, D, z, dt_bias, dt_softplus, lo, hi)


@custom_op("seqmix::mamba2_step_cpu", mutates_args=())
def mamba2_step(x: Tensor, in_weight: Tensor, conv_weight: Tensor, conv_bias: Tensor, conv_state: Tensor, A: Tensor,
               D: Tensor, dt_bias: Tensor, dt_softplus: bool, dt_min: float, dt_max: float, ssm_state: Tensor,
               norm_weight: Tensor, eps: float, out_weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One token of a Mamba-2 layer with its projections (seqmix/archs/mamba2.py) in one call, no autograd: x
    [B, hidden] float32 or float64; in_proj (in_weight [d_inner + conv_dim + H, hidden], to z | x B C | dt), the
    short conv's window step with SiLU (conv_weight [conv_dim, W], conv_bias [conv_dim], conv_state
    [B, conv_dim, W-1]), SSD's step (``seqmix.kernels.mamba2.step.ssd_step`` with A, D, dt_bias [H], the step
    sizes clamped to [dt_min, dt_max], ssm_state [B, H, P, N]; B and C in G = (conv_dim - H P) / 2N groups), the
    gate silu(z), the RMSNorm over H P (norm_weight, eps) and out_proj (out_weight [hidden, H P]). Returns (the
    output [B, hidden] in x's dtype, the conv state, the SSD state), the states in x's dtype and new tensors."""
    out, conv, ssm = cpu.extension().mamba2_step(x, in_weight, conv_weight, conv_bias, conv_state, A, D, dt_bias,
                                                 dt_softplus, dt_min, dt_max, ssm_state, norm_weight, eps, out_weight)
    return out, conv, ssm


@mamba2_step.register_fake
def _(x, in_weight, conv_weight, conv_bias, conv_state, A, D, dt_bias, dt_softplus, dt_min, dt_max, ssm_state,
      norm_weight, eps, out_weight):
    return _projected_like(x, out_weight), _state_like(conv_state, x), _state_like(ssm_state, x)


@custom_op("seqmix::gla_layer_step_cpu", mutates_args=())
def gla_layer_step(x: Tensor, in_weight: Tensor, up_weight: Tensor, up_bias: Tensor, normalizer: float, state: Tensor,
                  norm_weight: Tensor, eps: float, has_gate: bool, scale: float,
                  out_weight: Tensor) -> tuple[Tensor, Tensor]:
    """One token of a GLA layer with its projections (seqmix/archs/gla.py) in one call, no autograd: x [B, hidden]
    float32 or float64; the input projections (in_weight [F, hidden], their weights stacked: q | k [H K each] |
    v [H V] | the output gate [H V] (with ``has_gate``) | the decay's low-rank projection [R]), the decay
    g = logsigmoid(up_weight low + up_bias) / normalizer (up_weight [H K, R], up_bias [H K]), GLA's step on state
    [B, H, K, V] (``seqmix.kernels.gated_linear_attention.step``, ``scale``), each head's output RMS-normalised
    over V (norm_weight [V], ``eps``) and multiplied by silu(gate), and o_proj (out_weight [hidden, H V]).
    Returns (the output [B, hidden] in x's dtype, the new state in x's dtype)."""
    out, S = cpu.extension().gla_layer_step(x, in_weight, up_weight, up_bias, normalizer, state, norm_weight, eps,
                                            has_gate, scale, out_weight)
    return out, S


@gla_layer_step.register_fake
def _(x, in_weight, up_weight, up_bias, normalizer, state, norm_weight, eps, has_gate, scale, out_weight):
    return _projected_like(x, out_weight), _state_like(state, x)


@custom_op("seqmix::mamba_step_cpu", mutates_args=())
def mamba_step(x: Tensor, in_weight: Tensor, conv_weight: Tensor, conv_bias: Tensor, conv_state: Tensor,
              x_proj_weight: Tensor, dt_proj_weight: Tensor, dt_proj_bias: Tensor, A: Tensor, D: Tensor,
              ssm_state: Tensor, out_weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One token of a Mamba layer with its projections (seqmix/archs/mamba.py) in one call, no autograd: x
    [B, hidden] float32 or float64; in_proj (in_weight [2 D, hidden], to x | z), the short conv's window step
    with SiLU over x (conv_weight [D, W], conv_bias [D], conv_state [B, D, W-1]), x_proj (x_proj_weight
    [R + 2 N, D]) to the step's low rank, B and C, delta = softplus(dt_proj_weight [D, R] low + dt_proj_bias [D]),
    the selective scan's step (``seqmix.kernels.mamba.step``: A [D, N], the skip D [D], ssm_state [B, D, N]), the
    gate silu(z) and out_proj (out_weight [hidden, D]). Returns (the output [B, hidden] in x's dtype, the conv
    state, the scan's state), the states in x's dtype and new tensors."""
    out, conv, ssm = cpu.extension().mamba_step(x, in_weight, conv_weight, conv_bias, conv_state, x_proj_weight,
                                                dt_proj_weight, dt_proj_bias, A, D, ssm_state, out_weight)
    return out, conv, ssm


@mamba_step.register_fake
def _(x, in_weight, conv_weight, conv_bias, conv_state, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, ssm_state,
      out_weight):
    return _projected_like(x, out_weight), _state_like(conv_state, x), _state_like(ssm_state, x)


@custom_op("seqmix::deltanet_step_cpu", mutates_args=())
def deltanet_step(x: Tensor, in_weight: Tensor, conv_weight: Tensor | None, conv_state: Tensor | None, state: Tensor,
                 A_log: Tensor | None, dt_bias: Tensor | None, norm_weight: Tensor, norm_eps: float, has_gate: bool,
                 scale: float, l2_eps: float, out_weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One token of a DeltaNet or Gated DeltaNet layer with its projections (seqmix/archs/deltanet.py) in one
    call, no autograd: x [B, hidden] float32 or float64; the input projections (in_weight [F, hidden], their
    weights stacked: q|k|v [2 H K + H V] | the output gate [H V] (with ``has_gate``) | b [H] | a [H] (with
    A_log)), the short conv's window step with SiLU over q|k|v (conv_weight [2 H K + H V, W], conv_state
    [B, 2 H K + H V, W-1]; None: SiLU alone), q and k L2-normalised per head (``l2_eps``), beta = sigmoid(b),
    g = -exp(A_log) softplus(a + dt_bias) (A_log, dt_bias [H]; None: no decay), the (gated) delta rule's step on
    state [B, H, K, V] (``seqmix.kernels.deltanet.step``), each head's output RMS-normalised over V (norm_weight
    [V], ``norm_eps``) and multiplied by silu(gate), and o_proj (out_weight [hidden, H V]). Returns (the output
    [B, hidden] in x's dtype, the conv state (empty without the convs), the rule's state), the states in x's dtype
    and new tensors."""
    out, conv, S = cpu.extension().deltanet_step(x, in_weight, conv_weight, conv_state, state, A_log, dt_bias,
                                                 norm_weight, norm_eps, has_gate, scale, l2_eps, out_weight)
    return out, conv, S


@deltanet_step.register_fake
def _(x, in_weight, conv_weight, conv_state, state, A_log, dt_bias, norm_weight, norm_eps, has_gate, scale, l2_eps,
      out_weight):
    conv = x.new_empty(0, 0, 0) if conv_state is None else conv_state
    return _projected_like(x, out_weight), _state_like(conv, x), _state_like(state, x)


@custom_op("seqmix::row_norm_cpu", mutates_args=())
def row_norm(x: Tensor, weight: Tensor | None, gate: Tensor | None, eps: float, mean: bool) -> Tensor:
    """``x * rsqrt(sum(x^2) / n + eps) [* weight] [* silu(gate)]`` over the last dim (n = D if ``mean``, else 1)
    in one call, no autograd: seqmix/archs/modules.py's RMSNorm and l2_normalize without a gradient."""
    return cpu.extension().row_norm(x, weight, gate, eps, mean)


@row_norm.register_fake
def _(x, weight, gate, eps, mean):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@custom_op("seqmix::rms_norm_times_weight_cpu", mutates_args=())
def rms_norm_times_weight(x: Tensor, norm_weight: Tensor, eps: float, weight: Tensor) -> Tensor:
    """``F.linear(rms_norm(x) * norm_weight, weight)`` in one call, no autograd (all one dtype, float32 or float64):
    x [B, D], norm_weight [D], weight [V, D]; the LM's final norm and head in a decoding step. Returns [B, V]."""
    return cpu.extension().rms_norm_times_weight(x, norm_weight, eps, weight)


@rms_norm_times_weight.register_fake
def _(x, norm_weight, eps, weight):
    return _projected_like(x, weight)


@custom_op("seqmix::causal_conv1d_step_cpu", mutates_args=())
def _conv_step_op(x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool, state: Tensor) -> tuple[Tensor, Tensor]:
    out, window = cpu.extension().causal_conv1d_step(x, weight, bias, silu, state)
    return out, window


@_conv_step_op.register_fake
def _(x, weight, bias, silu, state):
    return x.new_empty(x.shape), _state_like(state, x)


def causal_conv1d_step(x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool, state: Tensor):
    """``seqmix.kernels.conv.step.causal_conv1d_step`` in one call; returns (out, the new state)."""
    return _conv_step_op(x, weight, bias, silu, state)


@custom_op("seqmix::residual_swiglu_step_cpu", mutates_args=())
def residual_swiglu_step(x: Tensor, y: Tensor, norm_weight: Tensor, eps: float, gate_up: Tensor,
                        down: Tensor) -> Tensor:
    """seqmix/archs/lm.py's ``h = x + y; h + mlp(mlp_norm(h))`` in one call, no autograd (all one dtype,
    float32 or float64): x, y [..., D], gate_up [2I, D], down [D, I]."""
    return cpu.extension().residual_swiglu_step(x, y, norm_weight, eps, gate_up, down)


@residual_swiglu_step.register_fake
def _(x, y, norm_weight, eps, gate_up, down):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@custom_op("seqmix::sandwich_swiglu_step_cpu", mutates_args=())
def sandwich_swiglu_step(s: Tensor, y: Tensor, mixer_out_weight: Tensor, mlp_in_weight: Tensor,
                        mlp_out_weight: Tensor, eps: float, gate_up: Tensor, down: Tensor) -> Tensor:
    """seqmix/archs/recurrent_depth.py's SandwichBlock after its mixer in one call, no autograd (all one dtype,
    float32 or float64): ``s2 = rmsnorm(s + y) * mixer_out_weight``, then ``rmsnorm(s2 + mlp(rmsnorm(s2) *
    mlp_in_weight)) * mlp_out_weight`` with the SwiGLU MLP of gate_up [2I, D] and down [D, I]; s, y [..., D]."""
    return cpu.extension().sandwich_swiglu_step(s, y, mixer_out_weight, mlp_in_weight, mlp_out_weight, eps, gate_up,
                                                down)


@sandwich_swiglu_step.register_fake
def _(s, y, mixer_out_weight, mlp_in_weight, mlp_out_weight, eps, gate_up, down):
    return torch.empty_like(s, memory_format=torch.contiguous_format)


@custom_op("seqmix::attention_step_cpu", mutates_args=("k_cache", "v_cache"))
def attention_step(x: Tensor, qkv_weight: Tensor, k_cache: Tensor, v_cache: Tensor, length: Tensor,
                   inv_freq: Tensor, o_weight: Tensor) -> tuple[Tensor, Tensor]:
    """seqmix/archs/attention.py's one-token step with its projections in one call, no autograd (all one dtype,
    float32 or float64; the caches contiguous): x [B, hidden] projected to q | k | v [B, 3, H, D] (qkv_weight
    [3 H D, hidden]), q and k rotated by the positions ``length`` [B] int64 (``inv_freq`` [D/2]: the rotary
    frequencies), k and v written into k_cache, v_cache [B, H, L, D] in place at slot ``length``, softmax
    attention of q over slots 0..length, and o_proj (o_weight [hidden, H D]). Returns (the output [B, hidden],
    ``length + 1``)."""
    out, advanced = cpu.extension().attention_step(x, qkv_weight, k_cache, v_cache, length, inv_freq, o_weight)
    return out, advanced


@attention_step.register_fake
def _(x, qkv_weight, k_cache, v_cache, length, inv_freq, o_weight):
    return _projected_like(x, o_weight), torch.empty_like(length)


@custom_op("seqmix::short_conv_layer_step_cpu", mutates_args=())
def short_conv_layer_step(x: Tensor, in_weight: Tensor, conv_weight: Tensor, conv_bias: Tensor | None, silu: bool,
                          conv_state: Tensor, out_weight: Tensor) -> tuple[Tensor, Tensor]:
    """One token of a ShortConv layer with its projections (seqmix/archs/conv.py) in one call, no autograd: x
    [B, hidden] float32 or float64 and the weights in its dtype; in_proj (in_weight [2 C, hidden], to v | g), the
    short conv's window step over v (conv_weight [C, W], conv_bias [C] or None, conv_state [B, C, W-1]) with SiLU
    when ``silu``, the gate silu(g) and out_proj (out_weight [hidden, C]). Returns (the output [B, hidden], the new
    conv state), both in x's dtype and new tensors."""
    out, state = cpu.extension().short_conv_layer_step(x, in_weight, conv_weight, conv_bias, silu, conv_state,
                                                       out_weight)
    return out, state


@short_conv_layer_step.register_fake
def _(x, in_weight, conv_weight, conv_bias, silu, conv_state, out_weight):
    return _projected_like(x, out_weight), _state_like(conv_state, x)


@custom_op("seqmix::dynamic_conv_layer_step_cpu", mutates_args=())
def dynamic_conv_layer_step(x: Tensor, in_weight: Tensor, in_bias: Tensor, kernel: Tensor | None,
                            kernel_weight: Tensor | None, kernel_bias: Tensor | None, heads: int,
                            weight_softmax: bool, conv_state: Tensor, out_weight: Tensor,
                            out_bias: Tensor) -> tuple[Tensor, Tensor]:
    """One token of a LightConv or DynamicConv layer with its projections (seqmix/archs/conv.py) in one call, no
    autograd: x [B, hidden] float32 or float64 and the weights in its dtype; in_proj (in_weight [2 C, hidden],
    in_bias [2 C]) and the GLU to u [C]; the ``heads`` kernels [H, K] (LightConv's ``kernel``, or DynamicConv's
    kernel_weight [H K, C] u + kernel_bias [H K]; the other None), softmax'd over the K taps with
    ``weight_softmax``; ``seqmix.kernels.conv.step.dynamic_conv_step`` over conv_state [B, C, K-1]; out_proj
    (out_weight [hidden, C], out_bias [hidden]). Returns (the output [B, hidden], the new conv state), both in
    x's dtype and new tensors."""
    out, state = cpu.extension().dynamic_conv_layer_step(x, in_weight, in_bias, kernel, kernel_weight, kernel_bias,
                                                         heads, weight_softmax, conv_state, out_weight, out_bias)
    return out, state


@dynamic_conv_layer_step.register_fake
def _(x, in_weight, in_bias, kernel, kernel_weight, kernel_bias, heads, weight_softmax, conv_state, out_weight,
      out_bias):
    return _projected_like(x, out_weight), _state_like(conv_state, x)


class StateOf(NamedTuple):
    """A :class:`LayerCall`'s argument that is the layer state's tensor under ``key``."""

    key: str


class LayerCall:
    """A layer's one-token step as one call of a layer op above (``op``: :func:`mamba2_step`, :func:`mamba_step`,
    :func:`deltanet_step`, :func:`gla_layer_step`, :func:`attention_step`, :func:`short_conv_layer_step`,
    :func:`dynamic_conv_layer_step`) bound to its other arguments: ``args`` in the op's order, the first the
    layer's input (a placeholder), :class:`StateOf` where the state's tensors go. The op returns the output and the
    new state tensors, which take the keys ``outputs`` (None: dropped). ``y, state = call(x, state)`` with x, y
    [B, hidden] (a :meth:`seqmix.archs.Mixer.cpu_decoding_step`); :func:`decoder` runs the same call inside an
    LM's token."""

    def __init__(self, op: CustomOp, args: tuple, outputs: tuple[str | None, ...]):
        self.op, self.args, self.outputs = op, args, outputs
        self._fn = op.bind(*(a for a in args[1:] if type(a) is not StateOf))
        self._states = tuple((i, a.key) for i, a in enumerate(args) if type(a) is StateOf)

    def __call__(self, x: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        args = list(self.args)
        args[0] = x
        for i, key in self._states:
            args[i] = state[key]
        out, *new = self._fn(*args)
        state = dict(state)
        for key, value in zip(self.outputs, new):
            if key is not None:
                state[key] = value
        return out, state


class DecoderBlock(NamedTuple):
    """An LM block's decoding step in parts (seqmix/archs/lm.py's Block.cpu_decoding_parts): ``h = x +
    call(rms_norm(x) * mixer_norm)``, then ``h + swiglu(rms_norm(h) * mlp_norm)`` with the MLP's gate_up [2I, D]
    and down [D, I] (the MLP's parts None for a block whose mixer's output is the stream). :func:`decoder` takes
    blocks whose ``call`` is a :class:`LayerCall` or a :class:`ProgramCall` and that have the MLP."""

    call: Callable
    mixer_norm: Tensor
    mixer_eps: float
    mlp_norm: Tensor | None
    mlp_eps: float | None
    gate_up: Tensor | None
    down: Tensor | None


class CoreBlock(NamedTuple):
    """A recurrent-depth core block's decoding step in parts (seqmix/archs/recurrent_depth.py's
    SandwichBlock.cpu_decoding_parts): ``h = sandwich_swiglu_step(h, call(rms_norm(h) * norm_in), mixer_out, mlp_in,
    mlp_out, eps, gate_up, down)``."""

    call: Callable
    norm_in: Tensor
    mixer_out: Tensor
    mlp_in: Tensor
    mlp_out: Tensor
    eps: float
    gate_up: Tensor
    down: Tensor


class ProgramStep(NamedTuple):
    """A layer's decoding token as one decoder_cpu.cpp program (an HourglassStep) over the layer's state keys
    ``keys``, in the program's order: ``y, state = step(x, state, tokens)``."""

    program: object
    keys: tuple[str, ...]

    def __call__(self, x: Tensor, state: dict[str, Tensor], tokens: Tensor | None = None):
        y, new = self.program(x, [state[key] for key in self.keys], tokens)
        return y, state | dict(zip(self.keys, new))


class ProgramCall(NamedTuple):
    """A layer's decoding step, ``y, state = call(x, state)`` (``step``), that is ``program`` (a
    :class:`ProgramStep`) called with the step's token ids: an LM's :func:`decoder` runs the program among its
    blocks."""

    program: ProgramStep
    step: Callable

    def __call__(self, x: Tensor, state: dict[str, Tensor]):
        return self.step(x, state)


# Where a layer op's tensor argument comes from in decoder_cpu.cpp (bound, the block's normed input, else a state
# slot), and an output state that no key takes.
_BOUND, _INPUT, _DROPPED = -1, -2, -1


def _bound_arguments(call: LayerCall, slot: Callable[[str], int]) -> tuple:
    """``call``'s op name and arguments as decoder_cpu.cpp's add_block takes them: the tensors (None where the input
    or a state goes), their sources (state keys made slots by ``slot``), the floats, integers and flags."""
    tensors, sources, values = [], [], {"float": [], "int": [], "bool": []}
    for j, (arg, spec) in enumerate(zip(call.args, call.op.op._opoverload._schema.arguments, strict=True)):
        kind = str(spec.type)
        if kind in values:
            values[kind].append(arg)
        else:
            tensors.append(None if j == 0 or type(arg) is StateOf else arg)
            sources.append(_INPUT if j == 0 else slot(arg.key) if type(arg) is StateOf else _BOUND)
    return call.op.name, tensors, sources, values["float"], values["int"], values["bool"]


def _add_block(program, block: DecoderBlock, slot: Callable[[str], int]) -> None:
    """Adds an LM block (a :class:`LayerCall` and the MLP) to a decoder_cpu.cpp program, its state keys made slots
    by ``slot``."""
    outputs = [_DROPPED if key is None else slot(key) for key in block.call.outputs]
    program.add_block(*_bound_arguments(block.call, slot), outputs, block.mixer_norm, block.mixer_eps, block.mlp_norm,
                      block.mlp_eps, block.gate_up, block.down)


def decoder(embed: Tensor, norm_weight: Tensor, eps: float, blocks: list[DecoderBlock]) -> Callable:
    """An LM's decoding token as one C++ call (decoder_cpu.cpp): ``logits, state = decode(tokens, state)``,
    tokens [B, 1] int64, state the blocks' states (as :meth:`seqmix.archs.lm.LanguageModel.init_state` lays them
    out); the embedding's rows (embed [V, D], also the head) through the blocks, the final RMSNorm (norm_weight, eps)
    and the head; logits [B, V] float32. Each block's ``call`` is a :class:`LayerCall` or a :class:`ProgramCall`,
    whose program runs among the blocks with the token ids. The same calls as the blocks' Python steps, without the
    Python between them. The decoder owns the states it is given: a layer writes its new state over the old where it
    can (attention's caches, as its Python step does; Mamba-2's SSD state)."""
    program, slots = cpu.extension().Decoder(embed, norm_weight, eps), {}
    for i, block in enumerate(blocks):
        def slot(key, i=i):
            return slots.setdefault((i, key), len(slots))

        if type(block.call) is ProgramCall:
            layer = block.call.program
            program.add_hourglass_block(layer.program, [slot(key) for key in layer.keys], *block[1:])
        else:
            _add_block(program, block, slot)

    def decode(tokens: Tensor, state: list[dict[str, Tensor]]):
        logits, new = program(tokens, [state[i][key] for i, key in slots])
        state = [dict(s) for s in state]
        for (i, key), value in zip(slots, new):
            state[i][key] = value
        return logits, state

    return decode


def recurrent_core(latent_weight: Tensor, blocks: list[CoreBlock], prefixes: list[str], keep_last: bool,
                   exit: tuple[float, Tensor, float, Tensor] | None = None) -> Callable:
    """A recurrent-depth layer's core iterations for one token as one C++ call (decoder_cpu.cpp's RecurrentCore):
    ``s, new, steps = core(s, e, state)``, s and e [B, hidden] (the start latent and the adapter's input half W_e x).
    Per iteration ``h = e + s latent_weight^T`` (the adapter's latent half [hidden, hidden]), then each block in order
    (:class:`CoreBlock`); s is the last iteration's h. ``prefixes``: per iteration the prefix of its blocks' keys in
    the layer's state (block j's state key k is f"{prefix}{j}.{k}"); with ``keep_last`` (the bounded state, one
    prefix for all) each iteration reads the state given and the last one run leaves the new one. ``new`` is the
    core's part of the state after the token: every key with such a prefix (as the blocks' Python steps return
    them). ``exit``: the adaptive exit's threshold and the readout's RMSNorm weight, eps and head [V, hidden]
    (RecurrentDepth's KL criterion); ``steps`` [B] int64, each row's iterations, or None without it. The same calls
    as the layer's Python steps; the states given are left as they are (but attention's caches, which its step
    fills in place)."""
    program, slots = cpu.extension().RecurrentCore(latent_weight, len(blocks), keep_last), {}
    if exit is not None:
        program.set_exit(*exit)
    bound = [_bound_arguments(block.call, lambda key: key) for block in blocks]  # state keys in place of slots
    for prefix in prefixes:
        for j, (block, (op, tensors, sources, *values)) in enumerate(zip(blocks, bound)):
            def slot(key, head=f"{prefix}{j}."):
                return slots.setdefault(head + key, len(slots))

            sources = [slot(source) if type(source) is str else source for source in sources]
            outputs = [_DROPPED if key is None else slot(key) for key in block.call.outputs]
            program.add_block(op, tensors, sources, *values, outputs, *block[1:])
    keys = list(slots)
    heads = tuple({f"{prefix}{j}." for prefix in prefixes for j in range(len(blocks))})

    def core(s: Tensor, e: Tensor, state: dict[str, Tensor]):
        s, new, steps = program(s, e, [state[key] for key in keys])
        return s, {key: value for key, value in state.items() if key.startswith(heads)} | dict(zip(keys, new)), steps

    return core


def pooling_step(predictor: tuple[Tensor, Tensor, Tensor, Tensor] | None, stride: int, closers: tuple[int, ...],
                 down_norm: Tensor, down_eps: float, up_norm: Tensor, up_eps: float,
                 blocks: list[DecoderBlock]) -> ProgramStep:
    """A pooling hourglass layer's decoding token as one C++ call (decoder_cpu.cpp's HourglassStep): ``y, state =
    step(x, state, tokens)``, x and y [B, hidden], state the layer's (position, last, sum, count, and the inner
    blocks' under ``"inner.{j}."``). The boundaries: ``predictor`` (the boundary predictor's hidden weight and bias and
    logit weight and bias), else the token ids ``closers`` (the whitespace mode: ``tokens`` [B] int64 are the call's),
    else every ``stride``-th position. The segment's mean goes through RMSNorm (down_norm, down_eps), the inner blocks
    (as :func:`decoder` takes them) and RMSNorm (up_norm, up_eps). The same computation as the layer's Python step
    (seqmix/archs/hourglass.py's Hourglass._pooling_step) at a decoding step's rows, where the predictor's products are
    F.linear's; the states given are left as they are (but attention's caches)."""
    program = cpu.extension().HourglassStep.pooling(*(predictor or (None,) * 4),
                                                    0 if predictor or closers else stride, list(closers), down_norm,
                                                    down_eps, up_norm, up_eps)
    return _hourglass_step(program, ("position", "last", "sum", "count"), blocks)


def hnet_step(q_weight: Tensor, k_weight: Tensor, residual_weight: Tensor, up_norm: Tensor, up_eps: float,
              blocks: list[DecoderBlock]) -> ProgramStep:
    """An H-Net hourglass layer's decoding token as one C++ call (decoder_cpu.cpp's HourglassStep), as
    :func:`pooling_step` with the state's position, prev and ema: the boundary probability from the q and k
    projections of the previous and this token, the inner blocks and RMSNorm (up_norm, up_eps) into the EMA at a
    boundary, the output the EMA plus the residual projection. The same computation as
    seqmix/archs/hourglass.py's Hourglass._hnet_step at a decoding step's rows."""
    program = cpu.extension().HourglassStep.hnet(q_weight, k_weight, residual_weight, up_norm, up_eps)
    return _hourglass_step(program, ("position", "prev", "ema"), blocks)


def _hourglass_step(program, own: tuple[str, ...], blocks: list[DecoderBlock]) -> ProgramStep:
    """``program`` (an HourglassStep) with the inner blocks added, as a step over the layer's state: its own keys
    ``own`` first, then the inner blocks' under ``"inner.{j}."``."""
    slots = {key: i for i, key in enumerate(own)}
    for j, block in enumerate(blocks):
        _add_block(program, block, lambda key, head=f"inner.{j}.": slots.setdefault(head + key, len(slots)))
    return ProgramStep(program, tuple(slots))

