"""H-Net's dynamic chunking: chunk_select and ema_dechunk against a token loop, gradients to p by finite
differences in float64, the Triton ssd path against the reference, and a split run equal to one call."""

import pytest
import torch

from seqmix.kernels import chunk_select, ema_dechunk
from tests.helpers import DEVICE, TOL, assert_rel
from tests.kernels.pooling.oracle import cu, sequences

D, HEAD = 4, 2


def dechunk_loop(z, p, b, e0):
    """Per sequence: the EMA over its chunks, read by every token at the last boundary at or before it."""
    e, k, out = e0, 0, []
    pc = p.clamp(1e-4, 1 - 1e-4)
    for t in range(b.shape[0]):
        if b[t] > 0.5:
            e = pc[k] * z[k] + (1 - pc[k]) * e
            k += 1
        out.append(e)
    return (torch.stack(out) if out else e0.new_zeros(0, e0.shape[-1])), e


def _case(lengths, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    L = sum(lengths)
    x = torch.randn(1, L, D, generator=g, dtype=dtype)
    b = (torch.rand(1, L, generator=g) < 0.4).to(dtype)
    for s, e in sequences(lengths):
        if e > s:
            b[0, s] = 1.0  # H-Net starts every sequence with a boundary
    return x, b


def test_chunks_and_dechunk_equal_the_token_loop():
    lengths = [9, 0, 14, 6]
    x, b = _case(lengths, 0)
    chunks, chunk_cu = chunk_select(x, b, cu_seqlens=cu(lengths, "cpu"))
    K = chunks.shape[1]
    assert chunk_cu.tolist() == [0, *torch.tensor([int(b[0, s:e].sum()) for s, e in sequences(lengths)]).cumsum(0)]
    torch.testing.assert_close(chunks[0], x[0][b[0] > 0.5])
    z = torch.randn(1, K, D, dtype=torch.float64)
    p = torch.rand(1, K, dtype=torch.float64).requires_grad_()
    e0 = torch.randn(len(lengths), D, dtype=torch.float64)
    out, final = ema_dechunk(z, p, b, chunk_cu, cu_seqlens=cu(lengths, "cpu"), initial_state=e0,
                             output_final_state=True, head_dim=HEAD, backend="reference")
    bounds = chunk_cu.tolist()
    for i, (s, e) in enumerate(sequences(lengths)):
        want, want_final = dechunk_loop(z[0, bounds[i]:bounds[i + 1]], p[0, bounds[i]:bounds[i + 1]].detach(),
                                        b[0, s:e], e0[i])
        if e > s:
            torch.testing.assert_close(out[0, s:e], want)
        torch.testing.assert_close(final[i], want_final)
    # the gradient reaching p, against central differences of the loop
    g = torch.randn(out.shape, dtype=torch.float64)
    (out * g).sum().backward()

    def loss(pv):
        total = 0.0
        for i, (s, e) in enumerate(sequences(lengths)):
            if e > s:
                o, _ = dechunk_loop(z[0, bounds[i]:bounds[i + 1]], pv[bounds[i]:bounds[i + 1]], b[0, s:e], e0[i])
                total = total + (o * g[0, s:e]).sum()
        return total

    fd = torch.zeros(K, dtype=torch.float64)
    for k in range(K):
        step = torch.zeros(K, dtype=torch.float64)
        step[k] = 1e-6
        fd[k] = (loss(p[0].detach() + step) - loss(p[0].detach() - step)) / 2e-6
    torch.testing.assert_close(p.grad[0], fd, rtol=1e-5, atol=1e-7)


def test_split_run_equals_one_call():
    """Dechunking two pieces with the EMA state in between equals one call (tokens before the second
    piece's first boundary read the carried state)."""
    x, b = _case([20], 1)
    b[0, 11] = 0.0
    chunks, chunk_cu = chunk_select(x, b)
    z, p = torch.randn_like(chunks), torch.rand(1, chunks.shape[1], dtype=torch.float64)
    full, final = ema_dechunk(z, p, b, chunk_cu, output_final_state=True, head_dim=HEAD, backend="reference")
    k1 = int(b[0, :11].sum())
    first, state = ema_dechunk(z[:, :k1], p[:, :k1], b[:, :11], chunk_cu.new_tensor([0, k1]),
                               output_final_state=True, head_dim=HEAD, backend="reference")
    second, state = ema_dechunk(z[:, k1:], p[:, k1:], b[:, 11:], chunk_cu.new_tensor([0, z.shape[1] - k1]),
                                initial_state=state, output_final_state=True, head_dim=HEAD, backend="reference")
    torch.testing.assert_close(torch.cat([first, second], 1), full)
    torch.testing.assert_close(state, final)


@pytest.mark.parametrize("lengths", [[50], [23, 0, 31]])
def test_triton_ssd_path_matches_reference(lengths):
    x, b = _case(lengths, 2, torch.float32)
    cu_seqlens = cu(lengths, DEVICE)
    chunks, chunk_cu = chunk_select(x.to(DEVICE), b.to(DEVICE), cu_seqlens=cu_seqlens)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(chunks.shape, generator=g).to(DEVICE)
    p = torch.rand(1, chunks.shape[1], generator=g).to(DEVICE)
    go = torch.randn(1, sum(lengths), D, generator=g).to(DEVICE)
    results = {}
    for backend in ("triton", "reference"):
        zb, pb = z.clone().requires_grad_(), p.clone().requires_grad_()
        out, _ = ema_dechunk(zb, pb, b.to(DEVICE), chunk_cu, cu_seqlens=cu_seqlens, head_dim=HEAD, backend=backend)
        (out * go).sum().backward()
        results[backend] = (out, zb.grad, pb.grad)
    for name, a, r in zip(("out", "dz", "dp"), results["triton"], results["reference"]):
        assert_rel(a, r, TOL[torch.float32], name)
