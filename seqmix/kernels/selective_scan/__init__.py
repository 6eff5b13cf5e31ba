"""Mamba-1's selective scan: public op, argument checks and backend dispatch."""

from __future__ import annotations

import torch

from seqmix.kernels.alloc import no_tokens_result
from seqmix.kernels.backend import select_backend
from seqmix.kernels.checks import check_cu_seqlens, check_same_dtype, check_tensor
from seqmix.kernels.selective_scan import triton as kernels
from seqmix.kernels.selective_scan.reference import selective_scan_recurrent
from seqmix.kernels.sequences import chunking_for
from seqmix.kernels.ssd import check_negative

__all__ = ["selective_scan", "selective_scan_recurrent"]


def _check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens):
    """Validate the arguments; returns the number of sequences and B, C as [B, T, G, N]."""
    check_tensor("u", u, (None, None, None), dims="[B, T, D]")
    Bsz, T, Dm = u.shape
    check_tensor("delta", delta, (Bsz, T, Dm), dims="[B, T, D]", like=u)
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
    n = Bsz if cu_seqlens is None else check_cu_seqlens(cu_seqlens, batch=Bsz, total=T, like=u)
    if initial_state is not None:
        check_tensor("initial_state", initial_state, (n, Dm, N), dims="[N, D, N]", like=u)
    return n, B, C


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, softplus, chunking, output_final_state):
        h0 = None if initial_state is None else initial_state.float().contiguous()
        out, ht, hc = kernels.selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, h0, softplus, chunking,
                                                 output_final_state, True)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, hc)
        ctx.softplus, ctx.chunking = softplus, chunking
        ctx.initial_state_dtype = None if initial_state is None else initial_state.dtype
        return out, ht

    @staticmethod
    def backward(ctx, dout, dht):
        u, delta, A, B, C, D, z, delta_bias, hc = ctx.saved_tensors
        need_dh0 = ctx.initial_state_dtype is not None and ctx.needs_input_grad[8]
        dht = None if dht is None else dht.float().contiguous()
        du, ddelta, dz, dA, dB, dC, dD, ddelta_bias, dh0 = kernels.selective_scan_bwd(
            u, delta, A, B, C, D, z, delta_bias, hc, ctx.softplus, ctx.chunking, dout.contiguous(), dht, need_dh0
        )
        dD = None if dD is None else dD.to(D.dtype)
        ddelta_bias = None if ddelta_bias is None else ddelta_bias.to(delta_bias.dtype)
        if dh0 is not None:
            dh0 = dh0.to(ctx.initial_state_dtype)
        return (du, ddelta, dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype), dD, dz, ddelta_bias, dh0,
                None, None, None)


def _contiguous(t):
    return None if t is None else t.contiguous()


def _triton_selective_scan(u, delta, A, B, C, D, z, delta_bias, softplus, initial_state, output_final_state,
                           cu_seqlens):
    Bsz, T, Dm = u.shape
    G, N = B.shape[2:]
    L = Bsz * T
    packed = [_contiguous(None if t is None else t.reshape(L, Dm)) for t in (u, delta, z)]
    Bp, Cp = B.reshape(L, G, N).contiguous(), C.reshape(L, G, N).contiguous()
    A, D, delta_bias = _contiguous(A), _contiguous(D), _contiguous(delta_bias)
    chunking = chunking_for(Bsz, T, kernels.CHUNK, u.device, cu_seqlens)
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias, initial_state)
    )
    if wants_grad:
        out, ht = _SelectiveScan.apply(packed[0], packed[1], A, Bp, Cp, D, packed[2], delta_bias, initial_state,
                                       softplus, chunking, output_final_state)
    else:
        h0 = None if initial_state is None else initial_state.float().contiguous()
        out, ht, _ = kernels.selective_scan_fwd(packed[0], packed[1], A, Bp, Cp, D, packed[2], delta_bias, h0,
                                                softplus, chunking, output_final_state, False)
    return out.view(Bsz, T, Dm), ht


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mamba-1's selective scan, channels last: per channel d and state index n,
    ``h_t = exp(delta'_t A) h_{t-1} + delta'_t u_t B_t``, ``y_t = sum_n h_t C_t + D u_t``, then
    ``y *= silu(z)`` if z is given, with ``delta' = softplus?(delta + delta_bias)``.

    Args:
        u: [B, T, D] inputs.
        delta: [B, T, D] step sizes (before bias and softplus).
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
        backend: None (automatic), ``"reference"`` or ``"triton"``.

    Returns:
        y: [B, T, D] in u's dtype.
        final_state: [N, D, N] float32 (float64 for float64 inputs), or None.
    """
    n, B, C = _check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens)
    Bsz, T, Dm = u.shape
    N = A.shape[1]
    name = select_backend("selective_scan", backend, u.device, ("triton", "reference"),
                          {"triton": kernels.unsupported(u.dtype, N)})
    if T == 0:
        return no_tokens_result((Bsz, 0, Dm), (n, Dm, N), initial_state, output_final_state, u)
    if name == "triton":
        return _triton_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                      output_final_state, cu_seqlens)
    return selective_scan_recurrent(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                    output_final_state, cu_seqlens)
