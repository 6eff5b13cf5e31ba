"""The segment ops written the most obvious way, token by token in float64, and their relaxed
formulation (docs/math/pooling.md): smooth in the boundary values around a hard pattern ``b0``."""

import torch


def relaxed_pool(x, b, b0, S):
    """x [T, D], b [T] real, b0 [T] the hard pattern fixing the segments' slots: the running sum
    ``r_t = (1 - b_{t-1}) r_{t-1} + x_t`` (and count alike), read at the s-th boundary of b0."""
    out = x.new_zeros(S, x.shape[1])
    r, n, s = x.new_zeros(x.shape[1]), x.new_zeros(()), 0
    for t in range(x.shape[0]):
        if t > 0:
            r, n = (1 - b[t - 1]) * r, (1 - b[t - 1]) * n
        r, n = r + x[t], n + 1
        if b0[t] > 0.5:
            if s < S:
                out = out.index_put((torch.tensor(s),), r / n)
            s += 1
    return out


def relaxed_upsample(y, b, b0):
    """y [S+1, D], b [T] real: ``o_t = b_t y[min(sigma_t + 1, S)] + (1 - b_t) o_{t-1}``, o_{-1} = y[0],
    sigma_t the boundaries of b0 before t."""
    S = y.shape[0] - 1
    o, sigma, outs = y[0], 0, []
    for t in range(b.shape[0]):
        o = b[t] * y[min(sigma + 1, S)] + (1 - b[t]) * o
        outs.append(o)
        sigma += int(b0[t] > 0.5)
    return torch.stack(outs) if outs else y.new_zeros(0, y.shape[1])


def pool_obvious(x, b0, S):
    """Mean of each closed segment of one sequence, the first S of them, zero rows after."""
    out, start, s = x.new_zeros(S, x.shape[1]), 0, 0
    for t in range(x.shape[0]):
        if b0[t] > 0.5:
            if s < S:
                out[s] = x[start : t + 1].mean(0)
            s, start = s + 1, t + 1
    return out


def upsample_obvious(y, b0):
    S = y.shape[0] - 1
    c = torch.cumsum((b0 > 0.5).long(), 0).clamp_max(S)
    return y[c]


def sequences(lengths):
    """(start, end) of each packed sequence."""
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    return list(zip(bounds[:-1], bounds[1:]))


def cu(lengths, device):
    return torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)
