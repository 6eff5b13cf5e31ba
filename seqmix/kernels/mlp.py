"""The SwiGLU activation of the LM's MLP, ``silu(gate) * up`` (seqmix/archs/lm.py, SwiGLU).

On CPU tensors in float32 or float64 the C++ kernels (swiglu_cpu.cpp) serve once they are compiled, as custom ops
with autograd (one pass forward, one backward, recomputing the sigmoid: docs/design.md, "Fifth round: the short
conv walks rows; a fused SwiGLU"); elsewhere, and for other dtypes, the tensor ops (:func:`swiglu_reference`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from seqmix.kernels import cpu
from seqmix.kernels.backend import select_backend
from seqmix.kernels.checks import check_same_dtype, check_tensor
from seqmix.kernels.library import custom_op

__all__ = ["swiglu", "swiglu_reference"]

DTYPES = (torch.float32, torch.float64)


@custom_op("seqmix::swiglu_cpu_fwd", mutates_args=())
def _fwd(gate: Tensor, up: Tensor) -> Tensor:
    return cpu.extension().swiglu_fwd(gate, up)


@_fwd.register_fake
def _(gate, up):
    return torch.empty_like(gate)


@custom_op("seqmix::swiglu_cpu_bwd", mutates_args=())
def _bwd(gate: Tensor, up: Tensor, dh: Tensor) -> tuple[Tensor, Tensor]:
    dgate, dup = cpu.extension().swiglu_bwd(gate, up, dh)
    return dgate, dup


@_bwd.register_fake
def _(gate, up, dh):
    return torch.empty_like(gate), torch.empty_like(up)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dh):
    gate, up = ctx.saved_tensors
    return _bwd(gate, up, dh.contiguous())


_fwd.register_autograd(_backward, setup_context=_setup_context)


def swiglu_reference(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up in tensor ops."""
    return F.silu(gate) * up


def swiglu(gate: Tensor, up: Tensor, *, backend: str | None = None) -> Tensor:
    """silu(gate) * up for gate, up [..., I] of one shape and dtype; returns [..., I] in that dtype.

    ``backend``: None (automatic: ``"cpu"`` on CPU tensors in float32 or float64 once the C++ kernels are
    compiled, else ``"reference"``), ``"cpu"`` (builds them) or ``"reference"``.
    """
    if not isinstance(gate, Tensor) or gate.dim() == 0:
        got = tuple(gate.shape) if isinstance(gate, Tensor) else type(gate).__name__
        raise ValueError(f"gate must be a tensor of shape [..., I], got {got}")
    check_tensor("gate", gate, (None,) * gate.dim(), dims="[..., I]")
    check_tensor("up", up, tuple(gate.shape), dims="[..., I] (gate's shape)", like=gate)
    check_same_dtype(("gate", "up"), (gate, up))
    unsupported = None if gate.dtype in DTYPES else f"gate and up must be float32 or float64, got {gate.dtype}"
    name = select_backend("swiglu", backend, gate.device, ("cpu", "reference"), {"cpu": unsupported},
                          build_cpu=False)
    if name == "reference":
        return swiglu_reference(gate, up)
    return _fwd(gate.contiguous(), up.contiguous())
