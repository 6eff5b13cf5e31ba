"""The C++ CPU delta rule and gated delta rule (delta_rule_cpu.cpp, built by seqmix/kernels/cpu.py) as
torch.library ops, in the protocol of seqmix/kernels/op.py.

Inputs arrive packed like the Triton kernels' (q, k ``[L, H, K]``, v ``[L, H, V]``, beta and g ``[L, H]``),
but everything, g and the initial state included, in the compute dtype (float32 or float64): the kernel
computes in that dtype and returns the final state and every gradient in it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqmix.kernels import cpu
from seqmix.kernels.library import custom_op
from seqmix.kernels.op import FusedOp, as_input_grads, nothing, register_autograd

# Tokens between the forward's stored states; the backward recomputes a chunk's states from them into a
# buffer of (CHUNK + 1) K V values per task (68 KiB of float32 at K = V = 32), which stays in L2.
CHUNK = 16
DTYPES = (torch.float32, torch.float64)
# The bytes of a row of the state the kernel is compiled for (delta_rule_cpu.cpp's kMaxVectors vectors): V up
# to 128 in float32, 64 in float64. Wider heads go to the chunked reference, which is as fast there
# (docs/design.md).
MAX_ROW_BYTES = 512


def unsupported(dtype: torch.dtype, V: int) -> str | None:
    """Why the C++ kernels cannot take inputs of ``dtype`` and value head dim ``V``; None if they can."""
    if dtype not in DTYPES:
        return f"q, k, v, beta must be float32 or float64, got {dtype}"
    widest = MAX_ROW_BYTES // dtype.itemsize
    if V > widest:
        return f"the value head dim V must be at most {widest} in {dtype}, got {V}"
    return None


def _padded(V: int, dtype: torch.dtype) -> int:
    """A stored state's row: V values padded to the kernel's vectors per row (a power of two) times its lanes
    (the values of one of the build's vector registers, vec_cpu.h's kVectorBytes)."""
    W, vectors = cpu.extension().vector_bytes // dtype.itemsize, 1
    while vectors * W < V:
        vectors *= 2
    return vectors * W


def _fake_outputs(q, v, cu_seqlens, store_final):
    L, H, K = q.shape
    state = q.new_empty((cu_seqlens.shape[0] - 1, H, K, v.shape[-1])) if store_final else nothing(q)
    return q.new_empty((L, H, v.shape[-1])), state


def _fwd(q, k, v, beta, g, h0, cu_seqlens, chunk_offsets, num_chunks, scale, store_final, store_chunks):
    return cpu.extension().delta_rule_fwd(q, k, v, beta, g, h0, cu_seqlens, chunk_offsets, CHUNK, num_chunks,
                                          scale, store_final, store_chunks)


@custom_op("seqmix::delta_rule_cpu_chunk_fwd", mutates_args=())
def _chunk_fwd(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, h0: Tensor | None,
               cu_seqlens: Tensor, chunk_index: Tensor, chunk_offsets: Tensor, scale: float, store_final: bool
               ) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (o, final state, and for the backward the state entering each chunk [NC, H, K, padded V])."""
    return tuple(_fwd(q, k, v, beta, g, h0, cu_seqlens, chunk_offsets, chunk_index.shape[0], scale, store_final,
                      True))


@_chunk_fwd.register_fake
def _(q, k, v, beta, g, h0, cu_seqlens, chunk_index, chunk_offsets, scale, store_final):
    _, H, K = q.shape
    return *_fake_outputs(q, v, cu_seqlens, store_final), q.new_empty((chunk_index.shape[0], H, K,
                                                                      _padded(v.shape[-1], q.dtype)))


@custom_op("seqmix::delta_rule_cpu_chunk_bwd", mutates_args=())
def _chunk_bwd(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, h0: Tensor | None,
               cu_seqlens: Tensor, chunk_index: Tensor, chunk_offsets: Tensor, hc: Tensor, scale: float,
               store_final: bool, do: Tensor | None, dht: Tensor | None, needs: list[bool]) -> list[Tensor]:
    if do is None:  # only the final state was used
        do = torch.zeros_like(v)
    dq, dk, dv, dbeta, dg, dh0 = cpu.extension().delta_rule_bwd(
        q, k, v, beta, g, cu_seqlens, chunk_offsets, hc, CHUNK, scale, do, dht, h0 is not None and needs[5])
    grads = (dq, dk, dv, dbeta, dg if g is not None else None, dh0 if h0 is not None else None, None, None, None)
    inputs = (q, k, v, beta, g, h0, cu_seqlens, chunk_index, chunk_offsets)
    return as_input_grads(grads, inputs, needs, q)


# Gradients not materialized: autograd would otherwise fill a tensor of zeros as large as the checkpoints for
# their (never used) gradient, and one for an unused final state's, at every backward.
register_autograd(_chunk_fwd, _chunk_bwd, num_inputs=9, materialize_grads=False)


@custom_op("seqmix::delta_rule_cpu_fwd", mutates_args=())
def _recurrent_fwd(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, h0: Tensor | None,
                   cu_seqlens: Tensor, chunk_index: Tensor, chunk_offsets: Tensor, scale: float, store_final: bool
                   ) -> tuple[Tensor, Tensor]:
    """The same recurrence without the checkpoints a backward would need."""
    o, ht, _ = _fwd(q, k, v, beta, g, h0, cu_seqlens, chunk_offsets, 0, scale, store_final, False)
    return o, ht


@_recurrent_fwd.register_fake
def _(q, k, v, beta, g, h0, cu_seqlens, chunk_index, chunk_offsets, scale, store_final):
    return _fake_outputs(q, v, cu_seqlens, store_final)


# The kernel is token by token either way: a call that wants no gradient skips the checkpoints at any length.
FUSED = FusedOp(CHUNK, _chunk_fwd, _recurrent_fwd, recurrent_max_tokens=None)
