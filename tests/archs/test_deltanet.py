"""DeltaNet specifics: the fused layer against the reference layer with gradients, the variant
without short convs, and its configuration errors (the Mixer contract is in test_mixers.py)."""

import pytest
import torch

from seqmix.archs import DeltaNet
from tests.archs import contract
from tests.helpers import DEVICE, TOL


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


def test_configuration_errors():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        DeltaNet(hidden_size=30, num_heads=4)
