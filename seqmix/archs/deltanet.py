"""DeltaNet (Yang et al. 2024): linear attention whose state is updated by the delta rule;
Gated DeltaNet adds a decay per head and token."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seqmix.archs.mixer import Mixer, State, is_decoding_step, register_mixer
from seqmix.archs.modules import RMSNorm, ShortConvolution, l2_normalize, no_weight_decay
from seqmix.kernels import causal_conv1d, delta_rule, gated_delta_rule
from seqmix.kernels.conv.step import causal_conv1d_step
from seqmix.kernels.deltanet.step import delta_rule_step, gated_delta_rule_step


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
        self.q_proj = nn.Linear(hidden_size, dk, bias=False)
        self.k_proj = nn.Linear(hidden_size, dk, bias=False)
        self.v_proj = nn.Linear(hidden_size, dv, bias=False)
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.convs = (
            nn.ModuleDict({n: ShortConvolution(d, conv_size, backend=backend)
                           for n, d in (("q", dk), ("k", dk), ("v", dv))})
            if use_short_conv else None
        )
        self.g_proj = nn.Linear(hidden_size, dv, bias=False) if use_output_gate else None
        self.o_norm = RMSNorm(self.head_v, eps=norm_eps)
        self.o_proj = nn.Linear(dv, hidden_size, bias=False)

    def _qkv_weights(self):
        """The q, k and v projections' weights stacked, [2 dk + dv, hidden]: one matmul computes all three
        (the parameters stay separate, so names and checkpoints do not change)."""
        return torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])

    def _conv_weights(self):
        """The three short convs' taps stacked, [2 dk + dv, conv_size]: one conv over q|k|v side by side."""
        return torch.cat([c.weight for c in self.convs.values()])

    def _split_features(self, f, shape):
        """q, k (L2-normalised together) [*shape, H, K] and v [*shape, H, V] from q|k|v features."""
        H, dk = self.num_heads, self.num_heads * self.head_k
        q, k = l2_normalize(f[..., : 2 * dk].unflatten(-1, (2 * H, self.head_k))).split(H, -2)
        return q, k, f[..., 2 * dk :].unflatten(-1, (H, self.head_v))

    def _split_conv_state(self, window, new_state):
        for name, part in zip(self.convs, window.split([c.dim for c in self.convs.values()], 1), strict=True):
            new_state[f"conv_{name}"] = part

    def _qkv(self, x, state, cu_seqlens):
        """Projections and short convs; returns q, k, v as [B, T, H, *] and the new conv states."""
        f = F.linear(x, self._qkv_weights())
        new_state = {}
        if self.convs is None:
            f = F.silu(f)
        else:
            conv_state = None if state is None else torch.cat([state[f"conv_{n}"] for n in self.convs], 1)
            f, window = causal_conv1d(f, self._conv_weights(), activation="silu", initial_state=conv_state,
                                      output_final_state=state is not None, cu_seqlens=cu_seqlens,
                                      backend=self.backend)
            if state is not None:
                self._split_conv_state(window, new_state)
        q, k, v = self._split_features(f, x.shape[:2])
        return q, k, v, new_state

    def _qkv_one_token(self, x, state):
        """:meth:`_qkv` of a decoding step (x [B, 1, hidden]) in fewer ops: the three short convs as one
        window step. Returns q, k [B, H, K], v [B, H, V] and the new conv states."""
        f = F.linear(x[:, 0], self._qkv_weights())
        new_state = {}
        if self.convs is None:
            f = F.silu(f)
        else:
            conv_state = torch.cat([state[f"conv_{n}"] for n in self.convs], 1)
            f, window = causal_conv1d_step(f, self._conv_weights(), None, "silu", conv_state)
            self._split_conv_state(window, new_state)
        q, k, v = self._split_features(f, x.shape[:1])
        return q, k, v, new_state

    def _write_strengths(self, x):
        """beta [*, H] in x's dtype, and the log decays g [*, H] float32 (None: no decay) of x [*, hidden]."""
        return torch.sigmoid(F.linear(x, self.b_proj.weight).float()).to(x.dtype), None

    def mix(self, x, state: State | None, *, cu_seqlens=None):
        if is_decoding_step(x, state, cu_seqlens):
            q, k, v, new_state = self._qkv_one_token(x, state)
            beta, g = self._write_strengths(x[:, 0])
            if g is None:
                o, recurrent = delta_rule_step(q, k, v, beta, state["recurrent"])
            else:
                o, recurrent = gated_delta_rule_step(q, k, v, g, beta, state["recurrent"])
            return self._output(x, o.unsqueeze(1), recurrent, state, new_state)
        q, k, v, new_state = self._qkv(x, state, cu_seqlens)
        beta, g = self._write_strengths(x)
        options = {"initial_state": None if state is None else state["recurrent"],
                   "output_final_state": state is not None, "cu_seqlens": cu_seqlens, "backend": self.backend}
        if g is None:
            o, recurrent = delta_rule(q, k, v, beta, **options)
        else:
            o, recurrent = gated_delta_rule(q, k, v, g, beta, **options)
        return self._output(x, o, recurrent, state, new_state)

    def _output(self, x, o, recurrent, state, new_state):
        """The (gated) output norm and projection, and the state to return (None when training)."""
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
            state.update({f"conv_{n}": conv.init_state(batch_size) for n, conv in self.convs.items()})
        return state


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
        self.a_proj = nn.Linear(hidden_size, num_heads, bias=False)
        A = torch.empty(num_heads).uniform_(*a_init_range)
        self.A_log = nn.Parameter(torch.log(A))
        log_dt = torch.empty(num_heads).uniform_(math.log(dt_min), math.log(dt_max))
        dt = torch.exp(log_dt).clamp_min(1e-4)
        # softplus^-1(dt), so that softplus(dt_bias) starts at dt.
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        no_weight_decay(self.A_log, self.dt_bias)

    def log_decay(self, x: torch.Tensor) -> torch.Tensor:
        """g [B, T, H] float32, <= 0: the state's log decay at each token."""
        return self._log_decay_of(self.a_proj(x).float())

    def _log_decay_of(self, a):
        """g from a_proj's output a [*, H] (float32)."""
        return -self.A_log.float().exp() * F.softplus(a + self.dt_bias.float())

    def _write_strengths(self, x):
        """beta and g from one matmul with the b and a projections' weights stacked."""
        H = self.num_heads
        ba = F.linear(x, torch.cat([self.b_proj.weight, self.a_proj.weight])).float()
        return torch.sigmoid(ba[..., :H]).to(x.dtype), self._log_decay_of(ba[..., H:])
