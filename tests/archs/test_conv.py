"""LightConv, DynamicConv and ShortConv specifics: the fused layers against the reference layers with
gradients, the one-call C++ decoding steps against the tensor-op steps, DropConnect only while training, the
decoding state's layout, configuration errors (the Mixer contract is in test_mixers.py)."""

import pytest
import torch

from seqmix.archs import DynamicConv, LightConv, ShortConv
from tests.archs import contract
from tests.helpers import DEVICE, TOL, require_cpu_kernels

LAYERS = {
    "lightconv": lambda backend, **kw: LightConv(32, 4, kernel_size=5, backend=backend, **kw),
    "dynamicconv": lambda backend, **kw: DynamicConv(32, 4, kernel_size=5, backend=backend, **kw),
    "shortconv": lambda backend, **kw: ShortConv(32, conv_size=4, backend=backend, **kw),
}


def _x(B, T, seed=1):
    return torch.randn(B, T, 32, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_triton_layer_matches_reference_layer_with_gradients(name):
    def seeded(backend):
        torch.manual_seed(3)
        return LAYERS[name](backend)

    contract.fused_matches_reference(seeded, _x(2, 37), TOL[torch.float32])


# (layer, its C++ decoding step): the layers as LAYERS builds them, LightConv without the kernels' softmax, and a
# ShortConv whose conv has a bias and no SiLU (ShortConvolution's options that ShortConv itself does not set).
def _light_without_softmax():
    return LightConv(32, 4, kernel_size=5, weight_softmax=False)


def _short_with_bias_and_no_silu():
    layer = ShortConv(32, conv_size=4)
    layer.conv.bias, layer.conv.activation = torch.nn.Parameter(torch.randn(32) / 4), None
    return layer


DECODING = {
    "lightconv": (lambda: LAYERS["lightconv"](None), "dynamic_conv_layer_step"),
    "lightconv, no softmax": (_light_without_softmax, "dynamic_conv_layer_step"),
    "dynamicconv": (lambda: LAYERS["dynamicconv"](None), "dynamic_conv_layer_step"),
    "shortconv": (lambda: LAYERS["shortconv"](None), "short_conv_layer_step"),
    "shortconv, bias, no silu": (_short_with_bias_and_no_silu, "short_conv_layer_step"),
}


@pytest.mark.parametrize("name", sorted(DECODING))
def test_fused_cpu_decoding_step_equals_the_tensor_op_steps(name, monkeypatch):
    require_cpu_kernels()
    torch.manual_seed(4)
    build, op = DECODING[name]
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    contract.fused_decoding_step_equals_tensor_op_steps(build().cpu(), x, 4, op, monkeypatch)


@pytest.mark.parametrize("name", ["lightconv", "dynamicconv"])
def test_dropconnect_only_while_training(name):
    torch.manual_seed(0)
    layer = LAYERS[name]("reference", dropconnect=0.5).to(DEVICE)
    x = _x(1, 12)
    with torch.no_grad():
        layer.train()
        torch.manual_seed(1)
        a, _ = layer(x)
        torch.manual_seed(2)
        b, _ = layer(x)
        layer.eval()
        c, _ = layer(x)
        d, _ = layer(x)
    assert (a - b).abs().max() > 1e-3, "two training calls draw different masks"
    torch.testing.assert_close(c, d)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_state_is_the_last_inputs_of_the_conv(name):
    layer = LAYERS[name]("reference").to(DEVICE)
    state = layer.init_state(3)
    assert state["conv"].shape == (3, 32, (5 if name != "shortconv" else 4) - 1)
    assert state["conv"].dtype == torch.float32
    _, after = layer(_x(3, 2), state)
    assert after["conv"].shape == state["conv"].shape


def test_configuration_errors():
    with pytest.raises(ValueError, match="conv_size=30 is not divisible by num_heads=4"):
        LightConv(30, 4)
    with pytest.raises(ValueError, match="kernel_size must be >= 1"):
        DynamicConv(32, 4, kernel_size=0)
