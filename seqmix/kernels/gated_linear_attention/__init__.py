"""Gated linear attention (GLA): public op, argument checks and backend dispatch.

The subpackage is named after the family, not the op: a ``gla/`` subpackage would be shadowed
by the function :func:`seqmix.kernels.gla`.
"""

from __future__ import annotations

import torch

from seqmix.kernels.alloc import no_tokens_result
from seqmix.kernels.backend import select_backend
from seqmix.kernels.checks import check_cu_seqlens, check_log_decay, check_same_dtype, check_scale, check_tensor
from seqmix.kernels.gated_linear_attention import triton as kernels
from seqmix.kernels.gated_linear_attention.reference import gla_chunked, gla_recurrent
from seqmix.kernels.sequences import chunking_for

__all__ = ["gla", "gla_chunked", "gla_recurrent"]

# Below this many tokens per sequence (and with no gradient wanted) the token-by-token kernel
# serves the call instead of the chunked forward's launches.
RECURRENT_MAX_TOKENS = 64


def _check_inputs(q, k, v, g, initial_state, cu_seqlens):
    check_tensor("q", q, (None, None, None, None), dims="[B, T, H, K]")
    B, T, H, K = q.shape
    check_tensor("k", k, (B, T, H, K), dims="[B, T, H, K]", like=q)
    check_tensor("v", v, (B, T, H, None), dims="[B, T, H, V]", like=q)
    check_same_dtype(("q", "k", "v"), (q, k, v))
    check_log_decay("g", g, (B, T, H, K), dims="[B, T, H, K]", like=q)
    if K == 0 or v.shape[-1] == 0:
        raise ValueError(f"head dims must be positive, got K={K}, V={v.shape[-1]}")
    n = B if cu_seqlens is None else check_cu_seqlens(cu_seqlens, batch=B, total=T, like=q)
    if initial_state is not None:
        check_tensor("initial_state", initial_state, (n, H, K, v.shape[-1]), dims="[N, H, K, V]", like=q)
    return n


class _ChunkGLA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, scale, chunking, output_final_state):
        h0 = None if initial_state is None else initial_state.float().contiguous()
        o, ht, gcum, A = kernels.chunk_gla_fwd(q, k, v, g, scale, h0, chunking, output_final_state)
        ctx.save_for_backward(q, k, v, gcum, A, h0)
        ctx.scale, ctx.chunking = scale, chunking
        ctx.g_dtype = g.dtype
        ctx.initial_state_dtype = None if initial_state is None else initial_state.dtype
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, gcum, A, h0 = ctx.saved_tensors
        need_dh0 = h0 is not None and ctx.needs_input_grad[4]
        dht = None if dht is None else dht.float().contiguous()
        dq, dk, dv, dg, dh0 = kernels.chunk_gla_bwd(
            q, k, v, gcum, A, ctx.scale, h0, ctx.chunking, do.contiguous(), dht, need_dh0
        )
        if dh0 is not None:
            dh0 = dh0.to(ctx.initial_state_dtype)
        return dq, dk, dv, dg.to(ctx.g_dtype), dh0, None, None, None


def _triton_gla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, n):
    B, T, H, K = q.shape
    V = v.shape[-1]
    packed = [x.reshape(B * T, H, -1).contiguous() for x in (q, k, v, g)]
    chunking = chunking_for(B, T, kernels.CHUNK, q.device, cu_seqlens)
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, g, initial_state)
    )
    if not wants_grad and B * T <= RECURRENT_MAX_TOKENS * n:
        h0 = None if initial_state is None else initial_state.float().contiguous()
        o, ht = kernels.recurrent_gla_fwd(*packed, scale, h0, chunking.cu_seqlens, output_final_state)
    else:
        o, ht = _ChunkGLA.apply(*packed, initial_state, scale, chunking, output_final_state)
    return o.view(B, T, H, V), ht


def gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention: ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = scale S_t^T q_t``.

    Args:
        q: [B, T, H, K] queries.
        k: [B, T, H, K] keys.
        v: [B, T, H, V] values.
        g: [B, T, H, K] log decays per key channel, <= 0 (any floating dtype; used in float32).
            Values as small as -20 per token are fine: decay ratios are formed in log space
            inside sub-chunks of 16 tokens.
        scale: multiplies the queries; defaults to ``K ** -0.5``.
        initial_state: [N, H, K, V] state before the first token of each sequence
            (N = B, or the number of packed sequences); float32 by convention.
        output_final_state: also return the state after the last token.
        cu_seqlens: [N+1] int32/int64 boundaries of sequences packed as
            ``[1, sum(T_i), ...]``; states reset at every boundary.
        backend: None (automatic), ``"reference"`` or ``"triton"``.

    Returns:
        o: [B, T, H, V] in the inputs' dtype.
        final_state: [N, H, K, V] float32 (float64 for float64 inputs), or None.
    """
    n = _check_inputs(q, k, v, g, initial_state, cu_seqlens)
    T, K, V = q.shape[1], q.shape[3], v.shape[-1]
    scale = check_scale(scale, K**-0.5)
    name = select_backend("gla", backend, q.device, ("triton", "reference"),
                          {"triton": kernels.unsupported(q.dtype, K, V)})
    if T == 0:
        B, _, H, _ = q.shape
        return no_tokens_result((B, 0, H, V), (n, H, K, V), initial_state, output_final_state, q)
    if name == "triton":
        return _triton_gla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, n)
    return gla_chunked(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
