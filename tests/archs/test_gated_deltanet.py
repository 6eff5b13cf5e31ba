"""GatedDeltaNet specifics: the fused layer against the reference layer with gradients of every
parameter (A_log and dt_bias included), the decay's parametrisation and initialisation, and its
configuration errors (the Mixer contract is in test_mixers.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from seqmix.archs import GatedDeltaNet, build_mixer
from tests.archs import contract
from tests.helpers import DEVICE, TOL, assert_rel


def _layer(backend, seed=0, **kw):
    torch.manual_seed(seed)
    return GatedDeltaNet(hidden_size=32, num_heads=2, backend=backend, **kw).to(DEVICE)


def _x(B, T, seed=1):
    return torch.randn(B, T, 32, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def test_triton_layer_matches_reference_layer_with_gradients():
    contract.fused_matches_reference(lambda backend: _layer(backend, seed=3), _x(1, 70), TOL[torch.float32],
                                     ("A_log", "dt_bias", "a_proj.weight"))


def test_decay_is_mamba2_parametrised_and_initialised():
    layer = _layer("reference", seed=4, dt_min=0.01, dt_max=0.05, a_init_range=(2.0, 3.0))
    assert ((layer.A_log.exp() >= 2.0) & (layer.A_log.exp() <= 3.0)).all()
    dt = F.softplus(layer.dt_bias)
    assert ((dt >= 0.01 - 1e-6) & (dt <= 0.05 + 1e-6)).all()
    x = _x(2, 9)
    g = layer.log_decay(x)
    expected = -layer.A_log.exp() * F.softplus(layer.a_proj(x) + layer.dt_bias)
    torch.testing.assert_close(g, expected)
    assert g.shape == (2, 9, 2) and (g <= 0).all()
    assert layer.A_log.no_weight_decay and layer.dt_bias.no_weight_decay


def test_strong_decay_forgets_the_past():
    """With decays of exp(-20) per token, a prefix changes nothing two tokens later."""
    layer = _layer("triton", seed=5)
    with torch.no_grad():
        layer.A_log.fill_(math.log(20.0))
        layer.dt_bias.fill_(30.0)  # softplus(30 + a) ~ 30 + a, so g ~ -600 per token and below
        x = _x(1, 40)
        y, _ = layer(x)
        y_tail, _ = layer(x[:, 20:])
    assert torch.isfinite(y).all()
    # Short convs of width 4 still see 3 tokens back; from the fourth token on the outputs agree.
    assert_rel(y[:, 23:], y_tail[:, 3:], 1e-5, "outputs after the forgotten prefix")


def test_configuration_errors():
    with pytest.raises(ValueError, match="dt_min <= dt_max"):
        build_mixer("gated_deltanet", hidden_size=32, num_heads=2, dt_min=0.1, dt_max=0.01)
    with pytest.raises(ValueError, match="a_init_range"):
        build_mixer("gated_deltanet", hidden_size=32, num_heads=2, a_init_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        GatedDeltaNet(hidden_size=30, num_heads=4)
