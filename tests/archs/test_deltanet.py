"""DeltaNet specifics: the fused layer against the reference layer with gradients, the variant
without short convs, and its configuration errors (the Mixer contract is in test_mixers.py)."""

import pytest
import torch

from seqmix.archs import DeltaNet, GatedDeltaNet
from tests.archs import contract
from tests.helpers import DEVICE, TOL, assert_rel, require_cpu_kernels


def _layer(backend, seed=0, **kw):
    torch.manual_seed(seed)
    return DeltaNet(hidden_size=32, num_heads=2, backend=backend, **kw).to(DEVICE)


def _x(B, T, seed=1):
    return torch.randn(B, T, 32, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def test_triton_layer_matches_reference_layer_with_gradients():
    contract.fused_matches_reference(lambda backend: _layer(backend, seed=3), _x(2, 70), TOL[torch.float32])


@pytest.mark.slow
@pytest.mark.parametrize("kw", [{"use_short_conv": False}, {"use_output_gate": False, "expand_v": 2.0}])
def test_variants_keep_the_state_contract(kw):
    contract.pieces_equal_one_call(_layer("triton", **kw), _x(2, 50), [7, 30], TOL[torch.float32])



@pytest.mark.parametrize("cls", [DeltaNet, GatedDeltaNet])
@pytest.mark.parametrize("kw", [{}, {"use_short_conv": False, "use_output_gate": False}])
def test_decoding_step_equals_the_training_call_with_gradients(cls, kw):
    """The one-token path (_decoding_step, shared by GatedDeltaNet) of each variant: outputs of chained steps,
    and the gradients of a step's output with respect to x and the parameters, equal one call over the
    whole sequence."""
    torch.manual_seed(4)
    layer, x = cls(hidden_size=32, num_heads=2, backend="reference", **kw).to(DEVICE), _x(2, 12, seed=5)
    contract.decoding_equals_training_call(layer, x, 8, TOL[torch.float32])
    w = torch.randn(2, 1, 32, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    grads = []
    for decode in (False, True):
        xg = x.clone().requires_grad_()
        if decode:
            _, state = layer(xg[:, :11], layer.init_state(2))
            y, _ = layer(xg[:, 11:], state)
        else:
            y = layer(xg)[0][:, 11:]
        grads.append(torch.autograd.grad((y * w).sum(), [xg, *layer.parameters()]))
    for got, want in zip(*grads):
        assert_rel(got, want, TOL[torch.float32], "gradient through the decoding step")

@pytest.mark.parametrize("cls", [DeltaNet, GatedDeltaNet])
@pytest.mark.parametrize("kw", [{}, {"use_short_conv": False, "use_output_gate": False, "expand_v": 2.0}])
def test_fused_cpu_decoding_step_equals_the_tensor_op_steps(cls, kw, monkeypatch):
    """Both layers' decoding step as one C++ call (step_cpu.deltanet_step), with and without convs and gate."""
    require_cpu_kernels()
    torch.manual_seed(8)
    layer = cls(hidden_size=32, num_heads=2, **kw)
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    contract.fused_decoding_step_equals_tensor_op_steps(layer, x, 4, "deltanet_step", monkeypatch)


def test_configuration_errors():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        DeltaNet(hidden_size=30, num_heads=4)
