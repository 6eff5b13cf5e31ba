"""The short causal depthwise convolution in plain PyTorch: W shifted multiply-adds over the state-prefixed
input in the [B, T, D] layout, SiLU fused, with a hand-written backward (docs/design.md, "CPU references
(issue 14)")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from seqmix.kernels.conv.step import causal_conv1d_step
from seqmix.kernels.library import autocast_off, forward_outputs


def _pre_activation(x, head, taps, bias):
    """bias + sum_j taps[j] * xs[:, j : j + T] where xs = [head, x]: x [B, T, D], head [B, W-1, D] (the W-1
    inputs before x, oldest first), taps [W, D] contiguous rows. Tap j reads x shifted by s = W-1-j rows, and
    the head for the first s rows: one multiply-add pass over x per tap, no concatenated copy of x."""
    T, W = x.shape[1], taps.shape[0]
    pre = torch.mul(x, taps[-1]) if bias is None else torch.addcmul(bias, x, taps[-1])
    for s in range(1, W):
        n = min(s, T)
        if T > s:
            pre[:, s:].addcmul_(x[:, : T - s], taps[W - 1 - s])
        pre[:, :n].addcmul_(head[:, W - 1 - s : W - 1 - s + n], taps[W - 1 - s])
    return pre


class _CausalConv1d(torch.autograd.Function):
    """out = act(pre), pre = bias + sum_j weight[:, j] * xs[:, j : j + T] with xs = [state^T, x]; also the final
    state (the last W-1 rows of xs). Saves only the inputs and recomputes pre in the backward rather than
    storing it: W multiply-adds cost less than keeping another [B, T, D] alive."""

    @staticmethod
    def forward(ctx, x, weight, bias, state, silu):
        T, W = x.shape[1], weight.shape[1]
        head, taps = state.transpose(1, 2), weight.t().contiguous()
        out = _pre_activation(x, head, taps, bias)
        if silu:
            F.silu(out, inplace=True)
        ctx.save_for_backward(x, head, taps, bias)
        ctx.silu = silu
        ctx.set_materialize_grads(False)
        final = torch.cat([head[:, min(T, W - 1) :], x[:, max(0, T - (W - 1)) :]], 1)
        return forward_outputs(out, final.transpose(1, 2).contiguous())

    @staticmethod
    @once_differentiable
    @autocast_off
    def backward(ctx, dout, dfinal):
        x, head, taps, bias = ctx.saved_tensors
        (B, T, D), W = x.shape, taps.shape[0]
        if dout is None:
            dpre = x.new_zeros(B, T, D)
        elif ctx.silu:  # written over the recomputed pre-activation: no new [B, T, D] buffer
            pre = _pre_activation(x, head, taps, bias)
            dpre = torch.ops.aten.silu_backward.grad_input(dout, pre, grad_input=pre)
        else:
            dpre = dout
        # Fresh large buffers cost page faults on the CPU, so dx's is allocated once and first holds the
        # products dpre * (x shifted) whose sums are dweight.
        dx = torch.empty(B, T, D, dtype=x.dtype, device=x.device)
        dweight = None
        if ctx.needs_input_grad[1]:
            dweight = x.new_empty(D, W)
            for s in range(W):
                n = min(s, T)
                dweight[:, W - 1 - s] = (dpre[:, :n] * head[:, W - 1 - s : W - 1 - s + n]).sum((0, 1))
                if T > s:  # the product written contiguous (the front of dx's buffer): a fast reduction
                    product = dx.view(-1)[: B * (T - s) * D].view(B, T - s, D)
                    dweight[:, W - 1 - s] += torch.mul(dpre[:, s:], x[:, : T - s], out=product).sum((0, 1))
        dbias = dpre.sum((0, 1)) if bias is not None and ctx.needs_input_grad[2] else None
        # dxs[p] = sum_j taps[j] * dpre[p - j] over xs = [head, x], x's rows (p >= W-1) and the head's apart;
        # the final state's gradient adds to the last W-1 rows of xs.
        torch.mul(dpre, taps[-1], out=dx)
        for s in range(1, min(W, T)):
            dx[:, : T - s].addcmul_(dpre[:, s:], taps[W - 1 - s])
        dhead = x.new_zeros(B, W - 1, D)
        for j in range(W - 1):
            n = min(W - 1 - j, T)
            dhead[:, j : j + n].addcmul_(dpre[:, :n], taps[j])
        if dfinal is not None:
            tail = dfinal.transpose(1, 2)
            k = max(0, W - 1 - T)  # rows of the final state that are still the initial state's
            dhead[:, T : T + k] += tail[:, :k]
            dx[:, T - (W - 1 - k) :] += tail[:, k:]
        dstate = dhead.transpose(1, 2) if ctx.needs_input_grad[3] else None
        return dx, dweight, dbias, dstate, None


def _conv_dense(x, weight, bias, activation, state):
    """x [B, T, D] and state [B, D, W-1], both in the compute dtype. Returns (out [B, T, D], new state)."""
    if x.shape[1] == 0:  # no token: the state passes through
        return x, state
    return _CausalConv1d.apply(x, weight, bias, state, activation == "silu")


@autocast_off
def causal_conv1d_reference(x, weight, bias=None, activation=None, initial_state=None, output_final_state=False,
                            cu_seqlens=None):
    """Same arguments and results as :func:`seqmix.kernels.causal_conv1d` (computed in float32 or float64)."""
    B, _, D = x.shape
    W = weight.shape[1]
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    x32, w32 = x.to(dt), weight.to(dt)
    b32 = None if bias is None else bias.to(dt)
    if cu_seqlens is None:
        state = x32.new_zeros(B, D, W - 1) if initial_state is None else initial_state.to(dt)
        out, final = _conv_dense(x32, w32, b32, activation, state)
    else:
        bounds = cu_seqlens.tolist()
        outs, finals = [], []
        for n, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
            state = x32.new_zeros(1, D, W - 1) if initial_state is None else initial_state[n : n + 1].to(dt)
            out_n, final_n = _conv_dense(x32[:, s:e], w32, b32, activation, state)
            outs.append(out_n)
            finals.append(final_n)
        out, final = torch.cat(outs, 1), torch.cat(finals)
    return out.to(x.dtype), (final if output_final_state else None)


def causal_conv1d_update_reference(x, conv_state, weight, bias=None, activation=None):
    """Same arguments and result as :func:`seqmix.kernels.causal_conv1d_update` (x [B, T, D]):
    one :func:`causal_conv1d_reference` call from the state, whose final state is copied back. One token
    (a decoding step, W > 1) takes the window form of :func:`causal_conv1d_step` instead: a product and a sum
    cost less than a call of the whole reference."""
    if x.shape[1] == 1 and weight.shape[1] > 1:
        out, final = causal_conv1d_step(x[:, 0], weight, bias, activation, conv_state)
        out = out.unsqueeze(1)
    else:
        out, final = causal_conv1d_reference(x, weight, bias, activation, conv_state, output_final_state=True)
    with torch.no_grad():
        conv_state.copy_(final)
    return out
