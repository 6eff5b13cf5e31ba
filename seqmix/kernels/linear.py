"""The layers' matrix products, ``x W^T (+ b)``, on the CPU through oneDNN where torch's own product (MKL) is
the slower one.

torch multiplies float32 matrices on the CPU with MKL, which runs its generic code path on CPUs of other
vendors than Intel (``MKL_VERBOSE=1`` reports "Intel(R) Architecture processors" there). On an AMD Zen 4 core
oneDNN's product, which torch ships too, takes 0.83-0.91 of MKL's time for a layer's forward and backward at the
tiny LM's shapes (2048 rows of 128-512 features), up to 16% off its training steps, 3-4% off the README's job
(docs/design.md, "Thirteenth round"). So on such CPUs the forward product and the input's gradient go through oneDNN and the weight's
gradient through MKL (oneDNN's, on a transposed input, was no faster); on Intel CPUs, and for float64, small row
counts (decoding), autocast and other devices, :func:`torch.nn.functional.linear` as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from seqmix.kernels.library import forward_outputs

__all__ = ["linear", "onednn_serves"]

# Fewer rows than this (a decoding step, a short prompt) take F.linear: oneDNN's call costs more than it saves.
MIN_ROWS = 64


def _cpu_takes_onednn() -> bool:
    """Whether this CPU takes oneDNN's product: torch has it, and the CPU is not Intel's (MKL's own)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            vendor = next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return False
    return vendor not in ("", "GenuineIntel")


# Decided once, at import: a constant for torch.compile to guard on, not a call to trace.
ONEDNN = _cpu_takes_onednn()


def onednn_serves(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`linear` takes oneDNN's product for input x [..., in] and weight [out, in]."""
    # Rows first: a decoding step's one row settles it at the first check.
    return (ONEDNN and x.numel() >= MIN_ROWS * x.shape[-1] > 0 and x.dim() >= 2 and x.device.type == "cpu"
            and x.dtype == torch.float32 and weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"))


def _product(rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """rows [M, in] times weight [out, in] transposed (+ bias [out]) in oneDNN: [M, out]."""
    return torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """rows [M, in] W^T + b in oneDNN; backward: d rows = dout W in oneDNN (W^T [in, out] as its weight, a
    transposed view: oneDNN reads it in place as fast, where a copy cost 60-240 us), dW = dout^T rows in MKL,
    db = the column sums. An autograd.Function rather than a custom op: its ops are torch's own, with fake
    kernels, so torch.compile traces it as is, and a custom op's dispatch cost ~75 us a call forward and
    backward (a third of a small layer's saving)."""

    @staticmethod
    def forward(ctx, rows, weight, bias):
        ctx.save_for_backward(rows, weight)
        ctx.with_bias = bias is not None
        return forward_outputs(_product(rows, weight, bias))

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        rows, weight = ctx.saved_tensors
        dout = dout.contiguous()
        drows = _product(dout, weight.t(), None) if ctx.needs_input_grad[0] else None
        dweight = torch.mm(dout.t(), rows) if ctx.needs_input_grad[1] else None
        dbias = dout.sum(0) if ctx.with_bias and ctx.needs_input_grad[2] else None
        return drows, dweight, dbias


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x W^T + b as :func:`torch.nn.functional.linear`: x [..., in], weight [out, in], bias [out] or None;
    returns [..., out]. oneDNN's product where :func:`onednn_serves`, else F.linear."""
    if not onednn_serves(x, weight):
        return F.linear(x, weight, bias)
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be [out, {x.shape[-1]}] for x {tuple(x.shape)}, got {tuple(weight.shape)}")
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != weight.shape[:1]):
        raise ValueError(f"bias must be float32 [{weight.shape[0]}], got {bias.dtype} {tuple(bias.shape)}")
    product = _OneDNNLinear.apply if torch.is_grad_enabled() else _product
    out = product(x.reshape(-1, x.shape[-1]), weight.contiguous(), bias)
    return out.view(*x.shape[:-1], weight.shape[0])
