"""The C++ CPU selective scan (selective_scan_cpu.cpp, built by seqmix/kernels/cpu.py) as torch.library ops,
in the protocol of seqmix/kernels/op.py.

Inputs arrive packed like the Triton kernels' (u, delta, z ``[L, D]``, B, C ``[L, G, N]``), but everything,
the initial state included, in the compute dtype (float32 or float64): the kernel computes in that dtype
and returns the final state and every gradient in it. With ``delta_weight [D, R]``, delta is its low-rank factor
``[L, R]`` and the kernels compute the step sizes ``delta @ delta_weight.T`` where they read them (Mamba's
dt_proj; docs/design.md, "Thirtieth round").
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqmix.kernels import cpu
from seqmix.kernels.library import custom_op
from seqmix.kernels.op import FusedOp, as_input_grads, chunking_args, nothing, register_autograd
from seqmix.kernels.sequences import chunking_for

# Tokens between the forward's stored states; the backward recomputes a chunk's states (and decays) from
# them into a buffer of (CHUNK + 1) * 2 * D_block * N values per task, which stays in L2.
CHUNK = 16
DTYPES = (torch.float32, torch.float64)


def unsupported(dtype: torch.dtype) -> str | None:
    """Why the C++ kernels cannot take inputs of ``dtype``; None if they can."""
    if dtype not in DTYPES:
        return f"u, delta, B, C must be float32 or float64, got {dtype}"
    return None


def _padded(dim: int) -> int:
    """The channels of a stored state, padded to a multiple of 16 (the kernel's vector lanes)."""
    return -(-dim // 16) * 16


def _fake_outputs(u, A, cu_seqlens, store_final):
    state = u.new_empty((cu_seqlens.shape[0] - 1, *A.shape)) if store_final else nothing(u)
    return u.new_empty(u.shape), state


@custom_op("seqmix::selective_scan_cpu_chunk_fwd", mutates_args=())
def _chunk_fwd(u: Tensor, delta: Tensor, B: Tensor, C: Tensor, z: Tensor | None, A: Tensor, D: Tensor | None,
               delta_bias: Tensor | None, delta_weight: Tensor | None, h0: Tensor | None, cu_seqlens: Tensor,
               chunk_index: Tensor, chunk_offsets: Tensor, softplus: bool, store_final: bool
               ) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (out, final state, and for the backward the state entering each chunk [NC, padded D * N])."""
    return tuple(cpu.extension().selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_weight, h0,
                                                    cu_seqlens, chunk_offsets, CHUNK, chunk_index.shape[0],
                                                    softplus, store_final, True))


@_chunk_fwd.register_fake
def _(u, delta, B, C, z, A, D, delta_bias, delta_weight, h0, cu_seqlens, chunk_index, chunk_offsets, softplus,
      store_final):
    return *_fake_outputs(u, A, cu_seqlens, store_final), u.new_empty((chunk_index.shape[0],
                                                                      _padded(u.shape[1]) * A.shape[1]))


@custom_op("seqmix::selective_scan_cpu_chunk_bwd", mutates_args=())
def _chunk_bwd(u: Tensor, delta: Tensor, B: Tensor, C: Tensor, z: Tensor | None, A: Tensor, D: Tensor | None,
               delta_bias: Tensor | None, delta_weight: Tensor | None, h0: Tensor | None, cu_seqlens: Tensor,
               chunk_index: Tensor, chunk_offsets: Tensor, hc: Tensor, softplus: bool, store_final: bool,
               dout: Tensor | None, dht: Tensor | None, needs: list[bool]) -> list[Tensor]:
    if dout is None:  # only the final state was used
        dout = torch.zeros_like(u)
    du, ddelta, dz, dA, dB, dC, dD, dh0, dbias, dweight = cpu.extension().selective_scan_bwd(
        u, delta, A, B, C, D, z, delta_bias, delta_weight, cu_seqlens, chunk_offsets, hc, CHUNK, softplus, dout,
        dht, h0 is not None and needs[9])
    # The kernel's partial sums: dB, dC (and a low-rank delta's) per block of channels, dA, dD, delta_bias's and
    # delta_weight's per sequence.
    low_rank = delta_weight is not None
    grads = (du, ddelta.sum(0) if low_rank else ddelta, dB.sum(0), dC.sum(0), dz if z is not None else None,
             dA.sum(0), dD.sum(0) if D is not None else None, dbias.sum(0) if delta_bias is not None else None,
             dweight.sum(0).t() if low_rank else None, dh0 if h0 is not None else None, None, None, None)
    inputs = (u, delta, B, C, z, A, D, delta_bias, delta_weight, h0, cu_seqlens, chunk_index, chunk_offsets)
    return as_input_grads(grads, inputs, needs, u)


# Gradients not materialized: autograd would otherwise fill a tensor of zeros as large as the checkpoints for
# the checkpoints' (never used) gradient, and one for the final state's, at every backward.
register_autograd(_chunk_fwd, _chunk_bwd, num_inputs=13, materialize_grads=False)


@custom_op("seqmix::selective_scan_cpu_fwd", mutates_args=())
def _scan_fwd(u: Tensor, delta: Tensor, B: Tensor, C: Tensor, z: Tensor | None, A: Tensor, D: Tensor | None,
              delta_bias: Tensor | None, delta_weight: Tensor | None, h0: Tensor | None, cu_seqlens: Tensor,
              chunk_index: Tensor, chunk_offsets: Tensor, softplus: bool, store_final: bool) -> tuple[Tensor, Tensor]:
    """The same scan without the per-chunk states a backward would need."""
    out, ht, _ = cpu.extension().selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_weight, h0,
                                                    cu_seqlens, chunk_offsets, CHUNK, 0, softplus, store_final, False)
    return out, ht


@_scan_fwd.register_fake
def _(u, delta, B, C, z, A, D, delta_bias, delta_weight, h0, cu_seqlens, chunk_index, chunk_offsets, softplus,
      store_final):
    return _fake_outputs(u, A, cu_seqlens, store_final)


FUSED = FusedOp(CHUNK, _chunk_fwd, _scan_fwd, recurrent_max_tokens=None)


def _as_input(t, dtype):
    """t in ``dtype`` and contiguous; the attribute checks first (a conversion call costs about 1 us even when
    it returns t)."""
    if t is None or (t.dtype == dtype and t.is_contiguous()):
        return t
    return t.to(dtype).contiguous()


def scan_step(u, delta, A, B, C, state, D, z, delta_bias, softplus: bool):
    """One token per sequence (a decoding step) through the forward without checkpoints: u, delta, z
    ``[Bsz, D]``, B, C ``[Bsz, G, N]``, state ``[Bsz, D, N]``; computed in u's dtype (float32 or float64).
    No gradient (the custom op has none). Returns (y [Bsz, D], the new state, a new tensor)."""
    args = [_as_input(t, u.dtype) for t in (u, delta, B, C, z, A, D, delta_bias)]
    chunking = chunking_args(chunking_for(u.shape[0], 1, CHUNK, u.device))
    return _scan_fwd(*args, None, _as_input(state, u.dtype), *chunking, softplus, True)
