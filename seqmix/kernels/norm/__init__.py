"""Normalisation: RMSNorm, gated or not (``rms_norm``, the layers' norms), and the fused residual add + RMSNorm
(``add_rms_norm``) of the sandwich norms and pre-norm blocks."""

from __future__ import annotations

import torch
from torch import Tensor

from seqmix.kernels import cpu, step_cpu, triton_limits
from seqmix.kernels.backend import LazyModule, select_backend
from seqmix.kernels.checks import check_eps, check_same_dtype, check_tensor
from seqmix.kernels.library import custom_op
from seqmix.kernels.norm.reference import add_rms_norm_reference, rms_norm_reference
from seqmix.kernels.op import nothing, or_empty, register_autograd
from seqmix.kernels.sequences import in_dtype, reference_dtype

__all__ = ["add_rms_norm", "add_rms_norm_backend", "add_rms_norm_reference", "l2_norm_cpu", "rms_norm",
           "rms_norm_reference"]

kernels = LazyModule("seqmix.kernels.norm.triton")


# The Triton kernels as torch.library ops (autograd through seqmix/kernels/op.py): rows x, residual [M, D],
# weight [D]. The new residual h = x + residual stands in the protocol's "final state" slot (an empty
# tensor without a residual); the backward reads h (x itself without a residual), the weight and rstd.

@custom_op("seqmix::add_rms_norm_fwd", mutates_args=())
def _fwd(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (normed [M, D], h [M, D] or an empty tensor, and for the backward rstd [M] float32)."""
    normed, h, rstd = kernels.add_rms_norm_fwd(x, residual, weight, eps)
    return normed, or_empty(h, x), rstd


@_fwd.register_fake
def _(x, residual, weight, eps):
    h = nothing(x) if residual is None else torch.empty_like(x)
    return torch.empty_like(x), h, x.new_empty((x.shape[0],), dtype=torch.float32)


@custom_op("seqmix::add_rms_norm_bwd", mutates_args=())
def _bwd(h: Tensor, weight: Tensor, rstd: Tensor, eps: float, dnormed: Tensor | None, dh_out: Tensor | None,
         needs: list[bool]) -> list[Tensor]:
    """Gradients (dh [M, D], the one x and residual share; dweight [D] in weight's dtype or an empty tensor)."""
    dh, dweight = kernels.add_rms_norm_bwd(h, weight, rstd, dnormed, dh_out)
    return [dh, dweight.to(weight.dtype) if needs[2] else nothing(h)]


@_bwd.register_fake
def _(h, weight, rstd, eps, dnormed, dh_out, needs):
    return [torch.empty_like(h), torch.empty_like(weight) if needs[2] else nothing(h)]


def _saved(inputs, output):
    x, residual, weight, _ = inputs
    return x if residual is None else output[1], weight, output[2]


# x and residual share dh. An output nobody uses gets no gradient tensor: the sandwich norms' unused sums
# cost the backward nothing.
register_autograd(_fwd, _bwd, num_inputs=3, saved=_saved, per_input=lambda g: (g[0], g[0], g[1]),
                  materialize_grads=False)


def _check(x, residual, weight, eps):
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] == 0:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor of shape [..., D] with D >= 1, got {got}")
    check_tensor("x", x, (None,) * x.dim(), dims="[..., D]")
    D = x.shape[-1]
    if residual is not None:
        check_tensor("residual", residual, tuple(x.shape), dims="[..., D] (x's shape)", like=x)
        check_same_dtype(("x", "residual"), (x, residual))
    check_tensor("weight", weight, (D,), dims="[D]", like=x)
    check_eps("eps", eps)


def add_rms_norm_backend(x: torch.Tensor, backend: str | None = None) -> str:
    """The backend :func:`add_rms_norm` takes for tensors like x (``backend`` as the op's argument): a layer
    that calls the op many times per forward resolves it once and names it. The automatic choice takes the
    C++ CPU kernels only once they are compiled, as :func:`rms_norm` does."""
    return select_backend("add_rms_norm", backend, x.device, ("triton", "cpu", "reference"),
                          {"triton": triton_limits.unsupported("x", x.dtype)}, build_cpu=False)


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add and RMSNorm in one pass: ``h = x + residual``, ``normed = h / sqrt(mean(h^2) + eps) * weight``.

    The sum is rounded to x's dtype before it is normalised, so ``normed`` is exactly the RMSNorm
    of the returned ``h`` (the stream a pre-norm block carries on); sum and norm are computed in
    float32. Gradients flow into x, residual and weight from both outputs.

    Args:
        x: [..., D], e.g. a sublayer's output [B, T, D].
        residual: [..., D] like x (same dtype), or None (then ``h`` is x itself: a plain RMSNorm).
        weight: [D] (any float dtype).
        eps: added to the mean square.
        backend: None (automatic: ``"triton"`` where it runs, else ``"cpu"`` on CPU tensors once the C++
            kernels are compiled, else ``"reference"``), ``"triton"``, ``"cpu"`` (the sum in one tensor op,
            the norm in :func:`rms_norm`'s C++ kernels; builds them) or ``"reference"``.

    Returns:
        normed: [..., D] in x's dtype.
        new_residual: [..., D] ``h``, in x's dtype.
    """
    _check(x, residual, weight, eps)
    name = add_rms_norm_backend(x, backend)
    if name == "reference" or x.numel() == 0:
        return add_rms_norm_reference(x, residual, weight, eps)
    if name == "cpu":
        h = x if residual is None else x + residual
        return _rms_norm_cpu(h, weight, None, eps), h
    D = x.shape[-1]
    x2d = x.reshape(-1, D).contiguous()
    if residual is None:
        return _fwd(x2d, None, weight.contiguous(), float(eps))[0].view(x.shape), x
    normed, h, _ = _fwd(x2d, residual.reshape(-1, D).contiguous(), weight.contiguous(), float(eps))
    return normed.view(x.shape), h.view(x.shape)


# The C++ kernels of RMSNorm for training (norm/rms_norm_cpu.cpp) as torch.library ops: rows x [M, D], weight
# [D], gate [M, D] or None, all in one dtype, float32 or float64. The backward reads the inputs and rstd [M].

@custom_op("seqmix::rms_norm_cpu_fwd", mutates_args=())
def _rms_fwd(x: Tensor, weight: Tensor, gate: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """Returns (y [M, D], rstd [M])."""
    y, rstd = cpu.extension().rms_norm_fwd(x, weight, gate, eps)
    return y, rstd


@_rms_fwd.register_fake
def _(x, weight, gate, eps):
    return torch.empty_like(x), x.new_empty((x.shape[0],))


@custom_op("seqmix::rms_norm_cpu_bwd", mutates_args=())
def _rms_bwd(x: Tensor, weight: Tensor, gate: Tensor | None, rstd: Tensor, dy: Tensor) -> list[Tensor]:
    """Returns [dx [M, D], dweight [D], dgate [M, D] (an empty tensor without a gate)]."""
    dx, dweight, dgate = cpu.extension().rms_norm_bwd(x, weight, gate, rstd, dy)
    return [dx, dweight, nothing(x) if gate is None else dgate]


@_rms_bwd.register_fake
def _(x, weight, gate, rstd, dy):
    return [torch.empty_like(x), torch.empty_like(weight), nothing(x) if gate is None else torch.empty_like(x)]


def _rms_setup_context(ctx, inputs, output):
    x, weight, gate, _ = inputs
    ctx.save_for_backward(x, weight, gate, output[1])


def _rms_backward(ctx, dy, _drstd):
    x, weight, gate, rstd = ctx.saved_tensors
    dx, dweight, dgate = _rms_bwd(x, weight, gate, rstd, dy.contiguous())
    return dx, dweight, None if gate is None else dgate, None


_rms_fwd.register_autograd(_rms_backward, setup_context=_rms_setup_context)


# The C++ kernels of the L2 norm for training (rms_norm_cpu.cpp's end): rows x [M, D] float32 or float64. The
# backward reads x and rstd [M].

@custom_op("seqmix::l2_norm_cpu_fwd", mutates_args=())
def _l2_fwd(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Returns (y [M, D], rstd [M])."""
    y, rstd = cpu.extension().l2_norm_fwd(x, eps)
    return y, rstd


@_l2_fwd.register_fake
def _(x, eps):
    return torch.empty_like(x), x.new_empty((x.shape[0],))


@custom_op("seqmix::l2_norm_cpu_bwd", mutates_args=())
def _l2_bwd(x: Tensor, rstd: Tensor, dy: Tensor) -> Tensor:
    return cpu.extension().l2_norm_bwd(x, rstd, dy)


@_l2_bwd.register_fake
def _(x, rstd, dy):
    return torch.empty_like(x)


def _l2_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[1])


def _l2_backward(ctx, dy, _drstd):
    x, rstd = ctx.saved_tensors
    return _l2_bwd(x, rstd, dy.contiguous()), None


_l2_fwd.register_autograd(_l2_backward, setup_context=_l2_setup_context)


def l2_norm_cpu(x: Tensor, eps: float) -> Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim of x [..., D] (float32 or float64, on the CPU) in the C++
    kernels, with autograd: seqmix/archs/modules.py's l2_normalize for training, which checks and chooses."""
    y, _ = _l2_fwd(x.reshape(-1, x.shape[-1]).contiguous(), float(eps))
    return y.view(x.shape)


def rms_norm(x: Tensor, weight: Tensor, gate: Tensor | None = None, eps: float = 1e-5, *,
             backend: str | None = None) -> Tensor:
    """RMSNorm over the last dim, gated or not: ``x / sqrt(mean(x^2) + eps) * weight [* silu(gate)]``, computed
    in float32 (float64 for float64 x).

    Args:
        x: [..., D].
        weight: [D] (any float dtype).
        gate: None, or [..., D] like x; a gate that broadcasts to x's shape takes the reference.
        eps: added to the mean square.
        backend: None (automatic: ``"cpu"`` on CPU tensors once the C++ kernels are compiled, else
            ``"reference"``), ``"cpu"`` (builds them) or ``"reference"``.

    Returns:
        [..., D] in x's dtype. Gradients flow into x, weight and gate.
    """
    _check(x, None, weight, eps)
    if gate is not None:
        check_tensor("gate", gate, (None,) * gate.dim(), dims="[..., D] (broadcasting to x's shape)", like=x)
    fits = None if gate is None or gate.shape == x.shape else f"gate {tuple(gate.shape)} is not x's shape"
    name = select_backend("rms_norm", backend, x.device, ("cpu", "reference"), {"cpu": fits}, build_cpu=False)
    if name == "reference":
        return rms_norm_reference(x, weight, gate, eps)
    return _rms_norm_cpu(x, weight, gate, eps)


def _rms_norm_cpu(x: Tensor, weight: Tensor, gate: Tensor | None, eps: float) -> Tensor:
    """:func:`rms_norm` in the C++ kernels on checked inputs (gate None or x's shape), in float32 (float64 for
    float64 x), returned in x's dtype."""
    if not torch.is_grad_enabled():  # the forward alone, one call (its glue below costs more than a row's norm)
        return step_cpu.row_norm(x, weight, gate, eps, True)
    dt, D = reference_dtype(x), x.shape[-1]
    rows = in_dtype(x, dt).reshape(-1, D).contiguous()
    gate_rows = None if gate is None else in_dtype(gate, dt).reshape(-1, D).contiguous()
    y, _ = _rms_fwd(rows, in_dtype(weight, dt).contiguous(), gate_rows, float(eps))
    return in_dtype(y.view(x.shape), x.dtype)
