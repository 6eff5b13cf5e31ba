"""The C++ CPU short causal conv for training (conv_cpu.cpp, built by seqmix/kernels/cpu.py) as torch.library
ops, in the protocol of seqmix/kernels/op.py.

Inputs arrive packed like the Triton kernels' (x ``[L, D]``), but everything, the initial state included, in
the compute dtype (float32, or float64 for float64 inputs; the caller converts half-precision inputs as the
reference does): the kernels compute in that dtype and return the final state and every gradient in it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqmix.kernels import cpu
from seqmix.kernels.library import custom_op
from seqmix.kernels.op import FusedOp, as_input_grads, nothing, register_autograd, run_fused
from seqmix.kernels.sequences import in_dtype, reference_dtype

# Tokens per task (with a block of 256 channels): enough that the W-1 tokens a backward task recomputes after
# its chunk cost little, few enough that a batch of two long sequences still spreads over the threads.
CHUNK = 256
MAX_WIDTH = 16  # vec_cpu.h's kMaxConvWidth: the size of the kernels' per-vector arrays of taps, inputs and dpre


def unsupported(width: int) -> str | None:
    """Why the C++ kernels cannot take a conv of ``width`` taps; None if they can."""
    if width > MAX_WIDTH:
        return f"weight must have at most {MAX_WIDTH} taps (W), got {width}"
    return None


@custom_op("seqmix::causal_conv1d_cpu_chunk_fwd", mutates_args=())
def _chunk_fwd(x: Tensor, weight: Tensor, bias: Tensor | None, h0: Tensor | None, cu_seqlens: Tensor,
               chunk_index: Tensor, chunk_offsets: Tensor, silu: bool, store_final: bool) -> tuple[Tensor, Tensor]:
    """Returns (out [L, D], final state [N, D, W-1] or an empty tensor), both in x's dtype."""
    out, ht = cpu.extension().causal_conv1d_fwd(x, weight, bias, h0, cu_seqlens, chunk_index, CHUNK, silu,
                                                store_final)
    return out, ht


@_chunk_fwd.register_fake
def _(x, weight, bias, h0, cu_seqlens, chunk_index, chunk_offsets, silu, store_final):
    final = x.new_empty((cu_seqlens.shape[0] - 1, x.shape[1], weight.shape[1] - 1)) if store_final else nothing(x)
    return x.new_empty(x.shape), final


@custom_op("seqmix::causal_conv1d_cpu_chunk_bwd", mutates_args=())
def _chunk_bwd(x: Tensor, weight: Tensor, bias: Tensor | None, h0: Tensor | None, cu_seqlens: Tensor,
               chunk_index: Tensor, chunk_offsets: Tensor, silu: bool, store_final: bool, dout: Tensor | None,
               dht: Tensor | None, needs: list[bool]) -> list[Tensor]:
    if dout is None:  # only the final state was used
        dout = torch.zeros_like(x)
    dx, dw, db, dh0 = cpu.extension().causal_conv1d_bwd(
        x, weight, bias, h0, cu_seqlens, chunk_index, CHUNK, silu, dout, dht, needs[0], needs[1] or needs[2],
        h0 is not None and needs[3])
    inputs = (x, weight, bias, h0, cu_seqlens, chunk_index, chunk_offsets)
    return as_input_grads((dx, dw, db, dh0, None, None, None), inputs, needs, x)


# Gradients not materialized: an unused final state's gradient is None, not a tensor of zeros to read.
register_autograd(_chunk_fwd, _chunk_bwd, num_inputs=7, materialize_grads=False)

FUSED = FusedOp(CHUNK, _chunk_fwd)


def causal_conv1d_cpu(x, weight, bias, activation, initial_state, output_final_state, cu_seqlens):
    """:func:`seqmix.kernels.causal_conv1d` on the C++ kernels (T > 0): computed in float32 (float64 for
    float64 x) as the reference is, out cast back to x's dtype."""
    dtype = reference_dtype(x)
    params = (in_dtype(weight, dtype), None if bias is None else in_dtype(bias, dtype))
    out, final = run_fused(FUSED, (in_dtype(x, dtype),), params, initial_state, (activation == "silu",),
                           output_final_state, cu_seqlens)
    return in_dtype(out, x.dtype), final
