"""The reference segment ops against the token-by-token oracle: forward values, the gradients of x and y,
and the boundary gradient against finite differences of the relaxed formulation, in float64."""

import pytest
import torch

from seqmix.kernels import segment_pool, segment_upsample
from tests.helpers import DEVICE
from tests.kernels.pooling.oracle import (
    cu,
    pool_obvious,
    relaxed_pool,
    relaxed_upsample,
    sequences,
    upsample_obvious,
)

D = 3


def _pattern(T, rate, seed, first=None):
    g = torch.Generator().manual_seed(seed)
    b = (torch.rand(T, generator=g) < rate).double()
    if first is not None:
        b[0] = first
    return b


PATTERNS = {
    "random": lambda T: _pattern(T, 0.3, 1),
    "none": lambda T: torch.zeros(T, dtype=torch.float64),
    "all": lambda T: torch.ones(T, dtype=torch.float64),
    "first": lambda T: _pattern(T, 0.3, 2, first=1.0),
    "last_only": lambda T: torch.nn.functional.one_hot(torch.tensor(T - 1), T).double(),
}


def _finite_difference(f, b, eps=1e-6):
    grads = torch.zeros_like(b)
    for j in range(b.numel()):
        e = torch.zeros_like(b)
        e[j] = eps
        grads[j] = (f(b + e) - f(b - e)) / (2 * eps)
    return grads


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("max_segments", [None, 2])
def test_gradients_equal_the_relaxed_formulation(pattern, max_segments):
    """Pooling then upsampling one sequence: the op's values equal the obvious ones; its x, y and boundary
    gradients equal those of the relaxed formulation, the boundary's checked by central differences."""
    T = 13
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    b0 = PATTERNS[pattern](T)
    b = b0[None].clone().requires_grad_()
    pooled = segment_pool(x, b, max_segments=max_segments, backend="reference")
    S = pooled.shape[1]
    null = torch.randn(1, 1, D, generator=g, dtype=torch.float64)
    y = torch.cat([null, torch.randn(1, S, D, generator=g, dtype=torch.float64)], 1).requires_grad_()
    out = segment_upsample(y, b, backend="reference")
    gp, gu = torch.randn(pooled.shape, generator=g, dtype=torch.float64), torch.randn(out.shape, generator=g,
                                                                                       dtype=torch.float64)
    ((pooled * gp).sum() + (out * gu).sum()).backward()

    torch.testing.assert_close(pooled[0], pool_obvious(x[0].detach(), b0, S))
    torch.testing.assert_close(out[0], upsample_obvious(y[0].detach(), b0))

    def relaxed(bv, xv=x[0].detach(), yv=y[0].detach()):
        return (relaxed_pool(xv, bv, b0, S) * gp[0]).sum() + (relaxed_upsample(yv, bv, b0) * gu[0]).sum()

    fd = _finite_difference(relaxed, b0.clone())
    torch.testing.assert_close(b.grad[0], fd, rtol=1e-6, atol=1e-7)
    xr, yr = x[0].detach().clone().requires_grad_(), y[0].detach().clone().requires_grad_()
    relaxed(b0, xr, yr).backward()
    for op_grad, leaf in ((x.grad[0], xr), (y.grad[0], yr)):
        torch.testing.assert_close(op_grad, torch.zeros_like(leaf) if leaf.grad is None else leaf.grad)


def test_packed_sequences_equal_separate_calls():
    """cu_seqlens (zero-length and boundary-free sequences included): each sequence as if alone."""
    lengths = [7, 0, 12, 5, 9]
    L = sum(lengths)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, L, D, generator=g, dtype=torch.float64, requires_grad=True)
    b = (torch.rand(1, L, generator=g) < 0.35).double()
    b[0, 19:24] = 0  # the fourth sequence has no boundary
    b.requires_grad_()
    pooled = segment_pool(x, b, cu_seqlens=cu(lengths, "cpu"), backend="reference")
    S = pooled.shape[1]
    y = torch.randn(len(lengths), S + 1, D, generator=g, dtype=torch.float64, requires_grad=True)
    out = segment_upsample(y, b, cu_seqlens=cu(lengths, "cpu"), backend="reference")
    (pooled.square().sum() + out.square().sum()).backward()
    for i, (s, e) in enumerate(sequences(lengths)):
        if s == e:
            assert not pooled[i].any() and not y.grad[i].any()
            continue
        xi = x[:, s:e].detach().clone().requires_grad_()
        bi = b[:, s:e].detach().clone().requires_grad_()
        yi = y[i : i + 1].detach().clone().requires_grad_()
        pi = segment_pool(xi, bi, max_segments=S, backend="reference")
        oi = segment_upsample(yi, bi, backend="reference")
        (pi.square().sum() + oi.square().sum()).backward()
        torch.testing.assert_close(pooled[i], pi[0])
        torch.testing.assert_close(out[0, s:e], oi[0])
        torch.testing.assert_close(x.grad[0, s:e], xi.grad[0])
        torch.testing.assert_close(b.grad[0, s:e], bi.grad[0])
        torch.testing.assert_close(y.grad[i], yi.grad[0])


def test_ragged_counts_zero_fill_and_max_segments():
    """Rows with fewer segments are zero-filled; max_segments below a row's count drops its later segments,
    whose tokens then read the last kept row when upsampled."""
    b = torch.tensor([[0, 1, 0, 0, 1, 1, 0, 1.0], [1, 0, 0, 0, 0, 0, 0, 0.0]], dtype=torch.float64)
    x = torch.arange(16, dtype=torch.float64).view(2, 8, 1)
    pooled = segment_pool(x, b, backend="reference")
    assert pooled.shape == (2, 4, 1)
    torch.testing.assert_close(pooled[0, :, 0], torch.tensor([0.5, 3.0, 5.0, 6.5], dtype=torch.float64))
    torch.testing.assert_close(pooled[1, :, 0], torch.tensor([8.0, 0, 0, 0], dtype=torch.float64))
    cut = segment_pool(x, b, max_segments=2, backend="reference")
    torch.testing.assert_close(cut, pooled[:, :2])
    y = torch.arange(6, dtype=torch.float64).view(2, 3, 1)
    out = segment_upsample(y, b, backend="reference")
    torch.testing.assert_close(out[0, :, 0], torch.tensor([0, 1, 1, 1, 2, 2, 2, 2.0], dtype=torch.float64))
    torch.testing.assert_close(out[1, :, 0], torch.full((8,), 4.0, dtype=torch.float64))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_no_tokens(backend):
    x = torch.randn(2, 0, 4, device=DEVICE, requires_grad=True)
    b = torch.zeros(2, 0, device=DEVICE)
    assert segment_pool(x, b, backend=backend).shape == (2, 0, 4)
    pooled = segment_pool(x, b, max_segments=3, backend=backend)
    assert pooled.shape == (2, 3, 4) and not pooled.any()
    y = torch.randn(2, 3, 4, device=DEVICE, requires_grad=True)
    out = segment_upsample(y, b, backend=backend)
    assert out.shape == (2, 0, 4)
    (out.sum() + pooled.sum()).backward()
    assert not y.grad.any() and x.grad.shape == x.shape
    # an empty batch
    x, b, y = torch.randn(0, 5, 4, device=DEVICE), torch.zeros(0, 5, device=DEVICE), torch.randn(0, 3, 4, device=DEVICE)
    assert segment_pool(x, b, max_segments=2, backend=backend).shape == (0, 2, 4)
    assert segment_upsample(y, b, backend=backend).shape == (0, 5, 4)


def test_max_segments_needs_no_host_sync(monkeypatch):
    """With max_segments and tracing on (where the value check is skipped), nothing is read back."""
    x = torch.randn(2, 9, 3, requires_grad=True)
    b = (torch.rand(2, 9) < 0.4).float().requires_grad_()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)

    def refuse(*args, **kwargs):
        raise AssertionError("host sync")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    pooled = segment_pool(x, b, max_segments=4, backend="reference")
    out = segment_upsample(torch.cat([torch.zeros(2, 1, 3), pooled], 1), b, backend="reference")
    out.sum().backward()


def test_max_segments_traces_in_one_graph():
    """torch.compile(fullgraph=True) refuses any host sync: with max_segments the ops trace whole (dynamo with
    the eager backend, so the test compiles no code), forward and backward equal to eager."""
    def pool_and_upsample(x, b, null):
        pooled = segment_pool(x, b, max_segments=6, backend="reference")
        return segment_upsample(torch.cat([null.expand(x.shape[0], 1, -1), pooled], 1), b, backend="reference")

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 20, D, generator=g, requires_grad=True)
    b = (torch.rand(2, 20, generator=g) < 0.3).float().requires_grad_()
    null = torch.randn(1, 1, D, generator=g)
    traced = torch.compile(pool_and_upsample, backend="eager", fullgraph=True)(x, b, null)
    traced.square().sum().backward()
    grads = x.grad.clone(), b.grad.clone()
    x.grad = b.grad = None
    eager = pool_and_upsample(x, b, null)
    eager.square().sum().backward()
    torch.testing.assert_close(traced, eager)
    torch.testing.assert_close(grads[0], x.grad)
    torch.testing.assert_close(grads[1], b.grad)
