"""Backend choice: named backends serve or say why; SEQMIX_BACKEND steers the automatic choice."""

import pytest
import torch

from seqmix.kernels import BackendUnavailable
from seqmix.kernels.backend import select_backend, triton_interpreting
from tests.helpers import ON_GPU

CPU = torch.device("cpu")


def test_automatic_choice_follows_the_device(monkeypatch):
    monkeypatch.delenv("SEQMIX_BACKEND", raising=False)
    impl = ("triton", "reference")
    if ON_GPU:
        assert select_backend("op", None, torch.device("cuda"), impl) == "triton"
    expected_cpu = "triton" if triton_interpreting() else "reference"
    assert select_backend("op", None, CPU, impl) == expected_cpu
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert select_backend("op", None, CPU, impl) == "reference"


def test_named_backend_that_cannot_serve_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="Triton kernels need CUDA tensors"):
        select_backend("op", "triton", CPU, ("triton", "reference"))
    with pytest.raises(BackendUnavailable, match="op has no 'cuda' backend"):
        select_backend("op", "cuda", CPU, ("triton", "reference"))
    with pytest.raises(BackendUnavailable, match="CUDA extension needs CUDA tensors"):
        select_backend("op", "cuda", CPU, ("cuda", "reference"))
    with pytest.raises(ValueError, match="backend must be one of"):
        select_backend("op", "tpu", CPU, ("reference",))


def test_environment_override(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SEQMIX_BACKEND", "reference")
    assert select_backend("op", None, CPU, ("triton", "reference")) == "reference"
    # An op without the named backend keeps its automatic choice ...
    monkeypatch.setenv("SEQMIX_BACKEND", "cuda")
    assert select_backend("op", None, CPU, ("triton", "reference")) == "triton"
    # ... one that has it must serve the call with it.
    with pytest.raises(BackendUnavailable, match="'cuda' cannot serve"):
        select_backend("op", None, CPU, ("cuda", "reference"))
    # The argument wins over the environment.
    assert select_backend("op", "triton", CPU, ("cuda", "triton", "reference")) == "triton"
    monkeypatch.setenv("SEQMIX_BACKEND", "fast")
    with pytest.raises(ValueError, match="SEQMIX_BACKEND must be one of"):
        select_backend("op", None, CPU, ("reference",))


def test_call_limits_skip_a_backend_automatically_and_refuse_it_by_name(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("SEQMIX_BACKEND", raising=False)
    limits = {"triton": "x must be float16, bfloat16 or float32, got torch.float64"}
    assert select_backend("op", None, CPU, ("triton", "reference"), limits) == "reference"
    with pytest.raises(BackendUnavailable, match="'triton' cannot serve this call: x must be"):
        select_backend("op", "triton", CPU, ("triton", "reference"), limits)
    assert select_backend("op", None, CPU, ("triton", "reference"), {"triton": None}) == "triton"
