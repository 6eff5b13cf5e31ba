"""The comparison both state-space ops' fused kernels go through: outputs, final states and the
gradient of every input against a float64 oracle, with random upstream gradients for both."""

import torch

from tests.helpers import DEVICE, TOL, assert_rel


def check_against_oracle(op, oracle, names, inputs, kwargs_of, seed, dtype, final_state=True):
    """Run ``op(*inputs[:5], **kwargs_of(inputs), output_final_state=final_state)`` and ``oracle``
    (same call on float64 copies, always with the final state) and compare; with
    ``final_state=False`` no gradient flows in through the state. ``names`` name the inputs
    (None entries are absent). Returns the op's (output, final state)."""
    y, s = op(*inputs[:5], **kwargs_of(inputs), output_final_state=final_state)
    up = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    y_ref, s_ref = oracle(*up[:5], **kwargs_of(up), output_final_state=True)
    tol = TOL[dtype]
    assert y.dtype == dtype
    assert_rel(y, y_ref, tol, "output")
    if final_state:
        assert s.dtype == torch.float32
        assert_rel(s, s_ref, tol, "final state")
    else:
        assert s is None
    g = torch.Generator().manual_seed(seed + 1)
    dy = torch.randn(y.shape, generator=g).to(DEVICE)
    ds = torch.randn(s_ref.shape, generator=g).to(DEVICE) if final_state else torch.zeros(s_ref.shape, device=DEVICE)
    named = [(n, t) for n, t in zip(names, inputs, strict=True) if t is not None and t.requires_grad]
    loss = (y.float() * dy).sum() + ((s * ds).sum() if final_state else 0)
    grads = torch.autograd.grad(loss, [t for _, t in named])
    ref_up = [u for t, u in zip(inputs, up, strict=True) if t is not None and t.requires_grad]
    ref_grads = torch.autograd.grad((y_ref * dy.double()).sum() + (s_ref * ds.double()).sum(), ref_up)
    for (name, t), a, b in zip(named, grads, ref_grads, strict=True):
        assert a.dtype == t.dtype
        assert_rel(a, b, tol, f"d{name}")
    return y, s
