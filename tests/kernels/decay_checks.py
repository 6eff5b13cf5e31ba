"""Gradient checks shared by the ops with log decays (gated delta rule, GLA)."""

import torch

from tests.helpers import assert_rel


def outputs_and_grads(fn, inputs, seed):
    """``fn(*inputs)`` -> (o, final state), and the gradients of the inputs that are not None
    for a loss with random weights (drawn from ``seed``) on both outputs, taken in float64."""
    o, s = fn(*inputs)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen).to(o.device)
    dht = torch.randn(s.shape, generator=gen).to(s.device)
    loss = (o.double() * do.double()).sum() + (s.double() * dht.double()).sum()
    return o, s, torch.autograd.grad(loss, [t for t in inputs if t is not None])


def assert_grads(names, grads, ref_grads, tol, dg_scale=False):
    """Relative error of every gradient. g's gradient is measured against at least 1e-3 of the
    size of the q, k, v gradients: it vanishes exactly where g cannot act (one token per sequence
    and no initial state), and round-off cannot. With ``dg_scale`` it is measured against their
    full size: dg is the difference of O(1) terms (rowsums of q*dq and k*dk), and where decays of
    exp(-20) per token leave the output all but independent of g, dg is ~1e-9 and the float32
    round-off of those terms dominates any measure relative to dg itself."""
    natural = max(ref_grads[names.index(n)].norm().item() for n in ("q", "k", "v"))
    for name, a, b in zip(names, grads, ref_grads, strict=True):
        assert torch.isfinite(a).all(), f"d{name} is not finite"
        if name != "g":
            assert_rel(a, b, tol, f"d{name}")
            continue
        floor = natural if dg_scale else 1e-3 * natural
        err = (a.double().cpu() - b.double().cpu()).norm().item() / max(b.norm().item(), floor)
        assert err <= tol, f"dg: relative error {err:.3e} > {tol:.1e}"
