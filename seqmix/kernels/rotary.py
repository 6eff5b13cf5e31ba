"""RoPE's rotation of the halves (attention's rotary positions, seqmix/archs/attention.py): y = [x1 cos - x2 sin,
x2 cos + x1 sin] for each head's x = [x1, x2].

On CPU tensors in float32 or float64 the C++ kernel (rotary_cpu.cpp) serves once it is compiled, as a custom op
with autograd (one pass forward; the backward the rotation by the opposite angles, one pass): docs/design.md,
"Twenty-sixth round". Elsewhere, for other dtypes, and where the angles do not repeat along x's rows as the kernel
reads them, the tensor ops (:func:`rotate_halves_reference`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqmix.kernels import cpu
from seqmix.kernels.backend import select_backend
from seqmix.kernels.library import custom_op

__all__ = ["rotate_halves", "rotate_halves_reference"]

DTYPES = (torch.float32, torch.float64)


@custom_op("seqmix::rotary_cpu", mutates_args=())
def _rotate(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> Tensor:
    return cpu.extension().rotate_halves(x, cos, sin, inverse)


@_rotate.register_fake
def _(x, cos, sin, inverse):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])
    ctx.inverse = inputs[3]


def _backward(ctx, dy):
    cos, sin = ctx.saved_tensors
    return _rotate(dy.contiguous(), cos, sin, not ctx.inverse), None, None, None


_rotate.register_autograd(_backward, setup_context=_setup_context)


def rotate_halves_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [..., H, D] rotated by cos, sin broadcast against [..., 1, D/2], in tensor ops."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _unsupported(x: Tensor, cos: Tensor, sin: Tensor) -> str | None:
    """Why the C++ kernel cannot take this call (it reads the angles of row r of x's [R, H, D] rows at r mod P),
    None if it can."""
    if x.dtype not in DTYPES:
        return f"x must be float32 or float64, got {x.dtype}"
    if cos.dtype != x.dtype or sin.dtype != x.dtype:
        return "cos and sin must have x's dtype"
    lead, positions = x.shape[:-2], cos.shape[:-2]
    if (cos.shape[-2:] != (1, x.shape[-1] // 2) or sin.shape != cos.shape
            or lead[len(lead) - len(positions):] != positions):
        return f"cos [*P, 1, D/2] must have x's trailing positions P, got {tuple(cos.shape)} for x {tuple(x.shape)}"
    if x.stride(-1) != 1 or (x.shape[-2] > 1 and x.stride(-2) != x.shape[-1]):
        return "x's heads must be contiguous"
    return None


def rotate_halves(x: Tensor, cos: Tensor, sin: Tensor, *, backend: str | None = None) -> Tensor:
    """x [..., H, D] (D even) rotated by the angles whose cos and sin are [*P, 1, D/2], P the trailing dims of
    x's [...] (the positions: [T] for a dense [B, T, H, D], [L] for packed tokens, [B, 1] for a decoding step),
    all of one dtype; returns [..., H, D] in x's dtype.

    ``backend``: None (automatic: ``"cpu"`` on CPU tensors in float32 or float64 once the C++ kernels are
    compiled, else ``"reference"``), ``"cpu"`` (builds them) or ``"reference"``.
    """
    name = select_backend("rotate_halves", backend, x.device, ("cpu", "reference"), {"cpu": _unsupported(x, cos, sin)},
                          build_cpu=False)
    if name == "reference":
        return rotate_halves_reference(x, cos, sin)
    half, H, D = x.shape[-1] // 2, x.shape[-2], x.shape[-1]
    rows = x.reshape(-1, H, D)  # a view: the rows of q, k (a split projection) are a stride apart
    out = _rotate(rows, cos.reshape(-1, half).contiguous(), sin.reshape(-1, half).contiguous(), False)
    return out.view(x.shape)
