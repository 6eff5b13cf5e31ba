"""Mamba2 specifics: the fused layer against the reference layer with gradients, the usual
initialisation, and configuration errors (the Mixer contract is in test_mixers.py)."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from seqmix.archs import Mamba2
from tests.archs import contract
from tests.helpers import DEVICE, TOL, assert_rel, require_cpu_kernels


def _layer(backend, seed=0, **kw):
    torch.manual_seed(seed)
    config = {"hidden_size": 32, "head_dim": 16, "d_state": 8, "n_groups": 2, **kw}
    return Mamba2(**config, backend=backend).to(DEVICE)


def test_triton_layer_matches_reference_layer_with_gradients():
    x = torch.randn(2, 70, 32, generator=torch.Generator().manual_seed(1))
    contract.fused_matches_reference(lambda backend: _layer(backend, seed=3), x, TOL[torch.float32])


def test_cpu_layer_matches_reference_layer_with_gradients(monkeypatch):
    """The training call on the cpu backend (in_proj's output whole into the kernels, the conv and the gated norm
    inside: ssd_zxbcdt) against the reference backend's in float64: the output and the gradients of x and every
    parameter."""
    require_cpu_kernels()
    from seqmix.kernels.mamba2 import cpu as cpu_kernels

    custom, calls = cpu_kernels.XBC_FUSED.chunk_fwd, []
    monkeypatch.setattr(cpu_kernels, "XBC_FUSED", dataclasses.replace(
        cpu_kernels.XBC_FUSED, chunk_fwd=lambda *args: calls.append(args) or custom(*args)))
    x = torch.randn(2, 70, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    outs, grads = {}, {}
    for backend in ("cpu", "reference"):
        layer = _layer(backend, seed=6, n_groups=1).cpu().double()
        with torch.no_grad():  # off the initial values (D = 1, a zero conv bias)
            for p in layer.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype) * 0.1)
        xb = x.clone().requires_grad_()
        y, _ = layer(xb)
        (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(8), dtype=y.dtype)).sum().backward()
        outs[backend], grads[backend] = y, [("x", xb.grad)] + [(n, p.grad) for n, p in layer.named_parameters()]
    assert len(calls) == 1 and calls[0][0].shape == (140, 2 * 64 + 2 * 8 + 4)  # z, x, B, C and dt, one tensor
    assert_rel(outs["cpu"], outs["reference"], 1e-10, "output")
    for (name, a), (_, b) in zip(grads["cpu"], grads["reference"], strict=True):
        assert_rel(a, b, 1e-10, f"grad of {name}")


def test_fused_cpu_decoding_step_equals_the_tensor_op_steps(monkeypatch):
    require_cpu_kernels()
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    contract.fused_decoding_step_equals_tensor_op_steps(_layer(None, seed=5).cpu(), x, 4, "mamba2_step", monkeypatch)


def test_initialisation():
    layer = Mamba2(hidden_size=256, head_dim=4, d_state=16)  # 128 heads: enough draws to see the ranges
    assert layer.num_heads == 128
    A = torch.exp(layer.A_log)
    assert (A >= 1).all() and (A <= 16).all() and A.std() > 2
    dt = F.softplus(layer.dt_bias)
    assert (dt >= 1e-3 * (1 - 1e-5)).all() and (dt <= 1e-1 * (1 + 1e-5)).all()
    assert dt.log().std() > 0.5  # log-uniform over two decades, not a constant
    torch.testing.assert_close(layer.D.detach(), torch.ones(128))
    assert layer.in_proj.out_features == 2 * 512 + 2 * 16 + 128
    assert layer.conv.dim == 512 + 2 * 16


def test_state_shapes():
    layer = _layer("reference")
    state = layer.init_state(3)
    assert state["conv"].shape == (3, 64 + 2 * 2 * 8, 3)
    assert state["ssm"].shape == (3, 4, 16, 8)


def test_configuration_errors():
    with pytest.raises(ValueError, match="not divisible by head_dim"):
        Mamba2(hidden_size=30, head_dim=16)
    with pytest.raises(ValueError, match="n_groups=3 does not divide the number of heads 4"):
        Mamba2(hidden_size=32, head_dim=16, n_groups=3)
    with pytest.raises(ValueError, match="A_init_range"):
        Mamba2(hidden_size=32, head_dim=16, A_init_range=(0.0, 4.0))
    assert math.isinf(Mamba2(hidden_size=32, head_dim=16).dt_limit[1])
