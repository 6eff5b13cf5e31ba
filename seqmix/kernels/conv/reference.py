"""The short causal depthwise convolution in plain PyTorch (``F.conv1d`` over the state-prefixed input)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqmix.kernels.conv.step import causal_conv1d_step


def _conv_dense(x, weight, bias, activation, state):
    """x [B, T, D] and state [B, D, W-1], both in the compute dtype. Returns (out [B, T, D], new state)."""
    W = weight.shape[1]
    xs = torch.cat([state.transpose(1, 2), x], 1)
    if x.shape[1] == 0:  # F.conv1d refuses inputs shorter than the kernel
        return x, state
    out = F.conv1d(xs.transpose(1, 2), weight.unsqueeze(1), bias, groups=weight.shape[0]).transpose(1, 2)
    if activation == "silu":
        out = F.silu(out)
    return out, xs[:, xs.shape[1] - (W - 1) :].transpose(1, 2)


def causal_conv1d_reference(x, weight, bias=None, activation=None, initial_state=None, output_final_state=False,
                            cu_seqlens=None):
    """Same arguments and results as :func:`seqmix.kernels.causal_conv1d` (computed in float32 or float64)."""
    B, T, D = x.shape
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
    cost less than ``F.conv1d``'s set-up."""
    if x.shape[1] == 1 and weight.shape[1] > 1:
        out, final = causal_conv1d_step(x[:, 0], weight, bias, activation, conv_state)
        out = out.unsqueeze(1)
    else:
        out, final = causal_conv1d_reference(x, weight, bias, activation, conv_state, output_final_state=True)
    with torch.no_grad():
        conv_state.copy_(final)
    return out
