"""The one-token decoding steps of the (gated) delta rule, chained, against the step-by-step oracles."""

import pytest
import torch
import torch.nn.functional as F

from seqmix.kernels.deltanet import delta_rule_recurrent, gated_delta_rule_recurrent
from seqmix.kernels.deltanet.step import delta_rule_step, gated_delta_rule_step
from tests.kernels.contract import steps_equal_recurrence

B, T, H, K, V = 2, 7, 3, 8, 5


def _inputs(gated):
    gen = torch.Generator().manual_seed(0)
    q, k = (F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=torch.float64), dim=-1) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    g = -torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    state = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    return [q, k, v, g, beta, state] if gated else [q, k, v, beta, state]


def _chain(step, *per_token, state, scale):
    outs = []
    for t in range(T):
        o, state = step(*(x[:, t] for x in per_token), state, scale)
        outs.append(o)
    return torch.stack(outs, 1), state


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("gated", [False, True])
def test_steps_equal_recurrence(gated, dtype):
    scale = 0.7
    step, oracle = (gated_delta_rule_step, gated_delta_rule_recurrent) if gated else (delta_rule_step,
                                                                                    delta_rule_recurrent)
    steps_equal_recurrence(
        lambda *xs: _chain(step, *xs[:-1], state=xs[-1], scale=scale),
        lambda *xs: oracle(*xs[:-1], scale, initial_state=xs[-1], output_final_state=True),
        _inputs(gated), dtype)


def test_step_errors_name_the_argument():
    *per_token, state = _inputs(False)
    q, k, v, beta = (x[:, 0] for x in per_token)
    delta_rule_step(q, k, v, beta, state)
    with pytest.raises(ValueError, match="state must have shape"):
        delta_rule_step(q, k, v, beta, state[:, :, :2])
    with pytest.raises(ValueError, match="beta must have shape"):
        delta_rule_step(q, k, v, beta[:1], state)
    with pytest.raises(ValueError, match="g must have shape"):
        gated_delta_rule_step(q, k, v, beta[..., None], beta, state)
