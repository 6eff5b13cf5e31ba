"""Bad input to selective_scan gets a ValueError naming the argument; T = 0 gives empty outputs."""

import pytest
import torch

from seqmix.kernels import cpu as cpu_build
from seqmix.kernels.mamba import selective_scan
from tests.helpers import DEVICE
from tests.kernels.contract import (
    BAD_CU_SEQLENS,
    check_bad_cu_seqlens,
    check_float64_goes_to_the_reference,
    check_no_tokens,
)

B, T, D, N, G = 2, 8, 6, 4, 2
BACKENDS = ["reference", "triton", "cpu"]


def _inputs(**over):
    g = torch.Generator().manual_seed(0)
    x = {
        "u": torch.randn(B, T, D, generator=g),
        "delta": torch.rand(B, T, D, generator=g),
        "A": -torch.rand(D, N, generator=g) - 0.1,
        "B": torch.randn(B, T, G, N, generator=g),
        "C": torch.randn(B, T, G, N, generator=g),
    }
    x.update(over)
    return {n: t.to(DEVICE) for n, t in x.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "over, match",
    [
        ({"u": torch.randn(B, T)}, r"u must have shape \[B, T, D\]"),
        ({"delta": torch.rand(B, T + 1, D)}, r"delta must have shape \[B, T, D\]"),
        ({"A": -torch.rand(D)}, r"A must have shape \[D, N\]"),
        ({"B": torch.randn(B, T, 4, N), "C": torch.randn(B, T, 4, N)},
         "groups G=4 of B and C must divide the number of channels D=6"),
        ({"B": torch.randn(B, T, N + 1)}, r"B must have shape \[B, T, N\] = \(2, 8, 4\)"),
        ({"C": torch.randn(B, T - 1, G, N)}, r"C must have shape \[B, T, G, N\]"),
        ({"C": torch.randn(B, T, G, N, dtype=torch.float64)}, "must share one dtype"),
        ({"u": torch.ones(B, T, D, dtype=torch.int64)}, "u must be a floating tensor"),
    ],
)
def test_bad_tensors(backend, over, match):
    with pytest.raises(ValueError, match=match):
        selective_scan(**_inputs(**over), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_must_be_negative(backend):
    """A check of A's values: a ValueError on CPU tensors, before any backend is chosen (on CUDA tensors a
    device-side assertion, tests/kernels/test_checks.py)."""
    inputs = {n: t.cpu() for n, t in _inputs().items()}
    inputs["A"][2, 1] = 0.25
    with pytest.raises(ValueError, match=r"A must be negative \(A = -exp\(A_log\)\), got values up to 0.25"):
        selective_scan(**inputs, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kw, match",
    [
        ({"D": torch.randn(D, 1)}, r"D must have shape \[D\]"),
        ({"z": torch.randn(B, T, D + 1)}, r"z must have shape \[B, T, D\]"),
        ({"delta_bias": torch.randn(1)}, r"delta_bias must have shape \[D\]"),
        ({"initial_state": torch.zeros(B, N, D)}, r"initial_state must have shape \[N, D, N\] = \(2, 6, 4\)"),
    ],
)
def test_bad_optional_arguments(backend, kw, match):
    with pytest.raises(ValueError, match=match):
        selective_scan(**_inputs(), **{n: t.to(DEVICE) for n, t in kw.items()}, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cu, match", BAD_CU_SEQLENS)
def test_bad_cu_seqlens(backend, cu, match):
    x = {n: t.reshape(1, B * T, *t.shape[2:]) if n != "A" else t for n, t in _inputs().items()}
    check_bad_cu_seqlens(selective_scan, x, cu, match, backend)


def test_float64_goes_to_the_reference_unless_triton_is_named(monkeypatch):
    # The C++ kernels take float64 too (tests/kernels/mamba/test_cpu.py); without them the choice is the reference.
    monkeypatch.setattr(cpu_build, "_tried", True)
    monkeypatch.setattr(cpu_build, "_reason", "switched off by this test")
    check_float64_goes_to_the_reference(selective_scan, _inputs(), "u, delta, B, C")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens_return_empty_output_and_the_initial_state(backend):
    """T = 0 and an empty batch (B = 0; the C++ kernels divided by zero there and ended the process)."""
    x = {n: t[:, :0] if n != "A" else t for n, t in _inputs().items()}
    check_no_tokens(selective_scan, x, (B, 0, D), (B, D, N), backend)
    x = {n: t[:0] if n != "A" else t for n, t in _inputs().items()}
    check_no_tokens(selective_scan, x, (0, T, D), (0, D, N), backend)
