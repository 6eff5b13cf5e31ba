"""Attention specifics: the SDPA paths against the explicit softmax, rotary positions, config errors
(the Mixer contract, with the cache as state, is in test_mixers.py)."""

import pytest
import torch

from seqmix.archs import Attention
from seqmix.archs.attention import rotary
from tests.helpers import DEVICE, TOL, assert_rel


def _layer(backend, seed=0):
    torch.manual_seed(seed)
    return Attention(hidden_size=32, num_heads=2, backend=backend).to(DEVICE)


def test_sdpa_matches_explicit_softmax_with_gradients():
    x = torch.randn(2, 37, 32, device=DEVICE)
    results = {}
    for backend in ("sdpa", "reference"):
        layer, xb = _layer(backend), x.clone().requires_grad_()
        y, _ = layer(xb)
        y.square().sum().backward()
        results[backend] = [y, xb.grad, *(p.grad for p in layer.parameters())]
    for what, a, b in zip(["output", "dx", "dqkv", "do"], results["sdpa"], results["reference"], strict=True):
        assert_rel(a, b, TOL[torch.float32], what)


def test_rotary_scores_depend_only_on_the_distance():
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(i, j):
        (qi,), (kj,) = rotary(torch.tensor([[i]]), 10000.0, q), rotary(torch.tensor([[j]]), 10000.0, k)
        return (qi * kj).sum().item()

    # rotary works in float32, so equal up to float32 rounding of the angles
    assert score(9, 4) == pytest.approx(score(105, 100), rel=1e-5)
    assert score(9, 4) != pytest.approx(score(9, 5), rel=1e-3)
    assert rotary(torch.tensor([[0]]), 10000.0, q)[0].equal(q)


def test_configuration_errors():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        Attention(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="head_dim must be even"):
        Attention(hidden_size=30, num_heads=2)
    with pytest.raises(ValueError, match="backend must be None or one of"):
        Attention(hidden_size=32, num_heads=2, backend="triton")
