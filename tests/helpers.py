"""Shared test helpers: the device under test, relative error, random inputs, torch's threads for a block."""

import contextlib
import os
import shutil

import pytest
import torch

ON_GPU = torch.cuda.is_available()
# The fused kernels run on the GPU when there is one, else in Triton's interpreter on the CPU.
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# Float32 everywhere; bf16 only on the GPU (the interpreter's bf16 arithmetic is unreliable).
KERNEL_DTYPES = (torch.float32, torch.bfloat16) if ON_GPU else (torch.float32,)
# Relative-error bounds against a float64 oracle, by the dtype of the kernel's inputs.
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64; inf when a has NaN or inf, 0 when both are empty."""
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    if a64.shape != b64.shape:
        raise AssertionError(f"shapes differ: {tuple(a64.shape)} vs {tuple(b64.shape)}")
    if not torch.isfinite(a64).all():
        return float("inf")
    if b64.numel() == 0:
        return 0.0
    return ((a64 - b64).norm() / b64.norm().clamp_min(1e-30)).item()


def assert_rel(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    err = rel_err(a, b)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def save_tiny_model(path, layers, **mixer_options):
    """A seeded, randomly initialised LM of width 32 saved with ``save_pretrained`` in ``path``; returns it in eval mode."""
    from seqmix.archs.lm import LanguageModel, LMConfig

    torch.manual_seed(0)
    model = LanguageModel(LMConfig(hidden_size=32, num_heads=2, layers=layers, mixer_options=mixer_options))
    model.save_pretrained(path)
    return model.eval()


def step_in_python(monkeypatch, mixer_class) -> None:
    """Makes ``mixer_class``'s one-call C++ step (its cpu_decoding_step's LayerCall) a Python function calling it:
    the same calls, but not a step that the C++ programs of decoding (seqmix/kernels/decoder_cpu.cpp) take in."""
    layer_step = mixer_class.cpu_decoding_step

    def python_step(self, like, state):
        call = layer_step(self, like, state)
        return None if call is None else lambda x, state: call(x, state)

    monkeypatch.setattr(mixer_class, "cpu_decoding_step", python_step)


def require_cpu_kernels() -> None:
    """Skip where seqmix's C++ CPU kernels cannot be built because this machine lacks a C++ compiler or ninja
    (the fallback to the PyTorch paths is tested apart); fail where both are present and the build still
    fails, so that a broken build never passes as a skip."""
    from seqmix.kernels import cpu

    why = cpu.unavailable()
    if why is None:
        return
    missing = [tool for tool in (os.environ.get("CXX", "c++"), "ninja") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"no {' or '.join(missing)} on this machine: {why}")
    pytest.fail(why)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's CPU threads set to n inside the block; the caller's number comes back after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
