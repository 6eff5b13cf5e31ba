"""Convolutional mixers: LightConv and DynamicConv blocks (Wu et al. 2019) and a gated short conv."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seqmix.archs.mixer import Mixer, State, is_decoding_step, register_mixer, take_step
from seqmix.archs.modules import Linear, ShortConvolution, no_weight_decay
from seqmix.kernels import dynamic_conv, light_conv, step_cpu
from seqmix.kernels.conv.step import dynamic_conv_step
from seqmix.kernels.sequences import in_dtype, reference_dtype
from seqmix.kernels.step_cpu import StateOf


def _packed(x, cu_seqlens):
    """x as [1, L, ...] packed sequences and their [N+1] boundaries (a dense batch is B sequences of T)."""
    if cu_seqlens is not None:
        return x, cu_seqlens.to(torch.int64)
    B, T = x.shape[:2]
    return x.reshape(1, B * T, *x.shape[2:]), torch.arange(B + 1, device=x.device) * T


def _with_prefix(cu, prefix: int):
    """Where each packed token lands when every sequence gets ``prefix`` rows in front, the
    prefix rows' positions ([N, prefix]) and the extended boundaries."""
    n = cu.numel() - 1
    lengths = cu[1:] - cu[:-1]
    cu_ext = cu + torch.arange(n + 1, device=cu.device) * prefix
    seq = torch.repeat_interleave(torch.arange(n, device=cu.device), lengths, output_size=int(cu[-1]))
    tokens = torch.arange(int(cu[-1]), device=cu.device) + (seq + 1) * prefix
    prefix_rows = cu_ext[:-1, None] + torch.arange(prefix, device=cu.device)
    return tokens, prefix_rows, cu_ext


class _ConvBlock(Mixer):
    """Wu et al.'s block around a causal convolution of width K over C channels in H heads:
    ``y = out_proj(conv(glu(in_proj(x))))``. The decoding state is the conv's last K-1 inputs,
    ``{"conv": [N, C, K-1]}`` float32 (float64 after a float64 layer's tokens), oldest first (the layout of
    ``causal_conv1d``'s state)."""

    def __init__(self, hidden_size: int, num_heads: int, kernel_size: int, conv_size: int | None,
                 weight_softmax: bool, dropconnect: float, backend: str | None):
        super().__init__()
        conv_size = hidden_size if conv_size is None else conv_size
        if conv_size % num_heads:
            raise ValueError(f"conv_size={conv_size} is not divisible by num_heads={num_heads}")
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        self.hidden_size, self.num_heads, self.kernel_size, self.conv_size = hidden_size, num_heads, kernel_size, conv_size
        self.weight_softmax, self.dropconnect, self.backend = weight_softmax, dropconnect, backend
        self.in_proj = Linear(hidden_size, 2 * conv_size)
        self.out_proj = Linear(conv_size, hidden_size)
        no_weight_decay(self.in_proj.bias, self.out_proj.bias)

    def conv_weight(self, u: torch.Tensor) -> torch.Tensor:
        """The conv's weight for inputs u [B, T, C]: [H, K] or [B, T, H, K]."""
        raise NotImplementedError

    def _step_kernels(self) -> tuple:
        """The kernels' arguments of step_cpu.dynamic_conv_layer_step: (kernel, kernel_weight, kernel_bias)."""
        raise NotImplementedError

    def cpu_decoding_step(self, like, state):
        """One token as one C++ call (in_proj and the GLU, the kernels, the conv's step and out_proj:
        step_cpu.dynamic_conv_layer_step); the same outputs as the tensor ops of :meth:`mix`
        (tests/archs/test_conv.py). None while DropConnect trains. See :meth:`Mixer.cpu_decoding_step`."""
        if (self.training and self.dropconnect > 0) or not step_cpu.serves_layer("dynamic_conv_layer_step", like,
                                                                                 state, self):
            return None
        in_proj, out_proj = self._modules["in_proj"]._parameters, self._modules["out_proj"]._parameters
        weights = (in_proj["weight"], in_proj["bias"], *self._step_kernels())
        out = (out_proj["weight"], out_proj["bias"])
        options = (self.num_heads, self.weight_softmax)
        return step_cpu.LayerCall(step_cpu.dynamic_conv_layer_step, (None, *weights, *options, StateOf("conv"), *out),
                                  ("conv",))

    def _conv(self, u, weight, cu_seqlens):
        op = dynamic_conv if weight.dim() == 4 else light_conv
        return op(u, weight, padding="causal", weight_softmax=self.weight_softmax,
                  dropconnect=self.dropconnect if self.training else 0.0, cu_seqlens=cu_seqlens, backend=self.backend)

    def mix(self, x, state: State | None, *, cu_seqlens=None):
        step = self.cpu_decoding_step(x, state) if is_decoding_step(x, state, cu_seqlens) else None
        if step is not None:
            return take_step(step, x, state)
        u = F.glu(self.in_proj(x), -1)
        weight = self.conv_weight(u)
        if state is None:
            return self.out_proj(self._conv(u, weight, cu_seqlens)), None
        if is_decoding_step(x, state, cu_seqlens) and not (self.training and self.dropconnect > 0):
            y, conv_state = dynamic_conv_step(u[:, 0], weight if weight.dim() == 2 else weight[:, 0], state["conv"],
                                              self.weight_softmax)
            return self.out_proj(y.unsqueeze(1)), {"conv": conv_state}
        y, conv_state = self._conv_with_state(u, weight, state["conv"], cu_seqlens)
        return self.out_proj(y), {"conv": conv_state}

    def _conv_with_state(self, u, weight, conv_state, cu_seqlens):
        """Each sequence continues from its state: its last K-1 inputs go in front, their outputs are dropped."""
        B, T, C = u.shape
        prefix = self.kernel_size - 1
        u_p, cu = _packed(u, cu_seqlens)
        tokens, prefix_rows, cu_ext = _with_prefix(cu, prefix)
        u_ext = u.new_empty(1, int(cu_ext[-1]), C)
        u_ext[0, tokens] = u_p[0]
        u_ext[0, prefix_rows] = conv_state.transpose(1, 2).to(u.dtype)
        if weight.dim() == 4:  # the prefix rows' outputs are dropped, so their kernels are arbitrary
            w_p, _ = _packed(weight, cu_seqlens)
            w_ext = weight.new_zeros(1, u_ext.shape[1], *weight.shape[2:])
            w_ext[0, tokens] = w_p[0]
            weight = w_ext
        y = self._conv(u_ext, weight, cu_ext)[0, tokens].view(B, T, C)
        last = cu_ext[1:, None] - prefix + torch.arange(prefix, device=u.device)
        return y, in_dtype(u_ext[0, last].transpose(1, 2), reference_dtype(u))

    def init_state(self, batch_size: int) -> State:
        device = self.in_proj.weight.device
        return {"conv": torch.zeros(batch_size, self.conv_size, self.kernel_size - 1, device=device)}


@register_mixer("lightconv")
class LightConv(_ConvBlock):
    """LightConv block: input projection with GLU, a causal lightweight conv (one softmax-normalised
    kernel of width K per head, shared by the head's C/H channels, DropConnect while training), and
    the output projection.

    Args:
        hidden_size: model width.
        num_heads: heads H of the conv (C must be divisible by H).
        kernel_size: conv width K.
        conv_size: conv channels C (default hidden_size).
        weight_softmax: normalise the kernels with a softmax over the K taps.
        dropconnect: DropConnect probability on the normalised kernels while training.
        backend: backend of the conv (None: automatic).
    """

    def __init__(self, hidden_size: int, num_heads: int, kernel_size: int = 15, conv_size: int | None = None,
                 weight_softmax: bool = True, dropconnect: float = 0.0, backend: str | None = None):
        super().__init__(hidden_size, num_heads, kernel_size, conv_size, weight_softmax, dropconnect, backend)
        self.weight = nn.Parameter(torch.empty(num_heads, kernel_size))
        nn.init.xavier_uniform_(self.weight)

    def conv_weight(self, u):
        return self.weight

    def _step_kernels(self):
        return self.weight, None, None


@register_mixer("dynamicconv")
class DynamicConv(_ConvBlock):
    """DynamicConv block: as :class:`LightConv`, but each token's kernels ([H, K]) are predicted by a
    linear layer of the conv's input at that token.

    Args: as :class:`LightConv`.
    """

    def __init__(self, hidden_size: int, num_heads: int, kernel_size: int = 15, conv_size: int | None = None,
                 weight_softmax: bool = True, dropconnect: float = 0.0, backend: str | None = None):
        super().__init__(hidden_size, num_heads, kernel_size, conv_size, weight_softmax, dropconnect, backend)
        self.weight_proj = Linear(self.conv_size, num_heads * kernel_size)
        no_weight_decay(self.weight_proj.bias)

    def conv_weight(self, u):
        return self.weight_proj(u).view(*u.shape[:2], self.num_heads, self.kernel_size)

    def _step_kernels(self):
        proj = self._modules["weight_proj"]._parameters
        return None, proj["weight"], proj["bias"]


@register_mixer("shortconv")
class ShortConv(Mixer):
    """A gated short causal conv as a mixer: ``y = out_proj(silu(conv(v)) * silu(g))`` with v and g
    linear in x and a depthwise causal conv of width ``conv_size`` (``causal_conv1d``, SiLU fused).
    The decoding state is the conv's last ``conv_size - 1`` inputs, ``{"conv": [N, C, W-1]}``.

    Args:
        hidden_size: model width.
        conv_size: conv width W.
        expand: conv channels C = expand * hidden_size.
        backend: backend of the conv (None: automatic).
    """

    def __init__(self, hidden_size: int, conv_size: int = 4, expand: float = 1.0, backend: str | None = None):
        super().__init__()
        self.hidden_size = hidden_size
        channels = math.ceil(expand * hidden_size)
        self.in_proj = Linear(hidden_size, 2 * channels, bias=False)
        self.conv = ShortConvolution(channels, conv_size, backend=backend)
        self.out_proj = Linear(channels, hidden_size, bias=False)

    def mix(self, x, state: State | None, *, cu_seqlens=None):
        step = self.cpu_decoding_step(x, state) if is_decoding_step(x, state, cu_seqlens) else None
        if step is not None:
            return take_step(step, x, state)
        v, g = self.in_proj(x).chunk(2, -1)
        h, conv_state = self.conv(v, None if state is None else state["conv"], cu_seqlens)
        y = self.out_proj(h * F.silu(g))
        return y, None if state is None else {"conv": conv_state}

    def cpu_decoding_step(self, like, state):
        """One token as one C++ call (in_proj, the conv's window step, the gate and out_proj:
        step_cpu.short_conv_layer_step); the same outputs as the module calls of :meth:`mix`
        (tests/archs/test_conv.py). See :meth:`Mixer.cpu_decoding_step`."""
        conv = self._modules["conv"]
        if conv.activation not in (None, "silu") or not step_cpu.serves_layer("short_conv_layer_step", like, state,
                                                                               self):
            return None
        weights = (self._modules["in_proj"]._parameters["weight"], conv._parameters["weight"], conv.bias,
                   conv.activation == "silu")
        out_weight = self._modules["out_proj"]._parameters["weight"]
        return step_cpu.LayerCall(step_cpu.short_conv_layer_step, (None, *weights, StateOf("conv"), out_weight),
                                  ("conv",))

    def init_state(self, batch_size: int) -> State:
        return {"conv": self.conv.init_state(batch_size)}
