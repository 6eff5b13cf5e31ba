"""Attention specifics: the SDPA paths against the explicit softmax, rotary positions, the C++ decoding step,
config errors (the Mixer contract, with the cache as state, is in test_mixers.py)."""

import pytest
import torch

from seqmix.archs import Attention
from seqmix.archs.attention import rotary
from seqmix.kernels.backend import recording
from tests.helpers import DEVICE, TOL, assert_rel, require_cpu_kernels


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


PROMPTS, STEPS = (5, 19), 6  # two sequences of different lengths: their new tokens go to different slots


def _decode_packed(layer, step, xs, capacity):
    """The sequences xs [T_i + STEPS, hidden] prefilled packed (their first PROMPTS tokens) into caches of
    ``capacity`` slots, then STEPS one-token steps of both through ``step``: the steps' outputs [2, STEPS,
    hidden] and the final state."""
    with torch.no_grad():
        cu = torch.tensor([0, PROMPTS[0], sum(PROMPTS)])
        packed = torch.cat([x[:n] for x, n in zip(xs, PROMPTS, strict=True)])[None]
        _, state = layer(packed, layer.init_state(2, capacity=capacity), cu_seqlens=cu)
        outs = []
        for t in range(STEPS):
            y, state = step(torch.stack([x[n + t] for x, n in zip(xs, PROMPTS, strict=True)])[:, None], state)
            outs.append(y)
    return torch.cat(outs, 1), state


# Head sizes 20 (not a multiple of a vector) and 80 (more channels than one pass over the values holds).
@pytest.mark.parametrize("hidden, heads", [(60, 3), (160, 2)])
def test_fused_decoding_step_equals_the_tensor_op_steps(monkeypatch, hidden, heads):
    """A one-token step into preallocated caches on the CPU is one C++ call with its projections
    (step_cpu.attention_step): outputs and caches equal the tensor-op steps' (SEQMIX_BACKEND=reference) to
    1e-12 in float64 and 1e-5 in float32, and the outputs equal the training call's; cache lengths that are
    not a multiple of a vector; a compiled step (fullgraph) equals the eager one; a full cache raises."""
    require_cpu_kernels()
    monkeypatch.delenv("SEQMIX_BACKEND", raising=False)
    torch.manual_seed(3)
    layer = Attention(hidden_size=hidden, num_heads=heads)
    gen = torch.Generator().manual_seed(4)
    capacity = max(PROMPTS) + STEPS + 3
    for dtype in (torch.float64, torch.float32):
        layer = layer.to(dtype)
        xs = [torch.randn(n + STEPS, hidden, generator=gen, dtype=torch.float64).to(dtype) for n in PROMPTS]
        with recording() as choices:
            y, state = _decode_packed(layer, layer, xs, capacity)
        assert ("attention_step", "cpu") in {(c.op, c.backend) for c in choices}
        monkeypatch.setenv("SEQMIX_BACKEND", "reference")
        with recording() as choices:
            want, want_state = _decode_packed(layer, layer, xs, capacity)
        monkeypatch.delenv("SEQMIX_BACKEND")
        assert ("attention_step", "cpu") not in {(c.op, c.backend) for c in choices}
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert_rel(y, want, tol, f"{dtype}: decoded output against the tensor-op steps")
        assert torch.equal(state["length"], want_state["length"])
        for name in ("k", "v"):
            assert state[name].dtype == dtype
            assert_rel(state[name], want_state[name], tol, f"{dtype}: cache {name!r} against the tensor-op steps")
        with torch.no_grad():
            for i, (x, n) in enumerate(zip(xs, PROMPTS, strict=True)):
                full, _ = layer(x[None])
                assert_rel(y[i], full[0, n:], tol * 10, f"{dtype}: sequence {i} decoded against the training call")
    torch._dynamo.reset()
    got, got_state = _decode_packed(layer, torch.compile(layer, fullgraph=True, backend="eager"), xs, capacity)
    torch.testing.assert_close(got, y, rtol=0, atol=0)
    for name in ("k", "v", "length"):
        torch.testing.assert_close(got_state[name], state[name], rtol=0, atol=0)
    with torch.no_grad(), pytest.raises(RuntimeError, match="no slot left for the new token"):
        _decode_packed(layer, layer, xs, max(PROMPTS) + STEPS - 1)
