"""The chunked reference's hand-written backward (docs/math/deltanet.md, "The chunked reference on the
CPU") against autograd through the float64 step-by-step recurrence: every gradient (q, k, v, beta, g and
the initial state), ragged lengths, packed sequences with an empty one, every chunk size the layers may
use, and strong decays in float32."""

import pytest
import torch

from seqmix.kernels.deltanet import (
    delta_rule_chunked,
    delta_rule_recurrent,
    gated_delta_rule_chunked,
    gated_delta_rule_recurrent,
)
from tests.helpers import TOL
from tests.kernels.contract import assert_grads, check_chunked_gradients_match_recurrence, outputs_and_grads
from tests.kernels.deltanet.cases import Case, make_gated_inputs

NAMES = ["q", "k", "v", "g", "beta", "initial_state"]
CASES = [  # (case, chunk size): ragged T, packed with an empty sequence, T a chunk multiple without h0
    (Case(batch=2, lengths=None, seqlen=70, heads=2, k=8, v=5, initial_state=True, seed=1), 32),
    (Case(batch=1, lengths=(23, 0, 41), seqlen=64, heads=2, k=4, v=8, initial_state=True, seed=2), 16),
    (Case(batch=2, lengths=None, seqlen=64, heads=1, k=8, v=8, initial_state=False, seed=3), 64),
    (Case(batch=1, lengths=None, seqlen=9, heads=1, k=3, v=2, initial_state=True, seed=4), 128),
]


def _call(gated, chunk_size):
    def call(fn, q, k, v, g, beta, h0, cu):
        if gated:
            kw = {} if fn is gated_delta_rule_recurrent else {"chunk_size": chunk_size}
            return fn(q, k, v, g, beta, 0.5, h0, True, cu, **kw)
        kw = {} if fn is delta_rule_recurrent else {"chunk_size": chunk_size}
        return fn(q, k, v, beta, 0.5, h0, True, cu, **kw)

    return call


@pytest.mark.parametrize("case, chunk_size", CASES)
@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
def test_backward_matches_recurrence(case, chunk_size, gated):
    q, k, v, g, beta, h0 = make_gated_inputs(case, torch.float64, "cpu")
    cu = case.cu_seqlens("cpu")
    fns = (gated_delta_rule_recurrent, gated_delta_rule_chunked) if gated else (delta_rule_recurrent, delta_rule_chunked)
    call = _call(gated, chunk_size)
    inputs = (q, k, v, g if gated else None, beta, h0)
    check_chunked_gradients_match_recurrence(*fns, inputs, lambda fn, *x: call(fn, *x, cu), NAMES, case.seed, 1e-11)


def test_strong_decays_in_float32():
    """Decays of e^-20 next to decays near 1, float32 against the float64 recurrence: every exponent of the
    backward is <= 0 as in the forward, so nothing overflows and the gradients keep float32's accuracy."""
    case = Case(batch=1, lengths=(70, 50), seqlen=120, heads=2, k=8, v=8, initial_state=True, seed=5)
    gen = torch.Generator().manual_seed(6)
    shape = (1, case.seqlen, case.heads)
    g = torch.where(torch.rand(shape, generator=gen) < 0.3, -20.0, -1e-3 * torch.rand(shape, generator=gen))
    inputs = [t.requires_grad_() for t in make_gated_inputs(case, torch.float32, "cpu", g=g)]
    cu = case.cu_seqlens("cpu")
    _, _, grads = outputs_and_grads(lambda *x: gated_delta_rule_chunked(*x[:5], 0.5, x[5], True, cu, chunk_size=32),
                                    inputs, case.seed)
    up = [t.detach().double().requires_grad_() for t in inputs]
    _, _, ref = outputs_and_grads(lambda *x: gated_delta_rule_recurrent(*x[:5], 0.5, x[5], True, cu), up, case.seed)
    assert_grads(NAMES, grads, ref, TOL[torch.float32], dg_scale=True)
