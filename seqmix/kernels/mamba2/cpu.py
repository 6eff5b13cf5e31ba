"""The C++ CPU SSD (ssd_cpu.cpp, built by seqmix/kernels/cpu.py) as torch.library ops, in the protocol of
seqmix/kernels/op.py.

Inputs arrive packed like the Triton kernels' (x, z ``[L, H, P]``, dt ``[L, H]``, B, C ``[L, G, N]``, A, D,
dt_bias ``[H]``), but everything, the initial state included, in the compute dtype (float32 or float64): the
kernel computes in that dtype and returns the final state and every gradient in it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqmix.kernels import cpu
from seqmix.kernels.op import FusedOp, as_input_grads, fake_outputs, nothing, register_autograd

# Tokens per chunk: the chunk's products are [64, N] x [N, (H / G) P] matrix products, as fast per FLOP as
# larger ones at the LM's sizes, and its [64, 64] masks stay in L1 (docs/design.md).
CHUNK = 64
DTYPES = (torch.float32, torch.float64)


def unsupported(dtype: torch.dtype) -> str | None:
    """Why the C++ kernels cannot take inputs of ``dtype``; None if they can."""
    if dtype not in DTYPES:
        return f"x, dt, B, C must be float32 or float64, got {dtype}"
    return None


def _fake_outputs(x, B, cu_seqlens, store_final):
    L, H, P = x.shape
    out, final = fake_outputs(x, (L, H, P), (cu_seqlens.shape[0] - 1, H, P, B.shape[-1]), store_final)
    return out, final.to(x.dtype)


def _fwd(x, dt, B, C, z, A, D, dt_bias, h0, cu_seqlens, chunk_offsets, num_chunks, softplus, lo, hi, store_final,
         store_chunks):
    return cpu.extension().ssd_fwd(x, dt, B, C, z, A, D, dt_bias, h0, cu_seqlens, chunk_offsets, CHUNK, num_chunks,
                                   softplus, lo, hi, store_final, store_chunks)


@torch.library.custom_op("seqmix::ssd_cpu_chunk_fwd", mutates_args=())
def _chunk_fwd(x: Tensor, dt: Tensor, B: Tensor, C: Tensor, z: Tensor | None, A: Tensor, D: Tensor | None,
               dt_bias: Tensor | None, h0: Tensor | None, cu_seqlens: Tensor, chunk_index: Tensor,
               chunk_offsets: Tensor, softplus: bool, lo: float, hi: float, store_final: bool
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (out, final state, and for the backward: the state entering each chunk [NC, H, P, N], the
    entering states' part of y [L, H, P] (both unset for chunks without an entering state, which the backward
    does not read), and with z the ungated y + D x [L, H, P])."""
    return tuple(_fwd(x, dt, B, C, z, A, D, dt_bias, h0, cu_seqlens, chunk_offsets, chunk_index.shape[0], softplus,
                      lo, hi, store_final, True))


@_chunk_fwd.register_fake
def _(x, dt, B, C, z, A, D, dt_bias, h0, cu_seqlens, chunk_index, chunk_offsets, softplus, lo, hi, store_final):
    L, H, P = x.shape
    y_pre = nothing(x) if z is None else torch.empty_like(x)
    return (*_fake_outputs(x, B, cu_seqlens, store_final), x.new_empty((chunk_index.shape[0], H, P, B.shape[-1])),
            torch.empty_like(x), y_pre)


@torch.library.custom_op("seqmix::ssd_cpu_chunk_bwd", mutates_args=())
def _chunk_bwd(x: Tensor, dt: Tensor, B: Tensor, C: Tensor, z: Tensor | None, A: Tensor, D: Tensor | None,
               dt_bias: Tensor | None, h0: Tensor | None, cu_seqlens: Tensor, chunk_index: Tensor,
               chunk_offsets: Tensor, hc: Tensor, y_in: Tensor, y_pre: Tensor, softplus: bool, lo: float, hi: float,
               store_final: bool, dout: Tensor | None, dht: Tensor | None, needs: list[bool]) -> list[Tensor]:
    if dout is None:  # only the final state was used
        dout = torch.zeros_like(x)
    dx, ddt, dB, dC, dz, dA, dD, ddt_bias, dh0 = cpu.extension().ssd_bwd(
        x, dt, B, C, z, A, D, dt_bias, h0 is not None, cu_seqlens, chunk_offsets, hc, y_in, y_pre, CHUNK, softplus,
        lo, hi, dout, dht, h0 is not None and needs[8])
    grads = (dx, ddt, dB, dC, dz if z is not None else None, dA, dD if D is not None else None,
             ddt_bias if dt_bias is not None else None, dh0 if h0 is not None else None, None, None, None)
    inputs = (x, dt, B, C, z, A, D, dt_bias, h0, cu_seqlens, chunk_index, chunk_offsets)
    return as_input_grads(grads, inputs, needs, x)


# Gradients not materialized: an unused final state's gradient is None, not a tensor of zeros the kernel reads.
register_autograd(_chunk_fwd, _chunk_bwd, num_inputs=12, materialize_grads=False)


@torch.library.custom_op("seqmix::ssd_cpu_fwd", mutates_args=())
def _recurrent_fwd(x: Tensor, dt: Tensor, B: Tensor, C: Tensor, z: Tensor | None, A: Tensor, D: Tensor | None,
                   dt_bias: Tensor | None, h0: Tensor | None, cu_seqlens: Tensor, chunk_index: Tensor,
                   chunk_offsets: Tensor, softplus: bool, lo: float, hi: float, store_final: bool
                   ) -> tuple[Tensor, Tensor]:
    """The same forward without what a backward would need."""
    out, ht, *_ = _fwd(x, dt, B, C, z, A, D, dt_bias, h0, cu_seqlens, chunk_offsets, 0, softplus, lo, hi,
                       store_final, False)
    return out, ht


@_recurrent_fwd.register_fake
def _(x, dt, B, C, z, A, D, dt_bias, h0, cu_seqlens, chunk_index, chunk_offsets, softplus, lo, hi, store_final):
    return _fake_outputs(x, B, cu_seqlens, store_final)


# The chunked forward serves every call; one that wants no gradient stores nothing for a backward.
FUSED = FusedOp(CHUNK, _chunk_fwd, _recurrent_fwd, recurrent_max_tokens=None)
