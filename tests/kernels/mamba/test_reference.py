"""The chunked selective scan (the reference backend) against the step-by-step recurrence, in float64 on the CPU:
outputs, final states and the gradients of every input, the initial state included."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqmix.kernels.mamba import selective_scan, selective_scan_chunked, selective_scan_recurrent
from tests.helpers import assert_rel
from tests.kernels.mamba.cases import Case, cases, make_inputs


def _compare(case, chunk_size, tol_out=1e-12, tol_grad=1e-11):
    inputs = [None if t is None else t.double().requires_grad_() for t in make_inputs(case, torch.float64, "cpu")]
    kw = case.kwargs(inputs)
    wrt = [t for t in inputs if t is not None]
    results = []
    for fn in (selective_scan_recurrent, selective_scan_chunked):
        extra = {} if fn is selective_scan_recurrent else {"chunk_size": chunk_size}
        y, s = fn(*inputs[:5], **kw, output_final_state=True, **extra)
        g = torch.Generator().manual_seed(case.seed + 1)
        loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum()
        loss = loss + (s * torch.randn(s.shape, generator=g, dtype=s.dtype)).sum()
        results.append((y, s, torch.autograd.grad(loss, wrt)))
    (y_ref, s_ref, g_ref), (y, s, grads) = results
    assert_rel(y, y_ref, tol_out, "output")
    assert_rel(s, s_ref, tol_out, "final state")
    for i, (a, b) in enumerate(zip(grads, g_ref, strict=True)):
        assert_rel(a, b, tol_grad, f"gradient of input {i}")
    return y, s


@settings(max_examples=8, deadline=None)
@given(case=cases(max_t=60), chunk_size=st.sampled_from([1, 5, 16, 32]))
def test_chunked_scan_matches_recurrence(case, chunk_size):
    _compare(case, chunk_size)


def test_packed_sequences_across_chunk_boundaries_with_empty_ones():
    """Sequences start inside chunks, empty ones keep their initial states, and the tail chunk is padded."""
    case = Case(batch=1, lengths=(0, 9, 0, 13, 7), seqlen=29, channels=6, groups=2, n=3, initial_state=True,
                extras=True, seed=3)
    _, s = _compare(case, chunk_size=4)
    h0 = make_inputs(case, torch.float64, "cpu")[8].double()
    torch.testing.assert_close(s[0], h0[0])
    torch.testing.assert_close(s[2], h0[2])


def test_strong_decay_stays_finite_in_float32():
    """delta' A down to about -20 per step, hundreds per chunk: the float32 chunked scan has no inf or nan and
    matches the float64 recurrence (its exponents are never positive)."""
    case = Case(batch=2, lengths=None, seqlen=70, channels=4, groups=None, n=16, initial_state=True, extras=False,
                seed=21, decay=40.0)
    _compare(case, chunk_size=32)
    inputs = make_inputs(case, torch.float32, "cpu")
    y, s = selective_scan_chunked(*inputs[:5], **case.kwargs(inputs), output_final_state=True)
    up = [None if t is None else t.double() for t in inputs]
    y_ref, s_ref = selective_scan_recurrent(*up[:5], **case.kwargs(up), output_final_state=True)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    assert_rel(y, y_ref, 1e-5, "float32 output")
    assert_rel(s, s_ref, 1e-5, "float32 final state")


def test_reference_backend_is_the_chunked_form():
    case = Case(batch=2, lengths=None, seqlen=40, channels=4, groups=1, n=3, initial_state=True, extras=True, seed=9)
    inputs = make_inputs(case, torch.float32, "cpu")
    y, s = selective_scan(*inputs[:5], **case.kwargs(inputs), output_final_state=True, backend="reference")
    y_ref, s_ref = selective_scan_chunked(*inputs[:5], **case.kwargs(inputs), output_final_state=True)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
