"""Gated linear attention (GLA): public op, argument checks, backend dispatch and the kernels as
torch.library ops (seqmix/kernels/op.py runs them). The math: docs/math/gla.md.

The subpackage is named after the family, not the op: a ``gla/`` subpackage would be shadowed
by the function :func:`seqmix.kernels.gla`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqmix.kernels import triton_limits
from seqmix.kernels.backend import LazyModule, select_backend
from seqmix.kernels.checks import (
    check_key_value_state,
    check_log_decay,
    check_query_key_value,
    check_same_dtype,
    check_scale,
)
from seqmix.kernels.gated_linear_attention.reference import gla_chunked, gla_recurrent
from seqmix.kernels.library import custom_op
from seqmix.kernels.op import (
    FusedOp,
    as_input_grads,
    chunking_of,
    fake_key_value_outputs,
    no_tokens_result,
    or_empty,
    register_autograd,
    run_fused,
)
from seqmix.kernels.triton_limits import GLA_CHUNK

__all__ = ["gla", "gla_chunked", "gla_recurrent"]

kernels = LazyModule("seqmix.kernels.gated_linear_attention.triton")

def _check_inputs(q, k, v, g, initial_state, cu_seqlens):
    check_query_key_value(q, k, v)
    check_same_dtype(("q", "k", "v"), (q, k, v))
    check_log_decay("g", g, q.shape, dims="[B, T, H, K]", like=q)
    return check_key_value_state(q, v, initial_state, cu_seqlens)


# The kernels as torch.library ops (the protocol of seqmix/kernels/op.py): q, k, g [L, H, K], v [L, H, V]
# packed; h0 [N, H, K, V] float32.

@custom_op("seqmix::gla_chunk_fwd", mutates_args=())
def _chunk_fwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor, h0: Tensor | None, cu_seqlens: Tensor,
               chunk_index: Tensor, chunk_offsets: Tensor, scale: float, store_final: bool
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (o, final state, and for the backward: the in-chunk cumulative g [L, H, K] and the
    scores [L, H, 64], both float32)."""
    chunking = chunking_of(cu_seqlens, chunk_index, chunk_offsets, GLA_CHUNK)
    o, ht, gcum, scores = kernels.chunk_gla_fwd(q, k, v, g, scale, h0, chunking, store_final)
    return o, or_empty(ht, q), gcum, scores


@_chunk_fwd.register_fake
def _(q, k, v, g, h0, cu_seqlens, chunk_index, chunk_offsets, scale, store_final):
    L, H, K = q.shape
    f32 = {"dtype": torch.float32}
    return *fake_key_value_outputs(q, v, cu_seqlens, store_final), q.new_empty((L, H, K), **f32), q.new_empty(
        (L, H, GLA_CHUNK), **f32)


@custom_op("seqmix::gla_chunk_bwd", mutates_args=())
def _chunk_bwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor, h0: Tensor | None, cu_seqlens: Tensor,
               chunk_index: Tensor, chunk_offsets: Tensor, gcum: Tensor, scores: Tensor, scale: float,
               store_final: bool, do: Tensor, dht: Tensor | None, needs: list[bool]
               ) -> list[Tensor]:
    chunking = chunking_of(cu_seqlens, chunk_index, chunk_offsets, GLA_CHUNK)
    dq, dk, dv, dg, dh0 = kernels.chunk_gla_bwd(
        q, k, v, gcum, scores, scale, h0, chunking, do, dht, h0 is not None and needs[4]
    )
    inputs = (q, k, v, g, h0, cu_seqlens, chunk_index, chunk_offsets)
    return as_input_grads((dq, dk, dv, dg, dh0, None, None, None), inputs, needs, q)


register_autograd(_chunk_fwd, _chunk_bwd, num_inputs=8)


@custom_op("seqmix::gla_recurrent_fwd", mutates_args=())
def _recurrent_fwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor, h0: Tensor | None, cu_seqlens: Tensor,
                   chunk_index: Tensor, chunk_offsets: Tensor, scale: float, store_final: bool
                   ) -> tuple[Tensor, Tensor]:
    o, ht = kernels.recurrent_gla_fwd(q, k, v, g, scale, h0, cu_seqlens, store_final)
    return o, or_empty(ht, q)


@_recurrent_fwd.register_fake
def _(q, k, v, g, h0, cu_seqlens, chunk_index, chunk_offsets, scale, store_final):
    return fake_key_value_outputs(q, v, cu_seqlens, store_final)


FUSED = FusedOp(GLA_CHUNK, _chunk_fwd, _recurrent_fwd)


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
                          {"triton": triton_limits.unsupported("q, k, v", q.dtype, K=K, V=V)})
    B, _, H, _ = q.shape
    if B * T == 0:
        return no_tokens_result((B, T, H, V), (n, H, K, V), initial_state, output_final_state, q)
    if name == "triton":
        return run_fused(FUSED, (q, k, v, g), (), initial_state, (scale,), output_final_state, cu_seqlens)
    return gla_chunked(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
