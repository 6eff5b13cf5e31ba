"""Mamba-2's SSD (state-space duality): public op, argument checks and backend dispatch."""

from __future__ import annotations

import math

import torch

from seqmix.kernels.alloc import no_tokens_result
from seqmix.kernels.backend import select_backend
from seqmix.kernels.checks import check_cu_seqlens, check_same_dtype, check_tensor
from seqmix.kernels.sequences import chunking_for
from seqmix.kernels.ssd import triton as kernels
from seqmix.kernels.ssd.reference import ssd_chunked, ssd_recurrent

__all__ = ["ssd", "ssd_chunked", "ssd_recurrent"]

# Below this many tokens per sequence (and with no gradient wanted) the
# token-by-token kernel beats the three launches of the chunked forward.
RECURRENT_MAX_TOKENS = 64


def check_negative(name: str, a: torch.Tensor) -> None:
    """A state matrix must be negative (a decay): exp(dt' A) <= 1 keeps the scan stable.
    Reading the answer back syncs with the device, so the check is skipped while a CUDA graph
    is being captured (a decoding step), where a sync is not allowed."""
    if a.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    if a.numel() and not bool((a < 0).all()):
        raise ValueError(f"{name} must be negative (A = -exp(A_log)), got values up to {a.max().item():g}")


def check_dt_limit(dt_limit) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in dt_limit)
    except (TypeError, ValueError):
        raise ValueError(f"dt_limit must be a pair (lo, hi) of numbers, got {dt_limit!r}") from None
    if not 0.0 <= lo <= hi:
        raise ValueError(f"dt_limit must satisfy 0 <= lo <= hi, got {dt_limit!r}")
    return lo, hi


def _check_inputs(x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens):
    check_tensor("x", x, (None, None, None, None), dims="[B, T, H, P]")
    Bsz, T, H, P = x.shape
    check_tensor("dt", dt, (Bsz, T, H), dims="[B, T, H]", like=x)
    check_tensor("A", A, (H,), dims="[H]", like=x)
    check_tensor("B", B, (Bsz, T, None, None), dims="[B, T, G, N]", like=x)
    G, N = B.shape[2:]
    check_tensor("C", C, (Bsz, T, G, N), dims="[B, T, G, N]", like=x)
    if P == 0 or N == 0 or G == 0:
        raise ValueError(f"head dim P, state dim N and groups G must be positive, got P={P}, N={N}, G={G}")
    if H % G:
        raise ValueError(f"the number of groups G={G} of B and C must divide the number of heads H={H}")
    check_same_dtype(("x", "dt", "B", "C"), (x, dt, B, C))
    for name, t, shape, dims in (("D", D, (H,), "[H]"), ("z", z, (Bsz, T, H, P), "[B, T, H, P]"),
                                 ("dt_bias", dt_bias, (H,), "[H]")):
        if t is not None:
            check_tensor(name, t, shape, dims=dims, like=x)
    check_negative("A", A)
    n = Bsz if cu_seqlens is None else check_cu_seqlens(cu_seqlens, batch=Bsz, total=T, like=x)
    if initial_state is not None:
        check_tensor("initial_state", initial_state, (n, H, P, N), dims="[N, H, P, N]", like=x)
    return n


class _ChunkSSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, initial_state, cfg, chunking, output_final_state):
        h0 = None if initial_state is None else initial_state.float().contiguous()
        out, ht, dtp, lcum, y = kernels.chunk_ssd_fwd(x, dt, A, B, C, D, z, dt_bias, h0, cfg, chunking,
                                                      output_final_state)
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, h0, dtp, lcum, y)
        ctx.cfg, ctx.chunking = cfg, chunking
        ctx.initial_state_dtype = None if initial_state is None else initial_state.dtype
        return out, ht

    @staticmethod
    def backward(ctx, dout, dht):
        x, dt, A, B, C, D, z, dt_bias, h0, dtp, lcum, y = ctx.saved_tensors
        dz = None
        dy = dout.contiguous()
        if z is not None:
            # out = y silu(z): the gate's backward is elementwise, left to PyTorch.
            zf, sig = z.float(), torch.sigmoid(z.float())
            dz = (dout.float() * y.float() * sig * (1 + zf * (1 - sig))).to(z.dtype)
            dy = (dout.float() * zf * sig).to(x.dtype)
        need_dh0 = h0 is not None and ctx.needs_input_grad[8]
        dht = None if dht is None else dht.float().contiguous()
        dx, ddt, dA, dB, dC, dD, ddt_bias, dh0 = kernels.chunk_ssd_bwd(
            x, dt, A, B, C, D, dt_bias, h0, dtp, lcum, ctx.cfg, ctx.chunking, dy, dht, need_dh0
        )
        dD = None if dD is None else dD.to(D.dtype)
        ddt_bias = None if ddt_bias is None else ddt_bias.to(dt_bias.dtype)
        if dh0 is not None:
            dh0 = dh0.to(ctx.initial_state_dtype)
        return (dx, ddt, dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype), dD, dz, ddt_bias, dh0,
                None, None, None)


def _contiguous(t):
    return None if t is None else t.contiguous()


def _triton_ssd(x, dt, A, B, C, D, z, dt_bias, cfg, initial_state, output_final_state, cu_seqlens, n):
    Bsz, T, H, P = x.shape
    G, N = B.shape[2:]
    L = Bsz * T
    xp, zp = x.reshape(L, H, P).contiguous(), None if z is None else z.reshape(L, H, P).contiguous()
    dtp = dt.reshape(L, H).contiguous()
    Bp, Cp = B.reshape(L, G, N).contiguous(), C.reshape(L, G, N).contiguous()
    A, D, dt_bias = _contiguous(A), _contiguous(D), _contiguous(dt_bias)
    chunking = chunking_for(Bsz, T, kernels.CHUNK, x.device, cu_seqlens)
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, dt, A, B, C, D, z, dt_bias, initial_state)
    )
    if not wants_grad and L <= RECURRENT_MAX_TOKENS * n:
        h0 = None if initial_state is None else initial_state.float().contiguous()
        out, ht = kernels.recurrent_ssd_fwd(xp, dtp, A, Bp, Cp, D, zp, dt_bias, h0, cfg, chunking.cu_seqlens,
                                            output_final_state)
    else:
        out, ht = _ChunkSSD.apply(xp, dtp, A, Bp, Cp, D, zp, dt_bias, initial_state, cfg, chunking,
                                  output_final_state)
    return out.view(Bsz, T, H, P), ht


def ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mamba-2's SSD: per head, ``h_t = exp(dt'_t A) h_{t-1} + dt'_t x_t B_t^T``, ``y_t = h_t C_t + D x_t``.

    ``dt' = clamp(softplus(dt + dt_bias), *dt_limit)`` (bias and softplus optional); with z,
    ``y *= silu(z)``. Head h reads group ``h // (H // G)`` of B and C.

    Args:
        x: [B, T, H, P] inputs.
        dt: [B, T, H] step sizes (before bias, softplus and clamp).
        A: [H] negative state decay rates (``-exp(A_log)``).
        B: [B, T, G, N] input projections of the state; G must divide H.
        C: [B, T, G, N] output projections of the state.
        D: [H] skip connection, or None.
        z: [B, T, H, P] gate, or None.
        dt_bias: [H] added to dt, or None.
        dt_softplus: apply softplus to dt + dt_bias.
        dt_limit: (lo, hi) with 0 <= lo <= hi: dt' is clamped to it (always, so dt' >= 0).
        initial_state: [N, H, P, N] state before the first token of each sequence (N = B,
            or the number of packed sequences); float32 by convention.
        output_final_state: also return the state after the last token.
        cu_seqlens: [N+1] int32/int64 boundaries of sequences packed as ``[1, sum(T_i), ...]``;
            states reset at every boundary.
        backend: None (automatic), ``"reference"`` or ``"triton"``.

    Returns:
        y: [B, T, H, P] in x's dtype.
        final_state: [N, H, P, N] float32 (float64 for float64 inputs), or None.
    """
    n = _check_inputs(x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens)
    lo, hi = check_dt_limit(dt_limit)
    Bsz, T, H, P = x.shape
    N = B.shape[-1]
    name = select_backend("ssd", backend, x.device, ("triton", "reference"),
                          {"triton": kernels.unsupported(x.dtype, P, N)})
    if T == 0:
        return no_tokens_result((Bsz, 0, H, P), (n, H, P, N), initial_state, output_final_state, x)
    if name == "triton":
        cfg = kernels.DtConfig(dt_softplus, (lo, hi))
        return _triton_ssd(x, dt, A, B, C, D, z, dt_bias, cfg, initial_state, output_final_state, cu_seqlens, n)
    return ssd_chunked(x, dt, A, B, C, D, z, dt_bias, dt_softplus, (lo, hi), initial_state, output_final_state,
                       cu_seqlens)
