"""Mamba-1's selective scan: public op, argument checks, backend dispatch and the kernels as
torch.library ops (seqmix/kernels/op.py runs them). The math: docs/math/mamba.md.

The subpackage is named after the family (Mamba), not the op: see docs/design.md, "Layout and names".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from seqmix.kernels import triton_limits
from seqmix.kernels.backend import LazyModule, select_backend
from seqmix.kernels.checks import check_negative, check_same_dtype, check_sequences, check_tensor
from seqmix.kernels.library import custom_op
from seqmix.kernels.mamba import cpu as cpu_kernels
from seqmix.kernels.mamba.reference import selective_scan_chunked, selective_scan_recurrent
from seqmix.kernels.op import (
    FusedOp,
    as_input_grads,
    chunking_of,
    fake_outputs,
    no_tokens_result,
    or_empty,
    register_autograd,
    run_fused,
)
from seqmix.kernels.triton_limits import SCAN_CHUNK

__all__ = ["selective_scan", "selective_scan_chunked", "selective_scan_recurrent"]

kernels = LazyModule("seqmix.kernels.mamba.triton")


def _check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, delta_proj_weight):
    """Validate the arguments; returns the number of sequences and B, C as [B, T, G, N]."""
    check_tensor("u", u, (None, None, None), dims="[B, T, D]")
    Bsz, T, Dm = u.shape
    if delta_proj_weight is None:
        check_tensor("delta", delta, (Bsz, T, Dm), dims="[B, T, D]", like=u)
    else:
        check_tensor("delta_proj_weight", delta_proj_weight, (Dm, None), dims="[D, R]", like=u)
        check_tensor("delta", delta, (Bsz, T, delta_proj_weight.shape[1]), dims="[B, T, R] (delta_proj_weight's R)",
                     like=u)
        if delta_proj_weight.shape[1] == 0:
            raise ValueError("delta_proj_weight must have at least one column (R >= 1), got [D, 0]")
    check_tensor("A", A, (Dm, None), dims="[D, N]", like=u)
    N = A.shape[1]
    if isinstance(B, torch.Tensor) and B.dim() == 3:
        check_tensor("B", B, (Bsz, T, N), dims="[B, T, N]", like=u)
        B = B.unsqueeze(2)
    check_tensor("B", B, (Bsz, T, None, N), dims="[B, T, G, N]", like=u)
    G = B.shape[2]
    if isinstance(C, torch.Tensor) and C.dim() == 3:
        check_tensor("C", C, (Bsz, T, N), dims="[B, T, N]", like=u)
        C = C.unsqueeze(2)
    check_tensor("C", C, (Bsz, T, G, N), dims="[B, T, G, N]", like=u)
    if Dm == 0 or N == 0 or G == 0:
        raise ValueError(f"channels D, state dim N and groups G must be positive, got D={Dm}, N={N}, G={G}")
    if Dm % G:
        raise ValueError(f"the number of groups G={G} of B and C must divide the number of channels D={Dm}")
    check_same_dtype(("u", "delta", "B", "C"), (u, delta, B, C))
    for name, t, shape, dims in (("D", D, (Dm,), "[D]"), ("z", z, (Bsz, T, Dm), "[B, T, D]"),
                                 ("delta_bias", delta_bias, (Dm,), "[D]")):
        if t is not None:
            check_tensor(name, t, shape, dims=dims, like=u)
    check_negative("A", A)
    n = check_sequences(cu_seqlens, initial_state, (Dm, N), dims="[N, D, N]", like=u)
    return n, B, C


# The kernels as torch.library ops (the protocol of seqmix/kernels/op.py): u, delta, z [L, D], B, C [L, G, N]
# packed; A [D, N]; D, delta_bias [D]; h0 [N, D, N] float32.

def _scan(u, delta, B, C, z, A, D, delta_bias, h0, cu_seqlens, chunk_index, chunk_offsets, softplus, store_final,
          store_chunks):
    chunking = chunking_of(cu_seqlens, chunk_index, chunk_offsets, SCAN_CHUNK)
    out, ht, hc = kernels.selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, h0, softplus, chunking,
                                             store_final, store_chunks)
    return out, or_empty(ht, u), or_empty(hc, u)


def _outputs_like(u, A, cu_seqlens, store_final):
    return fake_outputs(u, u.shape, (cu_seqlens.shape[0] - 1, *A.shape), store_final)


@custom_op("seqmix::selective_scan_chunk_fwd", mutates_args=())
def _chunk_fwd(u: Tensor, delta: Tensor, B: Tensor, C: Tensor, z: Tensor | None, A: Tensor, D: Tensor | None,
               delta_bias: Tensor | None, h0: Tensor | None, cu_seqlens: Tensor, chunk_index: Tensor,
               chunk_offsets: Tensor, softplus: bool, store_final: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (out, final state, and for the backward the state entering each chunk [NC, D, N] float32)."""
    return _scan(u, delta, B, C, z, A, D, delta_bias, h0, cu_seqlens, chunk_index, chunk_offsets, softplus,
                 store_final, True)


@_chunk_fwd.register_fake
def _(u, delta, B, C, z, A, D, delta_bias, h0, cu_seqlens, chunk_index, chunk_offsets, softplus, store_final):
    return *_outputs_like(u, A, cu_seqlens, store_final), u.new_empty((chunk_index.shape[0], *A.shape),
                                                                      dtype=torch.float32)


@custom_op("seqmix::selective_scan_chunk_bwd", mutates_args=())
def _chunk_bwd(u: Tensor, delta: Tensor, B: Tensor, C: Tensor, z: Tensor | None, A: Tensor, D: Tensor | None,
               delta_bias: Tensor | None, h0: Tensor | None, cu_seqlens: Tensor, chunk_index: Tensor,
               chunk_offsets: Tensor, hc: Tensor, softplus: bool, store_final: bool, dout: Tensor,
               dht: Tensor | None, needs: list[bool]) -> list[Tensor]:
    chunking = chunking_of(cu_seqlens, chunk_index, chunk_offsets, SCAN_CHUNK)
    du, ddelta, dz, dA, dB, dC, dD, ddelta_bias, dh0 = kernels.selective_scan_bwd(
        u, delta, A, B, C, D, z, delta_bias, hc, softplus, chunking, dout, dht, h0 is not None and needs[8]
    )
    inputs = (u, delta, B, C, z, A, D, delta_bias, h0, cu_seqlens, chunk_index, chunk_offsets)
    return as_input_grads((du, ddelta, dB, dC, dz, dA, dD, ddelta_bias, dh0, None, None, None), inputs, needs, u)


register_autograd(_chunk_fwd, _chunk_bwd, num_inputs=12)


@custom_op("seqmix::selective_scan_fwd", mutates_args=())
def _scan_fwd(u: Tensor, delta: Tensor, B: Tensor, C: Tensor, z: Tensor | None, A: Tensor, D: Tensor | None,
              delta_bias: Tensor | None, h0: Tensor | None, cu_seqlens: Tensor, chunk_index: Tensor,
              chunk_offsets: Tensor, softplus: bool, store_final: bool) -> tuple[Tensor, Tensor]:
    """The same scan without the per-chunk states a backward would need."""
    out, ht, _ = _scan(u, delta, B, C, z, A, D, delta_bias, h0, cu_seqlens, chunk_index, chunk_offsets, softplus,
                       store_final, False)
    return out, ht


@_scan_fwd.register_fake
def _(u, delta, B, C, z, A, D, delta_bias, h0, cu_seqlens, chunk_index, chunk_offsets, softplus, store_final):
    return _outputs_like(u, A, cu_seqlens, store_final)


# The scan is token by token either way: a call that wants no gradient skips the checkpoints at any length.
FUSED = FusedOp(SCAN_CHUNK, _chunk_fwd, _scan_fwd, recurrent_max_tokens=None)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
    delta_proj_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mamba-1's selective scan, channels last: per channel d and state index n,
    ``h_t = exp(delta'_t A) h_{t-1} + delta'_t u_t B_t``, ``y_t = sum_n h_t C_t + D u_t``, then
    ``y *= silu(z)`` if z is given, with ``delta' = softplus?(delta + delta_bias)``.

    Args:
        u: [B, T, D] inputs.
        delta: [B, T, D] step sizes (before bias and softplus), or with delta_proj_weight their low-rank factor
            [B, T, R].
        A: [D, N] negative state decay rates (``-exp(A_log)``).
        B: [B, T, N] or [B, T, G, N] input projections; channel d reads group ``d // (D // G)``.
        C: [B, T, N] or [B, T, G, N] output projections, as B.
        D: [D] skip connection, or None.
        z: [B, T, D] gate, or None.
        delta_bias: [D] added to delta, or None.
        delta_softplus: apply softplus to delta + delta_bias.
        initial_state: [N, D, N] state before the first token of each sequence (N = B, or the
            number of packed sequences); float32 by convention.
        output_final_state: also return the state after the last token.
        cu_seqlens: [N+1] int32/int64 boundaries of sequences packed as ``[1, sum(T_i), D]``.
        backend: None (automatic: Triton on CUDA tensors, the C++ kernels on CPU tensors when they
            build, else the reference), ``"reference"``, ``"triton"`` or ``"cpu"`` (float32 and float64;
            their final state and gradients in the inputs' dtype).
        delta_proj_weight: [D, R] or None: the step sizes are ``delta @ delta_proj_weight.T`` (Mamba's
            dt_proj, before its bias; mamba_ssm's ``delta_proj_weight``). The cpu backend computes them where it
            reads them, and neither they nor their gradient is written (docs/design.md, "Thirtieth round");
            the other backends take the product first.

    Returns:
        y: [B, T, D] in u's dtype.
        final_state: [N, D, N] float32 (float64 for float64 inputs), or None.
    """
    n, B, C = _check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, delta_proj_weight)
    Bsz, T, Dm = u.shape
    N = A.shape[1]
    name = select_backend("selective_scan", backend, u.device, ("cpu", "triton", "reference"),
                          {"triton": triton_limits.unsupported("u, delta, B, C", u.dtype, "state dim", N=N),
                           "cpu": cpu_kernels.unsupported(u.dtype)})
    if Bsz * T == 0:
        return no_tokens_result((Bsz, T, Dm), (n, Dm, N), initial_state, output_final_state, u)
    if name == "cpu":  # the kernel computes in u's dtype: the parameters (float32 in a layer) are cast to it
        z, A, D, delta_bias, delta_proj_weight = (None if t is None else t.to(u.dtype)
                                                  for t in (z, A, D, delta_bias, delta_proj_weight))
        return run_fused(cpu_kernels.FUSED, (u, delta, B, C, z), (A, D, delta_bias, delta_proj_weight),
                         initial_state, (delta_softplus,), output_final_state, cu_seqlens)
    if delta_proj_weight is not None:
        delta = F.linear(delta, delta_proj_weight)
    if name == "triton":
        return run_fused(FUSED, (u, delta, B, C, z), (A, D, delta_bias), initial_state, (delta_softplus,),
                         output_final_state, cu_seqlens)
    return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                  output_final_state, cu_seqlens)
