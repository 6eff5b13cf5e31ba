"""generate's sampler (seqmix/kernels/sampling.py): each token drawn with its probability, the C++ kernel and the
tensor ops drawing the same tokens from the same uniforms, greedy at temperature 0, and its errors."""

import numpy as np
import pytest
import torch

from seqmix.kernels import cpu
from seqmix.kernels.backend import BackendUnavailable
from seqmix.kernels.sampling import sample_reference, token_sampler
from tests.helpers import DEVICE, require_cpu_kernels

BACKENDS = ("reference", "cpu")


def _draw(backend, logits, uniforms, temperature, top_k):
    """The backend's tokens (on the CPU) for logits [B, V] and uniforms [B, V] on the CPU; the tensor ops run on
    the device under test."""
    if backend == "cpu":
        require_cpu_kernels()
        return cpu.extension().sample_rows(logits, uniforms, temperature, top_k or 0)
    return sample_reference(logits.to(DEVICE), uniforms.to(DEVICE, copy=True), temperature, top_k).cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_each_token_is_drawn_with_its_probability(backend, dtype):
    """Frequencies over 40000 draws a row against softmax(logits / T) over the top k, within 5 standard errors
    (a fixed seed: the same draws every run); nothing outside the top k."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0], [0.0, 0.1, -0.2, 0.3, 4.0, -3.0]], dtype=dtype)
    temperature, top_k, n = 0.7, 4, 40000
    rows = logits.repeat_interleave(n, 0)
    uniforms = torch.rand(rows.shape, generator=torch.Generator().manual_seed(11), dtype=dtype)
    draws = _draw(backend, rows, uniforms, temperature, top_k).view(2, n)
    kept = logits >= logits.topk(top_k, -1).values[:, -1:]
    want = (logits / temperature).masked_fill(~kept, float("-inf")).softmax(-1).double()
    got = torch.stack([torch.bincount(row, minlength=logits.shape[1]) for row in draws]).double() / n
    assert got[~kept].eq(0).all(), "a token outside the top k was drawn"
    stderr = (want * (1 - want) / n).sqrt()
    assert ((got - want).abs() <= 5 * stderr)[kept].all(), f"frequencies {got.tolist()}, probabilities {want.tolist()}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_uniform_of_zero_does_not_tie_the_one_token_left_with_the_rest(backend):
    """Top-k of 1 is the greedy token, also where its uniform is exactly 0 (one draw in 2^24): clamped off 0."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    for uniforms in (torch.rand(3, 50), torch.zeros(3, 50)):
        assert _draw(backend, logits, uniforms, 1.3, 1).equal(logits.argmax(-1, keepdim=True))


@pytest.mark.parametrize("scale", [4.0, 300.0])
@pytest.mark.parametrize("top_k", [None, 1, 40, 320])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_cpu_kernel_draws_the_tensor_ops_tokens(dtype, top_k, scale):
    """From the same uniforms, the same token at all but ties to the last bits: 4096 rows of a 320-token vocabulary,
    logits of a trained LM's spread and far beyond exp's range (a confident model at a low temperature); no row
    differs here."""
    require_cpu_kernels()
    g = torch.Generator().manual_seed(5)
    logits = (scale * torch.randn(4096, 320, generator=g)).to(dtype)
    uniforms = torch.rand(logits.shape, generator=g, dtype=dtype)
    for temperature in (0.7, 1.0):
        assert _draw("cpu", logits, uniforms, temperature, top_k).equal(
            _draw("reference", logits, uniforms, temperature, top_k))


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_sampler_draws_from_its_generator_and_is_greedy_at_temperature_zero(backend):
    if backend == "cpu":
        require_cpu_kernels()
    device = DEVICE if backend == "reference" else torch.device("cpu")
    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(1)).to(device)
    greedy = token_sampler(0, None, None, logits, backend=backend)
    assert greedy(logits).equal(logits.argmax(-1, keepdim=True))
    a, b = (token_sampler(0.9, 20, torch.Generator(device=device).manual_seed(7), logits, backend=backend)
            for _ in range(2))
    draws = [a(logits) for _ in range(20)]
    assert all(d.equal(b(logits)) for d in draws), "one generator's seed must give one sequence of draws"
    assert len({tuple(d.flatten().tolist()) for d in draws}) > 1, "successive draws must differ"
    assert all(d.dtype == torch.int64 and d.shape == (3, 1) for d in draws)


def test_bad_arguments_are_refused():
    logits = torch.randn(2, 10)
    for temperature in (-1.0, float("nan"), float("inf"), "hot", None):
        with pytest.raises(ValueError, match="temperature"):
            token_sampler(temperature, None, None, logits)
    for top_k in (0, 11, 2.5, "3"):
        with pytest.raises(ValueError, match="top_k"):
            token_sampler(1.0, top_k, None, logits)
    draw = token_sampler(np.float32(0.5), np.int64(3), None, logits)  # numpy's scalars are numbers too
    assert draw(logits).shape == (2, 1)
    with pytest.raises(ValueError, match="logits must be"):
        token_sampler(1.0, None, None, torch.randn(10))
    with pytest.raises(BackendUnavailable, match="logits must be float32 or float64"):
        token_sampler(1.0, None, None, logits.half(), backend="cpu")


def test_the_cpu_kernel_checks_its_arguments():
    require_cpu_kernels()
    rows = cpu.extension().sample_rows
    logits = torch.randn(2, 10)
    with pytest.raises(RuntimeError, match="uniforms must have logits' shape"):
        rows(logits, torch.rand(2, 9), 1.0, 0)
    with pytest.raises(RuntimeError, match="top_k must be in"):
        rows(logits, torch.rand(2, 10), 1.0, 11)
    with pytest.raises(RuntimeError, match="temperature must be finite and > 0"):
        rows(logits, torch.rand(2, 10), 0.0, 0)
    with pytest.raises(RuntimeError, match="dtype"):
        rows(logits, torch.rand(2, 10, dtype=torch.float64), 1.0, 0)
