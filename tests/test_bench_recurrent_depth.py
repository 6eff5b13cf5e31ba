"""bench_recurrent_depth's plain PyTorch path computes the layer it is compared with (outputs and gradients)."""

import torch

from benchmarks.bench_recurrent_depth import fused_forward, plain_forward
from seqmix.archs import build_mixer
from tests.helpers import DEVICE, TOL, assert_rel


def test_plain_path_is_the_layer():
    torch.manual_seed(0)
    layer = build_mixer("recurrent_depth", hidden_size=32, num_heads=2, core=["attention"], mean_steps=3).to(DEVICE)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # away from 1, so a squared-sum loss of the normed output is not constant
    g = torch.Generator().manual_seed(1)
    e, s0 = torch.randn(2, 9, 32, generator=g).to(DEVICE), torch.randn(2, 9, 32, generator=g).to(DEVICE) * 0.1
    results = []
    for forward in (fused_forward, plain_forward):
        layer.zero_grad(set_to_none=True)
        leaf = e.clone().requires_grad_()
        out = forward(layer, leaf, s0, 3, 2)
        out.square().sum().backward()
        results.append([out, leaf.grad, *[p.grad for p in layer.parameters()]])
    for a, b in zip(*results, strict=True):
        assert_rel(a, b, TOL[torch.float32], "fused vs plain")
