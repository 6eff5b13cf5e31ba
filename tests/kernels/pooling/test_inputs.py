"""Bad input to the segment ops gets a ValueError naming the argument."""

import pytest
import torch

from seqmix.kernels import BackendUnavailable, chunk_select, ema_dechunk, segment_pool, segment_upsample
from tests.helpers import DEVICE

B, T, D = 2, 6, 4
BACKENDS = ["reference", "triton"]


def _b(**kw):
    return (torch.rand(B, T, generator=torch.Generator().manual_seed(0)) < 0.5).float().to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "x, b, kw, match",
    [
        (torch.randn(B, T), None, {}, r"x must have shape \[B, T, D\]"),
        (None, torch.zeros(B, T + 1), {}, r"boundaries must have shape \[B, T\]"),
        (None, torch.zeros(B, T, 1), {}, r"boundaries must have shape \[B, T\]"),
        (None, torch.zeros(B, T, dtype=torch.int64), {}, "boundaries must be a floating tensor"),
        (None, None, {"max_segments": 0}, "max_segments must be a positive integer"),
        (None, None, {"max_segments": 2.0}, "max_segments must be a positive integer"),
        (None, None, {"cu_seqlens": torch.tensor([0, 3, 12])}, "with cu_seqlens the inputs must be packed"),
    ],
)
def test_bad_pool_input(backend, x, b, kw, match):
    x = torch.randn(B, T, D) if x is None else x
    b = _b() if b is None else b
    kw = {n: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for n, v in kw.items()}
    with pytest.raises(ValueError, match=match):
        segment_pool(x.to(DEVICE), b.to(DEVICE), backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [1.5, -0.1, float("nan")])
def test_boundaries_outside_0_1_are_refused(backend, value):
    """A check of the boundaries' values: a ValueError on CPU tensors, before any backend is chosen (on CUDA
    tensors a device-side assertion, tests/kernels/test_checks.py)."""
    x, y, b = torch.randn(B, T, D), torch.randn(B, 3, D), _b().cpu()
    b[1, 2] = value
    with pytest.raises(ValueError, match=r"boundaries must lie in \[0, 1\] \(1 marks a boundary\), got"):
        segment_pool(x, b, backend=backend)
    with pytest.raises(ValueError, match=r"boundaries must lie in \[0, 1\]"):
        segment_upsample(y, b, backend=backend)
    with pytest.raises(ValueError, match=r"boundaries must lie in \[0, 1\]"):
        chunk_select(x, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_upsample_input(backend):
    y = torch.randn(B, 3, D, device=DEVICE)
    with pytest.raises(ValueError, match=r"y must have shape \[N, S\+1, D\]"):
        segment_upsample(y[:, :0], _b(), backend=backend)
    with pytest.raises(ValueError, match=r"y must have shape \[N, S\+1, D\]"):
        segment_upsample(y[:1], _b(), backend=backend)
    with pytest.raises(ValueError, match=r"boundaries must have shape \[B, T\]"):
        segment_upsample(y, _b()[0], backend=backend)
    with pytest.raises(ValueError, match="cu_seqlens must end at the packed length"):
        segment_upsample(y, _b()[:1], cu_seqlens=torch.tensor([0, 2, 5], device=DEVICE), backend=backend)


def test_bad_chunk_input():
    x = torch.randn(B, T, D, device=DEVICE)
    chunks, cu = chunk_select(x, _b())
    p = torch.rand(1, chunks.shape[1], device=DEVICE)
    with pytest.raises(ValueError, match=r"p must have shape \[1, K\]"):
        ema_dechunk(chunks, p[:, 1:], _b(), cu, head_dim=2)
    with pytest.raises(ValueError, match="head_dim=3 must divide"):
        ema_dechunk(chunks, p, _b(), cu, head_dim=3)
    with pytest.raises(ValueError, match=r"initial_state must have shape \[N, D\]"):
        ema_dechunk(chunks, p, _b(), cu, head_dim=2, initial_state=torch.zeros(B, D + 1, device=DEVICE))


def test_float64_has_no_triton_kernel():
    with pytest.raises(BackendUnavailable, match="float64"):
        segment_pool(torch.randn(B, T, D, dtype=torch.float64, device=DEVICE), _b(), backend="triton")
