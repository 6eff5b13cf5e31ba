"""DeltaNet (Yang et al. 2024): linear attention whose state is updated by the delta rule;
Gated DeltaNet adds a decay per head and token."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seqmix.archs.mixer import Mixer, State, is_decoding_step, register_mixer, take_step
from seqmix.archs.modules import L2_NORM_EPS, Linear, RMSNorm, ShortConvolution, l2_normalize, no_weight_decay
from seqmix.kernels import causal_conv1d, delta_rule, gated_delta_rule, step_cpu
from seqmix.kernels.conv.step import causal_conv1d_step
from seqmix.kernels.deltanet.step import delta_rule_step, gated_delta_rule_step
from seqmix.kernels.linear import linear
from seqmix.kernels.sequences import in_dtype, reference_dtype
from seqmix.kernels.step_cpu import StateOf


@register_mixer("deltanet")
class DeltaNet(Mixer):
    """q/k/v projections, short causal convs with SiLU, L2-normalised q and k,
    beta = sigmoid(linear(x)), the delta rule, a (gated) output RMSNorm per head,
    and the output projection.

    Args:
        hidden_size: model width.
        num_heads: number of heads H.
        head_dim: key dim K per head (default hidden_size // num_heads).
        expand_v: value dim V = K * expand_v.
        conv_size: width of the short convolutions.
        use_short_conv: put the short convolutions on q, k and v (else SiLU alone).
        use_output_gate: multiply the normalised output by silu(linear(x)).
        norm_eps: epsilon of the output RMSNorm.
        backend: backend of the delta rule and the short convs (None: automatic).
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int | None = None, expand_v: float = 1.0,
                 conv_size: int = 4, use_short_conv: bool = True, use_output_gate: bool = True,
                 norm_eps: float = 1e-5, backend: str | None = None):
        super().__init__()
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
            head_dim = hidden_size // num_heads
        self.hidden_size, self.num_heads, self.head_k = hidden_size, num_heads, head_dim
        self.head_v = int(head_dim * expand_v)
        self.backend = backend
        dk, dv = num_heads * self.head_k, num_heads * self.head_v
        self.q_proj = Linear(hidden_size, dk, bias=False)
        self.k_proj = Linear(hidden_size, dk, bias=False)
        self.v_proj = Linear(hidden_size, dv, bias=False)
        self.b_proj = Linear(hidden_size, num_heads, bias=False)
        self.convs = (
            nn.ModuleDict({n: ShortConvolution(d, conv_size, backend=backend)
                           for n, d in (("q", dk), ("k", dk), ("v", dv))})
            if use_short_conv else None
        )
        self.g_proj = Linear(hidden_size, dv, bias=False) if use_output_gate else None
        self.o_norm = RMSNorm(self.head_v, eps=norm_eps)
        self.o_proj = Linear(dv, hidden_size, bias=False)

    def _qkv_weights(self):
        """The q, k and v projections' weights stacked, [2 dk + dv, hidden]: one matmul computes all three
        (the parameters stay separate, so names and checkpoints do not change)."""
        return torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])

    _strength_names = ("b_proj",)  # the projections whose outputs :meth:`_strengths` reads, in order

    def _strength_weights(self):
        """The weights of the projections named by ``_strength_names``."""
        return [self._modules[n].weight for n in self._strength_names]

    def _strengths(self, f):
        """beta [*, H] in f's dtype and the log decays g [*, H] float32 (None: no decay) from the output f of
        the projections of :meth:`_strength_weights`."""
        return self._strengths_of(f)

    def _strengths_of(self, b):
        """:meth:`_strengths` from the projections' outputs apart, [*, H] each (the decoding step splits them
        off with the rest of its one matmul's output: one split call fewer per token)."""
        return in_dtype(torch.sigmoid(_computed(b)), b.dtype), None

    def _decay_parameters(self):
        """(A_log, dt_bias) of the decay g = -exp(A_log) softplus(a + dt_bias) that the C++ decoding step computes
        (:meth:`_log_decay_of`), or (None, None): no decay."""
        return None, None

    def _conv_weights(self):
        """The three short convs' taps stacked, [2 dk + dv, conv_size]: one conv over q|k|v side by side
        (its state is one tensor, ``state["conv"]``)."""
        return torch.cat([c.weight for c in self._modules["convs"].values()])

    def _split_features(self, f):
        """q, k (L2-normalised) [*, H, K] and v [*, H, V] from the q|k|v features f [*, 2 dk + dv]."""
        H, K = self.num_heads, self.head_k
        # split, not slices: its backward is one cat, a slice's a zero tensor of f's size per slice.
        q, k, v = f.split([H * K, H * K, H * self.head_v], -1)
        # q and k normalised apart: each comes out contiguous, as the delta rule takes it (one norm of q|k split in
        # two gave strided halves, which the rule's packing copied, and a cat in the backward).
        return l2_normalize(q.unflatten(-1, (H, K))), l2_normalize(k.unflatten(-1, (H, K))), v.unflatten(-1, (H, -1))

    def _qkv(self, x, state, cu_seqlens):
        """Projections and short convs; returns q, k, v as [B, T, H, *] and the new conv state."""
        f = linear(x, self._qkv_weights())
        new_state = {}
        if self.convs is None:
            f = F.silu(f)
        else:
            f, window = causal_conv1d(f, self._conv_weights(), activation="silu",
                                      initial_state=None if state is None else state["conv"],
                                      output_final_state=state is not None, cu_seqlens=cu_seqlens,
                                      backend=self.backend)
            if state is not None:
                new_state["conv"] = window
        return *self._split_features(f), new_state

    def _decoding_step(self, x, state):
        """One token per sequence (x [B, 1, hidden]) in few calls: on CPU tensors without autograd the whole layer
        in one C++ call (:meth:`cpu_decoding_step`), else one matmul for every input projection (q|k|v, the output
        gate, beta's and the decay's), the three short convs as one window step, the norms and the one-token rule
        (seqmix/kernels/deltanet/step.py) and o_proj."""
        step = self.cpu_decoding_step(x, state)
        if step is not None:
            return take_step(step, x, state)
        weights, taps = self._decoding_weights()
        o, new_state = self._tensor_op_step(F.linear(x.squeeze(1), weights), taps, state, self.g_proj is not None)
        # o_proj's weight through F.linear on 2-D rows: the module's call and a 3-D linear cost ~2 us more.
        return F.linear(o, self._modules["o_proj"]._parameters["weight"]).unsqueeze(1), new_state

    def _decoding_weights(self):
        """The decoding step's input projections stacked, [F, hidden] (q|k|v, the output gate, beta's and the
        decay's), and the short convs' taps [2 dk + dv, conv_size] (None without convs), kept between steps."""
        # Submodules and parameters from their dicts: Module.__getattr__ costs ~0.6 us a look-up, a dozen a step.
        modules = self._modules  # a None submodule (no gate, no convs) is a plain attribute: .get
        names = ["q_proj", "k_proj", "v_proj"] + ([] if modules.get("g_proj") is None else ["g_proj"])
        params = [modules[n]._parameters["weight"] for n in names + list(self._strength_names)]
        weights = self._decoding_constant("_step_weights", params, lambda: torch.cat(params))
        convs = modules.get("convs")
        taps = None if convs is None else self._decoding_constant(
            "_step_taps", [c._parameters["weight"] for c in convs._modules.values()], self._conv_weights)
        return weights, taps

    def cpu_decoding_step(self, like, state):
        """The whole layer in one C++ call (step_cpu.deltanet_step: the projections, the short convs, the norms,
        the rule's step, o_proj); see :meth:`Mixer.cpu_decoding_step`."""
        if not step_cpu.serves_layer("deltanet_step", like, state, self):
            return None
        weights, taps = self._decoding_weights()
        modules = self._modules
        o_norm, o_weight = modules["o_norm"], modules["o_proj"]._parameters["weight"]
        norm_weight, eps, scale = o_norm._parameters["weight"], o_norm.eps, self.head_k ** -0.5
        has_gate, decay = modules.get("g_proj") is not None, self._decay_parameters()
        conv = None if taps is None else StateOf("conv")
        return step_cpu.LayerCall(step_cpu.deltanet_step, (None, weights, taps, conv, StateOf("recurrent"), *decay,
                                                           norm_weight, eps, has_gate, scale, L2_NORM_EPS, o_weight),
                                  (None if taps is None else "conv", "recurrent"))

    def _tensor_op_step(self, f, taps, state, gated: bool):
        """:meth:`_decoding_step` between the projections with the tensor-op steps (autograd, CUDA tensors, no C++
        kernels): the normed output [B, H V] and the new state from the projections' output f [B, F] (with the
        output gate's part when ``gated``)."""
        B, H, K, V = f.shape[0], self.num_heads, self.head_k, self.head_v
        gates = int(gated)
        sizes = [2 * H * K + H * V] + [H * V] * gates + [H] * len(self._strength_names)  # a strength: one per head
        qkv, *rest = f.split(sizes, -1)
        rest, strength_outputs = rest[:gates], rest[gates:]
        new_state = {}
        if taps is None:
            qkv = F.silu(qkv)
        else:
            qkv, new_state["conv"] = causal_conv1d_step(qkv, taps, None, "silu", state["conv"])
        qk, v = qkv.split([2 * H * K, H * V], -1)
        q, k = l2_normalize(qk.view(B, 2, H, K)).unbind(1)  # unbind: a cheaper call than split
        beta, g = self._strengths_of(*strength_outputs)
        if g is None:
            o, recurrent = delta_rule_step(q, k, v.view(B, H, V), beta, state["recurrent"])
        else:
            o, recurrent = gated_delta_rule_step(q, k, v.view(B, H, V), g, beta, state["recurrent"])
        # o and the gate as [B, H, V]: the norm runs over V, and its result is [B, H V] in one view.
        gate = None if not gates else rest[0].view(B, H, V)
        new_state["recurrent"] = recurrent
        return self._modules["o_norm"](o, gate).view(B, H * V), new_state

    def mix(self, x, state: State | None, *, cu_seqlens=None):
        if is_decoding_step(x, state, cu_seqlens):
            return self._decoding_step(x, state)
        q, k, v, new_state = self._qkv(x, state, cu_seqlens)
        weights = self._strength_weights()
        beta, g = self._strengths(linear(x, weights[0] if len(weights) == 1 else torch.cat(weights)))
        options = {"initial_state": None if state is None else state["recurrent"],
                   "output_final_state": state is not None, "cu_seqlens": cu_seqlens, "backend": self.backend}
        if g is None:
            o, recurrent = delta_rule(q, k, v, beta, **options)
        else:
            o, recurrent = gated_delta_rule(q, k, v, g, beta, **options)
        gate = None if self.g_proj is None else self.g_proj(x).view_as(o)
        o = self.o_proj(self.o_norm(o, gate).flatten(2))
        if state is None:
            return o, None
        new_state["recurrent"] = recurrent
        return o, new_state

    def init_state(self, batch_size: int) -> State:
        device = self.q_proj.weight.device
        state = {"recurrent": torch.zeros(batch_size, self.num_heads, self.head_k, self.head_v, device=device)}
        if self.convs is not None:
            width = self.convs["q"].kernel_size - 1
            state["conv"] = torch.zeros(batch_size, sum(c.dim for c in self.convs.values()), width, device=device)
        return state


def _computed(x):
    """x in the dtype the references compute in: float32, float64 for float64 x (the decay and beta of a float64
    layer keep their digits, as the C++ decoding step computes them)."""
    return in_dtype(x, reference_dtype(x))


@register_mixer("gated_deltanet")
class GatedDeltaNet(DeltaNet):
    """Gated DeltaNet (Yang, Kautz & Hatamizadeh 2025): DeltaNet whose state also decays by a
    data-dependent scalar per head and token, ``g = -exp(A_log) * softplus(a_proj(x) + dt_bias)``
    (Mamba-2's parametrisation), through :func:`seqmix.kernels.gated_delta_rule`.

    Args: as :class:`DeltaNet` (the output gate is on by default), plus
        dt_min, dt_max: range of the initial step sizes softplus(dt_bias), log-uniform.
        a_init_range: range of the initial decay rates exp(A_log), uniform.
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int | None = None, expand_v: float = 1.0,
                 conv_size: int = 4, use_short_conv: bool = True, use_output_gate: bool = True,
                 norm_eps: float = 1e-5, dt_min: float = 1e-3, dt_max: float = 0.1,
                 a_init_range: tuple[float, float] = (1.0, 16.0), backend: str | None = None):
        super().__init__(hidden_size, num_heads, head_dim, expand_v, conv_size, use_short_conv, use_output_gate,
                         norm_eps, backend)
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        if not 0 < a_init_range[0] <= a_init_range[1]:
            raise ValueError(f"a_init_range must be an increasing pair of positive rates, got {a_init_range}")
        self.a_proj = Linear(hidden_size, num_heads, bias=False)
        A = torch.empty(num_heads).uniform_(*a_init_range)
        self.A_log = nn.Parameter(torch.log(A))
        log_dt = torch.empty(num_heads).uniform_(math.log(dt_min), math.log(dt_max))
        dt = torch.exp(log_dt).clamp_min(1e-4)
        # softplus^-1(dt), so that softplus(dt_bias) starts at dt.
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        no_weight_decay(self.A_log, self.dt_bias)

    def log_decay(self, x: torch.Tensor) -> torch.Tensor:
        """g [B, T, H] float32 (float64 in a float64 layer), <= 0: the state's log decay at each token."""
        return self._log_decay_of(_computed(self.a_proj(x)))

    def _log_decay_of(self, a):
        """g from a_proj's output a [*, H] (float32 or float64). The sign last and in place: one allocation fewer."""
        return torch.mul(F.softplus(a + in_dtype(self.dt_bias, a.dtype)), in_dtype(self.A_log, a.dtype).exp()).neg_()

    def _decay_parameters(self):
        params = self._parameters
        return params["A_log"], params["dt_bias"]

    _strength_names = ("b_proj", "a_proj")  # beta and g from one matmul

    def _strengths(self, f):
        return self._strengths_of(*f.split(self.num_heads, -1))

    def _strengths_of(self, b, a):
        return in_dtype(torch.sigmoid(_computed(b)), b.dtype), self._log_decay_of(_computed(a))
