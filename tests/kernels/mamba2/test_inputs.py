"""Bad input to ssd gets a ValueError naming the argument; T = 0 gives empty outputs."""

import pytest
import torch

from seqmix.kernels import BackendUnavailable
from seqmix.kernels.mamba2 import ssd
from tests.helpers import DEVICE
from tests.kernels.contract import (
    BAD_CU_SEQLENS,
    check_bad_cu_seqlens,
    check_float64_goes_to_the_reference,
    check_mismatched_devices,
    check_no_tokens,
)

B, T, H, P, G, N = 2, 8, 4, 3, 2, 5
BACKENDS = ["reference", "triton"]


def _inputs(**over):
    g = torch.Generator().manual_seed(0)
    x = {
        "x": torch.randn(B, T, H, P, generator=g),
        "dt": torch.rand(B, T, H, generator=g),
        "A": -torch.rand(H, generator=g) - 0.1,
        "B": torch.randn(B, T, G, N, generator=g),
        "C": torch.randn(B, T, G, N, generator=g),
    }
    x = {n: t.to(DEVICE) for n, t in x.items()}
    x.update({n: t.to(DEVICE) for n, t in over.items()})
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "over, match",
    [
        ({"x": torch.randn(B, T, H)}, r"x must have shape \[B, T, H, P\]"),
        ({"dt": torch.rand(B, T + 1, H)}, r"dt must have shape \[B, T, H\]"),
        ({"A": -torch.rand(H + 1)}, r"A must have shape \[H\]"),
        ({"B": torch.randn(B, T, 3, N), "C": torch.randn(B, T, 3, N)},
         "groups G=3 of B and C must divide the number of heads H=4"),
        ({"B": torch.randn(B, T - 1, G, N)}, r"B must have shape \[B, T, G, N\]"),
        ({"C": torch.randn(B, T, G, N + 1)}, r"C must have shape \[B, T, G, N\] = \(2, 8, 2, 5\)"),
        ({"C": torch.randn(B, T, G, N, dtype=torch.float64)}, "must share one dtype"),
        ({"x": torch.ones(B, T, H, P, dtype=torch.int64)}, "x must be a floating tensor"),
        ({"B": torch.randn(B, T, G, 0), "C": torch.randn(B, T, G, 0)}, "must be positive"),
    ],
)
def test_bad_tensors(backend, over, match):
    with pytest.raises(ValueError, match=match):
        ssd(**_inputs(**over), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [0.0, 0.5])
def test_a_must_be_negative(backend, value):
    """A check of A's values: a ValueError on CPU tensors, before any backend is chosen (on CUDA tensors a
    device-side assertion, tests/kernels/test_checks.py)."""
    inputs = {n: t.cpu() for n, t in _inputs().items()}
    inputs["A"][1] = value
    with pytest.raises(ValueError, match=rf"A must be negative \(A = -exp\(A_log\)\), got values up to {value:g}"):
        ssd(**inputs, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kw, match",
    [
        ({"D": torch.randn(H, P)}, r"D must have shape \[H\]"),
        ({"z": torch.randn(B, T, H, P + 1)}, r"z must have shape \[B, T, H, P\]"),
        ({"dt_bias": torch.randn(1)}, r"dt_bias must have shape \[H\]"),
        ({"initial_state": torch.zeros(B, H, N, P)},
         r"initial_state must have shape \[N, H, P, N\] = \(2, 4, 3, 5\)"),
        ({"dt_limit": (0.5, 0.1)}, "dt_limit must satisfy 0 <= lo <= hi"),
        ({"dt_limit": (-1.0, 1.0)}, "dt_limit must satisfy 0 <= lo <= hi"),
        ({"dt_limit": 3.0}, "dt_limit must be a pair"),
    ],
)
def test_bad_optional_arguments(backend, kw, match):
    kw = {n: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for n, v in kw.items()}
    with pytest.raises(ValueError, match=match):
        ssd(**_inputs(), **kw, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cu, match", BAD_CU_SEQLENS)
def test_bad_cu_seqlens(backend, cu, match):
    x = {n: t.reshape(1, B * T, *t.shape[2:]) if t.dim() > 1 else t for n, t in _inputs().items()}
    check_bad_cu_seqlens(ssd, x, cu, match, backend)


def test_cu_seqlens_needs_packed_batch_and_matching_states():
    with pytest.raises(ValueError, match="packed as \\[1, total, ...\\], got batch size 2"):
        ssd(**_inputs(), cu_seqlens=torch.tensor([0, T], device=DEVICE))
    x = {n: t.reshape(1, B * T, *t.shape[2:]) if t.dim() > 1 else t for n, t in _inputs().items()}
    with pytest.raises(ValueError, match=r"initial_state must have shape \[N, H, P, N\] = \(3, 4, 3, 5\)"):
        ssd(**x, cu_seqlens=torch.tensor([0, 5, 9, 16], device=DEVICE), initial_state=torch.zeros(2, H, P, N))


def test_float64_goes_to_the_reference_unless_triton_is_named():
    check_float64_goes_to_the_reference(ssd, _inputs(), "x, dt, B, C")


def test_state_dims_above_256_go_to_the_reference_unless_triton_is_named():
    x = _inputs(B=torch.randn(B, T, G, 300), C=torch.randn(B, T, G, 300))
    with pytest.raises(BackendUnavailable, match="up to 256, got P=3, N=300"):
        ssd(**x, backend="triton")
    y, _ = ssd(**x)
    assert y.shape == (B, T, H, P) and torch.isfinite(y).all()


@pytest.mark.parametrize("backend", BACKENDS + ["cpu"])
def test_no_tokens_return_empty_output_and_the_initial_state(backend):
    """T = 0 and an empty batch (B = 0)."""
    x = {n: t[:, :0] if t.dim() > 1 else t for n, t in _inputs().items()}
    check_no_tokens(ssd, x, (B, 0, H, P), (B, H, P, N), backend)
    x = {n: t[:0] if t.dim() > 1 else t for n, t in _inputs().items()}
    check_no_tokens(ssd, x, (0, T, H, P), (0, H, P, N), backend)


def test_mismatched_devices():
    check_mismatched_devices(ssd, _inputs(), "C")
