"""GatedLinearAttention specifics: the fused layer against the reference layer with gradients of
every parameter, the gate's parametrisation, the variant without output gate, the one-call C++
decoding step, and configuration errors (the Mixer contract is in test_mixers.py)."""

import pytest
import torch
import torch.nn.functional as F

from seqmix.archs import GatedLinearAttention, build_mixer
from tests.archs import contract
from tests.helpers import DEVICE, TOL, require_cpu_kernels


def _layer(backend, seed=0, **kw):
    torch.manual_seed(seed)
    return GatedLinearAttention(hidden_size=32, num_heads=2, backend=backend, **kw).to(DEVICE)


def _x(B, T, seed=1):
    return torch.randn(B, T, 32, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def test_triton_layer_matches_reference_layer_with_gradients():
    contract.fused_matches_reference(lambda backend: _layer(backend, seed=3), _x(1, 70), TOL[torch.float32],
                                     ("gk_proj.0.weight", "gk_proj.1.bias", "g_proj.weight", "o_norm.weight"))


def test_gate_is_a_normalised_low_rank_logsigmoid():
    layer = _layer("reference", seed=4, gate_low_rank_dim=4, gate_normalizer=8.0)
    x = _x(2, 9)
    g = layer.log_decay(x)
    expected = F.logsigmoid(layer.gk_proj[1](layer.gk_proj[0](x))) / 8.0
    torch.testing.assert_close(g, expected.view(2, 9, 2, 8))
    assert layer.gk_proj[0].weight.shape == (4, 32) and (g <= 0).all()


@pytest.mark.slow
def test_variant_without_output_gate_keeps_the_state_contract():
    layer = _layer("triton", use_output_gate=False, expand_k=1.0)
    contract.pieces_equal_one_call(layer, _x(2, 50), [7, 30], TOL[torch.float32])


@pytest.mark.parametrize("output_gate", [True, False])
def test_fused_cpu_decoding_step_equals_the_tensor_op_steps(output_gate, monkeypatch):
    """Heads with K = 16 and V = 24 (expand_v 1.5: the norm's rows are not the keys' width), the low-rank gate
    of rank 4 and a normaliser of 8."""
    require_cpu_kernels()
    layer = _layer(None, seed=5, expand_v=1.5, gate_low_rank_dim=4, gate_normalizer=8.0,
                   use_output_gate=output_gate).cpu()
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    contract.fused_decoding_step_equals_tensor_op_steps(layer, x, 4, "gla_layer_step", monkeypatch)


def test_configuration_errors():
    with pytest.raises(ValueError, match="must be a positive multiple of num_heads=3"):
        build_mixer("gla", hidden_size=32, num_heads=3)
    with pytest.raises(ValueError, match="gate_normalizer must be positive"):
        build_mixer("gla", hidden_size=32, num_heads=2, gate_normalizer=0)
