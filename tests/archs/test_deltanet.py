"""DeltaNet specifics: the fused layer against the reference layer with gradients, the variant
without short convs, and its configuration errors (the Mixer contract is in test_mixers.py)."""

import pytest
import torch

from seqmix.archs import DeltaNet
from tests.archs import contract
from tests.helpers import DEVICE, TOL, assert_rel


def _layer(backend, seed=0, **kw):
    torch.manual_seed(seed)
    return DeltaNet(hidden_size=32, num_heads=2, backend=backend, **kw).to(DEVICE)


def _x(B, T, seed=1):
    return torch.randn(B, T, 32, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def test_triton_layer_matches_reference_layer_with_gradients():
    layers = {b: _layer(b, seed=3) for b in ("triton", "reference")}
    x = _x(2, 70)
    outs, grads = {}, {}
    for b, layer in layers.items():
        xb = x.clone().requires_grad_()
        y, _ = layer(xb)
        y.square().sum().backward()
        outs[b] = y
        grads[b] = [xb.grad] + [p.grad for p in layer.parameters()]
    tol = TOL[torch.float32]
    assert_rel(outs["triton"], outs["reference"], tol, "output")
    names = ["x"] + [n for n, _ in layers["triton"].named_parameters()]
    for name, a, b in zip(names, grads["triton"], grads["reference"], strict=True):
        assert_rel(a, b, tol, f"grad of {name}")


@pytest.mark.parametrize("kw", [{"use_short_conv": False}, {"use_output_gate": False, "expand_v": 2.0}])
def test_variants_keep_the_state_contract(kw):
    contract.pieces_equal_one_call(_layer("triton", **kw), _x(2, 50), [7, 30], TOL[torch.float32])


def test_configuration_errors():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        DeltaNet(hidden_size=30, num_heads=4)
