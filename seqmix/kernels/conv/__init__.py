"""Convolutions: the short causal depthwise conv used inside the recurrent mixers, and LightConv /
DynamicConv (in :mod:`.dynamic`)."""

from __future__ import annotations

import torch
from torch import Tensor

from seqmix.kernels import triton_limits
from seqmix.kernels.backend import LazyModule, select_backend
from seqmix.kernels.checks import check_sequences, check_tensor
from seqmix.kernels.conv import cpu as cpu_kernels
from seqmix.kernels.conv import cuda as cuda_ops
from seqmix.kernels.conv.dynamic import dynamic_conv, light_conv
from seqmix.kernels.conv.reference import causal_conv1d_reference, causal_conv1d_update_reference
from seqmix.kernels.library import custom_op
from seqmix.kernels.op import FusedOp, as_input_grads, chunking_of, fake_outputs, or_empty, register_autograd, run_fused
from seqmix.kernels.sequences import packed_bounds
from seqmix.kernels.triton_limits import CONV_CHUNK

__all__ = [
    "causal_conv1d", "causal_conv1d_reference", "causal_conv1d_update", "causal_conv1d_update_reference",
    "dynamic_conv", "light_conv",
]

kernels = LazyModule("seqmix.kernels.conv.triton")

ACTIVATIONS = (None, "silu")


# The Triton kernels as torch.library ops (the protocol of seqmix/kernels/op.py): x [L, D] packed,
# weight [D, W], bias [D], h0 [N, D, W-1] float32. A width-1 conv has an empty state: nothing to read
# or write, nothing to launch for.

@custom_op("seqmix::causal_conv1d_chunk_fwd", mutates_args=())
def _chunk_fwd(x: Tensor, weight: Tensor, bias: Tensor | None, h0: Tensor | None, cu_seqlens: Tensor,
               chunk_index: Tensor, chunk_offsets: Tensor, silu: bool, store_final: bool) -> tuple[Tensor, Tensor]:
    chunking = chunking_of(cu_seqlens, chunk_index, chunk_offsets, CONV_CHUNK)
    W = weight.shape[1]
    out, ht = kernels.causal_conv1d_fwd(x, weight, bias, h0 if W > 1 else None, chunking, silu, store_final)
    if store_final and ht is None:
        ht = x.new_zeros(chunking.num_sequences, x.shape[1], 0, dtype=torch.float32)
    return out, or_empty(ht, x)


@_chunk_fwd.register_fake
def _(x, weight, bias, h0, cu_seqlens, chunk_index, chunk_offsets, silu, store_final):
    return fake_outputs(x, x.shape, (cu_seqlens.shape[0] - 1, x.shape[1], weight.shape[1] - 1), store_final)


@custom_op("seqmix::causal_conv1d_chunk_bwd", mutates_args=())
def _chunk_bwd(x: Tensor, weight: Tensor, bias: Tensor | None, h0: Tensor | None, cu_seqlens: Tensor,
               chunk_index: Tensor, chunk_offsets: Tensor, silu: bool, store_final: bool, dout: Tensor,
               dht: Tensor | None, needs: list[bool]) -> list[Tensor]:
    chunking = chunking_of(cu_seqlens, chunk_index, chunk_offsets, CONV_CHUNK)
    wide = weight.shape[1] > 1
    need_dh0 = h0 is not None and needs[3]
    # dht is None for a width-1 conv: its empty final state carries no gradient (seqmix/kernels/op.py).
    dx, dw, db, dh0 = kernels.causal_conv1d_bwd(x, weight, bias, h0 if wide else None, chunking, silu, dout, dht,
                                                need_dh0 and wide)
    if need_dh0 and not wide:
        dh0 = torch.zeros_like(h0)
    inputs = (x, weight, bias, h0, cu_seqlens, chunk_index, chunk_offsets)
    return as_input_grads((dx, dw, db, dh0, None, None, None), inputs, needs, x)


register_autograd(_chunk_fwd, _chunk_bwd, num_inputs=7)

FUSED = FusedOp(CONV_CHUNK, _chunk_fwd)


@custom_op("seqmix::causal_conv1d_update_triton", mutates_args=("state",))
def _update(x: Tensor, state: Tensor, weight: Tensor, bias: Tensor | None, silu: bool) -> Tensor:
    """x [N, T, D]; state [N, D, W-1], updated in place. Returns out [N, T, D]."""
    return kernels.causal_conv1d_update(x, state, weight, bias, silu)


@_update.register_fake
def _(x, state, weight, bias, silu):
    return torch.empty_like(x)


def _check_conv(x, x_dims, weight, bias, activation):
    """The arguments causal_conv1d and its update share; returns (B, T, D, W)."""
    check_tensor("x", x, (None, None, None), dims=x_dims)
    B, T, D = x.shape
    check_tensor("weight", weight, (D, None), dims="[D, W]", like=x)
    W = weight.shape[1]
    if W < 1:
        raise ValueError(f"weight must have shape [D, W] with W >= 1, got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, (D,), dims="[D]", like=x)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return B, T, D, W


def _cuda_causal_conv1d(x, weight, bias, activation, initial_state, output_final_state, cu_seqlens):
    B, T, D = x.shape
    h0 = None if initial_state is None else initial_state.float().contiguous()
    out, ht = cuda_ops.causal_conv1d_fwd(
        x.reshape(B * T, D).contiguous(), weight.to(x.dtype).contiguous(),
        None if bias is None else bias.to(x.dtype).contiguous(), h0, packed_bounds(B, T, x.device, cu_seqlens),
        activation == "silu", output_final_state,
    )
    return out.view(B, T, D), ht if output_final_state else None


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Depthwise causal convolution of any width W:
    ``out[t, d] = act(bias[d] + sum_j weight[d, j] * x[t - (W-1) + j, d])``.

    ``weight[:, -1]`` multiplies the current token, as ``F.conv1d`` with W-1 zeros
    of left padding; before a sequence's first token the taps read the state.

    Args:
        x: [B, T, D] inputs.
        weight: [D, W] per-channel taps.
        bias: [D] or None.
        activation: None or ``"silu"``.
        initial_state: [N, D, W-1], the last W-1 inputs before each sequence, oldest first.
        output_final_state: also return the state after the last token.
        cu_seqlens: [N+1] boundaries of sequences packed as ``[1, sum(T_i), D]``.
        backend: None (automatic), ``"reference"``, ``"triton"``, ``"cuda"`` (the compiled
            extension: named, or through ``SEQMIX_BACKEND``; on CUDA tensors the automatic choice
            prefers Triton) or ``"cpu"`` (the C++ CPU kernels, W <= 16, computing as the reference
            does: float32, float64 for float64 inputs). On CPU tensors the automatic choice takes
            ``"cpu"`` only where those are compiled already (``python -m seqmix.kernels.build``; a
            call never waits for the compile, which ``backend="cpu"`` runs), else Triton's
            interpreter when it is on, else the reference.

    Returns:
        out: [B, T, D] in x's dtype.
        final_state: [N, D, W-1] float32 (float64 for float64 inputs), or None.
    """
    B, T, D, W = _check_conv(x, "[B, T, D]", weight, bias, activation)
    check_sequences(cu_seqlens, initial_state, (D, W - 1), dims="[N, D, W-1]", like=x)
    name = select_backend("causal_conv1d", backend, x.device, ("cpu", "triton", "cuda", "reference"),
                          {"triton": triton_limits.unsupported("x", x.dtype), "cuda": cuda_ops.unsupported(x.dtype),
                           "cpu": cpu_kernels.unsupported(W)}, build_cpu=False)
    if name == "cpu" and T > 0:
        return cpu_kernels.causal_conv1d_cpu(x, weight, bias, activation, initial_state, output_final_state, cu_seqlens)
    if name == "triton" and T > 0:
        return run_fused(FUSED, (x,), (weight, bias), initial_state, (activation == "silu",), output_final_state,
                         cu_seqlens)
    if name == "cuda" and T > 0:
        return _cuda_causal_conv1d(x, weight, bias, activation, initial_state, output_final_state, cu_seqlens)
    return causal_conv1d_reference(x, weight, bias, activation, initial_state, output_final_state, cu_seqlens)


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Decoding step of :func:`causal_conv1d`: a few new tokens per sequence continue from
    ``conv_state``, which is updated in place to the state after them.

    Args:
        x: [B, D] one token per sequence, or [B, T, D] T tokens per sequence.
        conv_state: [B, D, W-1], the last W-1 inputs of each sequence, oldest first (any float
            dtype; ``causal_conv1d``'s final states are float32). Overwritten with the state after x.
        weight: [D, W]; bias: [D] or None; activation: None or ``"silu"``.
        backend: None (automatic), ``"reference"``, ``"triton"`` or ``"cuda"``. The fused kernels
            compute no gradients, so calls that need them go to the reference; the CUDA kernel
            takes a float32 ``conv_state``.

    Returns:
        out: x's shape and dtype.
    """
    if isinstance(x, torch.Tensor) and x.dim() == 2:
        return causal_conv1d_update(x.unsqueeze(1), conv_state, weight, bias, activation, backend=backend).squeeze(1)
    B, T, D, W = _check_conv(x, "[B, D] or [B, T, D]", weight, bias, activation)
    check_tensor("conv_state", conv_state, (B, D, W - 1), dims="[B, D, W-1]", like=x)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    no_grad = "the update kernels compute no gradients" if needs_grad else None
    name = select_backend("causal_conv1d_update", backend, x.device, ("triton", "cuda", "reference"), {
        "triton": triton_limits.unsupported("x", x.dtype) or no_grad,
        "cuda": cuda_ops.unsupported(x.dtype) or no_grad or (
            None if conv_state.dtype == torch.float32 else f"conv_state must be float32, got {conv_state.dtype}"),
    })
    if name == "reference" or T == 0 or W == 1:  # width 1 has no state to read or write
        return causal_conv1d_update_reference(x, conv_state, weight, bias, activation)
    if not conv_state.is_contiguous():
        raise ValueError("conv_state must be contiguous: the fused kernels update it in place")
    b = None if bias is None else bias.to(x.dtype).contiguous()
    if name == "cuda":
        return cuda_ops.causal_conv1d_update(x.contiguous(), conv_state, weight.to(x.dtype).contiguous(), b,
                                             activation == "silu")
    return _update(x.contiguous(), conv_state, weight.contiguous(), b, activation == "silu")
