"""A layer on its fused backend against the same layer (same seed) on the reference backend."""

import torch

from tests.helpers import DEVICE, TOL, assert_rel


def fused_layer_matches_reference(build, x):
    """``build(backend)`` makes the layer; compares outputs and the gradients of x and every parameter."""
    outs, grads, names = {}, {}, None
    for backend in ("triton", "reference"):
        layer = build(backend).to(DEVICE)
        xb = x.clone().to(DEVICE).requires_grad_()
        y, _ = layer(xb)
        y.square().sum().backward()
        outs[backend] = y
        grads[backend] = [xb.grad] + [p.grad for p in layer.parameters()]
        names = ["x"] + [n for n, _ in layer.named_parameters()]
    tol = TOL[torch.float32]
    assert_rel(outs["triton"], outs["reference"], tol, "output")
    for name, a, b in zip(names, grads["triton"], grads["reference"], strict=True):
        assert_rel(a, b, tol, f"grad of {name}")
