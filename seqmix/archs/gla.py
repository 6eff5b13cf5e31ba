"""Gated linear attention (Yang et al. 2024): linear attention whose state decays per key channel
by a data-dependent gate, through :func:`seqmix.kernels.gla`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seqmix.archs.mixer import Mixer, State, is_decoding_step, register_mixer, take_step
from seqmix.archs.modules import Linear, RMSNorm, no_weight_decay
from seqmix.kernels import gla, step_cpu
from seqmix.kernels.gated_linear_attention.step import gla_step
from seqmix.kernels.linear import linear
from seqmix.kernels.sequences import reference_dtype
from seqmix.kernels.step_cpu import StateOf


@register_mixer("gla")
class GatedLinearAttention(Mixer):
    """q/k/v projections, a low-rank gate projection giving the log decays
    ``g = logsigmoid(W2 W1 x + b) / gate_normalizer`` per key channel, the GLA recurrence, a
    per-head RMSNorm fused with the swish output gate, and the output projection.

    Args:
        hidden_size: model width.
        num_heads: number of heads H.
        expand_k: key width = hidden_size * expand_k (split over the heads).
        expand_v: value width = hidden_size * expand_v (split over the heads).
        gate_low_rank_dim: rank of the gate projection (16 in the paper).
        gate_normalizer: divides logsigmoid(...) (16 in the paper): decays stay near 1 at first.
        use_output_gate: multiply the normalised output by silu(linear(x)).
        norm_eps: epsilon of the output RMSNorm.
        backend: backend of the op (None: automatic).
    """

    def __init__(self, hidden_size: int, num_heads: int, expand_k: float = 0.5, expand_v: float = 1.0,
                 gate_low_rank_dim: int = 16, gate_normalizer: float = 16.0, use_output_gate: bool = True,
                 norm_eps: float = 1e-5, backend: str | None = None):
        super().__init__()
        key_dim, value_dim = int(hidden_size * expand_k), int(hidden_size * expand_v)
        for name, dim in (("key", key_dim), ("value", value_dim)):
            if dim == 0 or dim % num_heads:
                raise ValueError(f"the {name} width {dim} (hidden_size * expand) must be a positive multiple "
                                 f"of num_heads={num_heads}")
        if gate_normalizer <= 0:
            raise ValueError(f"gate_normalizer must be positive, got {gate_normalizer}")
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_k, self.head_v = key_dim // num_heads, value_dim // num_heads
        self.gate_normalizer, self.backend = gate_normalizer, backend
        self.q_proj = Linear(hidden_size, key_dim, bias=False)
        self.k_proj = Linear(hidden_size, key_dim, bias=False)
        self.v_proj = Linear(hidden_size, value_dim, bias=False)
        self.gk_proj = nn.Sequential(Linear(hidden_size, gate_low_rank_dim, bias=False),
                                     Linear(gate_low_rank_dim, key_dim, bias=True))
        no_weight_decay(self.gk_proj[1].bias)
        self.g_proj = Linear(hidden_size, value_dim, bias=False) if use_output_gate else None
        self.o_norm = RMSNorm(self.head_v, eps=norm_eps)
        self.o_proj = Linear(value_dim, hidden_size, bias=False)

    def log_decay(self, x: torch.Tensor) -> torch.Tensor:
        """g [B, T, H, K] float32 (float64 for a float64 layer), <= 0: the per-channel log decay at each token."""
        return self._log_decay_of(self.gk_proj[0](x))

    def _log_decay_of(self, low: torch.Tensor) -> torch.Tensor:
        """g from the gate's low-rank projection ``low`` [B, T, gate_low_rank_dim]."""
        B, T, _ = low.shape
        up = self.gk_proj[1]
        logits = linear(low, up.weight, up.bias)
        return (F.logsigmoid(logits.to(reference_dtype(logits))) / self.gate_normalizer).view(B, T, self.num_heads, -1)

    def _projections(self, x):
        """q, k, v [B, T, H, *], the output gate [B, T, value_dim] or None, and the gate's low-rank
        projection: :func:`~seqmix.kernels.linear.linear` on the modules' weights, without their modules'
        calls (which cost a decoding step more than the matmuls)."""
        B, T, _ = x.shape
        q, k, v = (linear(x, m.weight).view(B, T, self.num_heads, -1)
                   for m in (self.q_proj, self.k_proj, self.v_proj))
        gate = None if self.g_proj is None else linear(x, self.g_proj.weight)
        return q, k, v, gate, linear(x, self.gk_proj[0].weight)

    def mix(self, x, state: State | None, *, cu_seqlens=None):
        step = self.cpu_decoding_step(x, state) if is_decoding_step(x, state, cu_seqlens) else None
        if step is not None:
            return take_step(step, x, state)
        q, k, v, gate, low = self._projections(x)
        g = self._log_decay_of(low)
        if is_decoding_step(x, state, cu_seqlens):
            o, recurrent = gla_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], state["recurrent"])
            o = o.unsqueeze(1)
        else:
            o, recurrent = gla(
                q, k, v, g, initial_state=None if state is None else state["recurrent"],
                output_final_state=state is not None, cu_seqlens=cu_seqlens, backend=self.backend,
            )
        o = self.o_proj(self.o_norm(o, None if gate is None else gate.view_as(o)).flatten(2))
        return o, (None if state is None else {"recurrent": recurrent})

    def cpu_decoding_step(self, like, state):
        """One token as one C++ call (the input projections on their weights' concatenation, kept between steps;
        the decay's up-projection, GLA's step, the gated per-head norm and o_proj: step_cpu.gla_layer_step); the
        same outputs as the tensor-op steps of :meth:`mix` (tests/archs/test_gla.py). See
        :meth:`Mixer.cpu_decoding_step`."""
        if not step_cpu.serves_layer("gla_layer_step", like, state, self):
            return None
        modules = self._modules
        names = ["q_proj", "k_proj", "v_proj"] + ([] if modules.get("g_proj") is None else ["g_proj"])
        params = [modules[n]._parameters["weight"] for n in names] + [modules["gk_proj"][0].weight]
        weights = self._decoding_constant("_step_weights", params, lambda: torch.cat(params))
        up, o_norm = modules["gk_proj"][1]._parameters, modules["o_norm"]
        decay = (up["weight"], up["bias"], float(self.gate_normalizer))
        out = (o_norm._parameters["weight"], o_norm.eps, len(names) == 4, self.head_k ** -0.5,
               modules["o_proj"]._parameters["weight"])
        return step_cpu.LayerCall(step_cpu.gla_layer_step, (None, weights, *decay, StateOf("recurrent"), *out),
                                  ("recurrent",))

    def init_state(self, batch_size: int) -> State:
        device = self.q_proj.weight.device
        return {"recurrent": torch.zeros(batch_size, self.num_heads, self.head_k, self.head_v, device=device)}
