"""Bad input to delta_rule gets a ValueError naming the argument; T = 0 gives empty outputs."""

import pytest
import torch

from seqmix.kernels import BackendUnavailable
from seqmix.kernels.deltanet import delta_rule
from tests.helpers import DEVICE
from tests.kernels.contract import (
    BAD_CU_SEQLENS,
    check_bad_cu_seqlens,
    check_float64_goes_to_the_reference,
    check_mismatched_devices,
    check_no_tokens,
)

B, T, H, K, V = 2, 8, 2, 4, 6
BACKENDS = ["reference", "triton"]


def _inputs(**over):
    g = torch.Generator().manual_seed(0)
    x = {
        "q": torch.randn(B, T, H, K, generator=g),
        "k": torch.randn(B, T, H, K, generator=g),
        "v": torch.randn(B, T, H, V, generator=g),
        "beta": torch.rand(B, T, H, generator=g),
    }
    x = {n: t.to(DEVICE) for n, t in x.items()}
    x.update(over)
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "over, match",
    [
        ({"q": torch.randn(B, T, H)}, r"q must have shape \[B, T, H, K\]"),
        ({"k": torch.randn(B, T, H, K + 1)}, r"k must have shape \[B, T, H, K\]"),
        ({"v": torch.randn(B, T + 1, H, V)}, r"v must have shape \[B, T, H, V\]"),
        ({"beta": torch.rand(B, T, H, 1)}, r"beta must have shape \[B, T, H\]"),
        ({"v": torch.randn(B, T, H, V, dtype=torch.float64)}, "must share one dtype"),
        ({"q": torch.ones(B, T, H, K, dtype=torch.int64)}, "q must be a floating tensor"),
        ({"k": torch.randn(B, T, H, 0)}, r"k must have shape"),
    ],
)
def test_bad_tensors(backend, over, match):
    x = _inputs(**{n: t.to(DEVICE) for n, t in over.items()})
    with pytest.raises(ValueError, match=match):
        delta_rule(**x, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_initial_state(backend):
    with pytest.raises(ValueError, match=r"initial_state must have shape \[N, H, K, V\] = \(2, 2, 4, 6\)"):
        delta_rule(**_inputs(), initial_state=torch.zeros(B, H, V, K, device=DEVICE), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cu, match", BAD_CU_SEQLENS)
def test_bad_cu_seqlens(backend, cu, match):
    x = {n: t.reshape(1, B * T, *t.shape[2:]) for n, t in _inputs().items()}
    check_bad_cu_seqlens(delta_rule, x, cu, match, backend)


def test_cu_seqlens_needs_packed_batch_and_integers():
    with pytest.raises(ValueError, match="packed as \\[1, total, ...\\], got batch size 2"):
        delta_rule(**_inputs(), cu_seqlens=torch.tensor([0, T], device=DEVICE))
    x = {n: t.reshape(1, B * T, *t.shape[2:]) for n, t in _inputs().items()}
    with pytest.raises(ValueError, match="cu_seqlens must be int32 or int64"):
        delta_rule(**x, cu_seqlens=torch.tensor([0.0, 16.0], device=DEVICE))
    with pytest.raises(ValueError, match=r"initial_state must have shape \[N, H, K, V\] = \(3, 2, 4, 6\)"):
        delta_rule(**x, cu_seqlens=torch.tensor([0, 5, 9, 16], device=DEVICE),
                   initial_state=torch.zeros(2, H, K, V, device=DEVICE))


def test_bad_scale_and_backend_name():
    with pytest.raises(ValueError, match="scale must be a finite number"):
        delta_rule(**_inputs(), scale=float("nan"))
    with pytest.raises(ValueError, match="backend must be one of"):
        delta_rule(**_inputs(), backend="cudnn")


def test_float64_goes_to_the_reference_unless_triton_is_named():
    check_float64_goes_to_the_reference(delta_rule, _inputs(), "q, k, v, beta")


@pytest.mark.parametrize("backend", BACKENDS + ["cpu"])
def test_no_tokens_return_empty_output_and_the_initial_state(backend):
    """T = 0 and an empty batch (B = 0)."""
    check_no_tokens(delta_rule, {n: t[:, :0] for n, t in _inputs().items()}, (B, 0, H, V), (B, H, K, V), backend)
    check_no_tokens(delta_rule, {n: t[:0] for n, t in _inputs().items()}, (0, T, H, V), (0, H, K, V), backend)


def test_mismatched_devices():
    check_mismatched_devices(delta_rule, _inputs(), "k")


def test_head_dims_above_256_go_to_the_reference_unless_triton_is_named():
    x = {n: t[:, :, :1] for n, t in _inputs().items()}
    x["q"] = torch.randn(B, T, 1, 300, device=DEVICE)
    x["k"] = torch.randn(B, T, 1, 300, device=DEVICE)
    with pytest.raises(BackendUnavailable, match="head dims up to 256, got K=300"):
        delta_rule(**x, backend="triton")
    o, _ = delta_rule(**x)
    assert o.shape == (B, T, 1, V) and torch.isfinite(o).all()
