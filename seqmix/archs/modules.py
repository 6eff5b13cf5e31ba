"""Building blocks shared by the mixers: normalisation and the short causal convolution."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from seqmix.archs.mixer import is_decoding_step
from seqmix.kernels import causal_conv1d, causal_conv1d_update, rms_norm, step_cpu
from seqmix.kernels.conv.step import causal_conv1d_step
from seqmix.kernels.library import forward_outputs
from seqmix.kernels.linear import linear
from seqmix.kernels.backend import select_backend
from seqmix.kernels.norm import l2_norm_cpu, rms_norm_reference
from seqmix.kernels.sequences import in_dtype, reference_dtype


def no_weight_decay(*params: nn.Parameter | None) -> None:
    """Mark parameters the optimiser must not decay (``seqmix.train`` reads the flag): norm weights,
    biases and the state-space parameters (A_log, dt_bias, D), which are rates and offsets, not
    weights to shrink towards zero. None entries (an absent bias) are skipped."""
    for p in params:
        if p is not None:
            p.no_weight_decay = True


def _l2_normalize(x, eps):
    """(x * r, r) with r = rsqrt(sum(x^2) + eps) [..., 1]: one reduction pass and one product."""
    r = torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().add_(eps))
    return x * r, r


class Linear(nn.Linear):
    """nn.Linear computed by :func:`seqmix.kernels.linear.linear` (oneDNN's product on the CPUs where it is
    faster than MKL's, F.linear elsewhere): the layers' projections. Same parameters and state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class _L2Normalize(torch.autograd.Function):
    """y = x * r, r = rsqrt(sum(x^2) + eps) over the last dim. Backward dx = r * (dy - y * sum(dy * y)), y
    recomputed from x and r (saves no [..., D] tensor but x): two fresh buffers, six passes."""

    @staticmethod
    def forward(ctx, x, eps):
        y, r = _l2_normalize(x, eps)
        ctx.save_for_backward(x, r)
        return forward_outputs(y)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, r = ctx.saved_tensors
        y = x * r
        dot = torch.mul(dy, y).sum(-1, keepdim=True)
        return y.mul_(dot.neg_()).add_(dy).mul_(r), None


L2_NORM_EPS = 1e-6  # l2_normalize's default; the C++ decoding step of the DeltaNet layers takes it too


def l2_normalize(x: torch.Tensor, eps: float = L2_NORM_EPS) -> torch.Tensor:
    """x / sqrt(||x||^2 + eps) over the last dim, computed in float32 (float64 for float64 inputs). For training
    on the CPU the C++ kernels once compiled (one pass each way: docs/design.md, "Twenty-sixth round"), else the
    tensor ops with a hand-written backward."""
    if not torch.is_grad_enabled():
        if step_cpu.serves_when_ready(x):  # decoding: one C++ call
            return step_cpu.row_norm(x, None, None, eps, False)
        # The forward alone: an autograd.Function's call costs more than its few ops.
        return in_dtype(_l2_normalize(in_dtype(x, reference_dtype(x)), eps)[0], x.dtype)
    x32 = in_dtype(x, reference_dtype(x))
    if select_backend("l2_normalize", None, x.device, ("cpu", "reference"), build_cpu=False) == "cpu":
        return in_dtype(l2_norm_cpu(x32, eps), x.dtype)
    return in_dtype(_L2Normalize.apply(x32, eps), x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim; with a gate, the output is multiplied by silu(gate). Computed in float32
    (float64 for float64 inputs) with a hand-written backward."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        no_weight_decay(self.weight)

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        if torch.is_grad_enabled():
            return rms_norm(x, self.weight, gate, self.eps)
        # Without autograd (decoding, evaluation) one C++ call on CPU tensors once built, else the tensor ops;
        # neither is a recorded choice (step_cpu.serves_when_ready). A gate that broadcasts keeps the tensor ops.
        if (gate is None or gate.shape == x.shape) and step_cpu.serves_when_ready(x):
            return step_cpu.row_norm(x, self.weight, gate, self.eps, True)
        return rms_norm_reference(x, self.weight, gate, self.eps)


class ShortConvolution(nn.Module):
    """Depthwise causal convolution of width ``kernel_size`` over [B, T, dim], SiLU by default.

    Its decoding state is the last ``kernel_size - 1`` inputs, [N, dim, kernel_size-1].
    """

    def __init__(self, dim: int, kernel_size: int = 4, activation: str | None = "silu", bias: bool = False,
                 backend: str | None = None):
        super().__init__()
        self.dim, self.kernel_size, self.activation = dim, kernel_size, activation
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(dim, kernel_size))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        no_weight_decay(self.bias)
        # As nn.Conv1d's default: uniform in +-1/sqrt(fan_in), fan_in = kernel_size for depthwise.
        nn.init.uniform_(self.weight, -1 / math.sqrt(kernel_size), 1 / math.sqrt(kernel_size))

    def forward(self, x, state=None, cu_seqlens=None):
        """x [B, T, dim]; state [N, dim, kernel_size-1] or None. Returns (out [B, T, dim], the new state or None).

        One dense token with a state is a decoding step; the state passed in stays valid, as every mixer's
        does. On CUDA without autograd it is :func:`causal_conv1d_update` (one fused kernel) on a copy of the
        state; otherwise the window form of :func:`causal_conv1d_step` (differentiable, no copy)."""
        if is_decoding_step(x, state, cu_seqlens):
            if x.is_cuda and not torch.is_grad_enabled():
                new_state = state.clone()
                out = causal_conv1d_update(x, new_state, self.weight, self.bias, self.activation, backend=self.backend)
                return out, new_state
            out, new_state = causal_conv1d_step(x[:, 0], self.weight, self.bias, self.activation, state)
            return out.unsqueeze(1), new_state
        return causal_conv1d(
            x, self.weight, self.bias, activation=self.activation, initial_state=state,
            output_final_state=state is not None, cu_seqlens=cu_seqlens, backend=self.backend,
        )

    def init_state(self, batch_size: int) -> torch.Tensor:
        return torch.zeros(batch_size, self.dim, self.kernel_size - 1, device=self.weight.device)
