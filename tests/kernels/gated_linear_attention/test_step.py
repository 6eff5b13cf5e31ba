"""The one-token decoding step of GLA, chained, against the step-by-step oracle."""

import pytest
import torch

from seqmix.kernels.gated_linear_attention.reference import gla_recurrent
from seqmix.kernels.gated_linear_attention.step import gla_step
from tests.kernels.contract import steps_equal_recurrence

B, T, H, K, V = 2, 7, 3, 8, 5


def _inputs():
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(B, T, H, K, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    g = -torch.rand(B, T, H, K, generator=gen, dtype=torch.float64)
    return [q, k, v, g, torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)]


def _chain(q, k, v, g, state):
    outs = []
    for t in range(T):
        o, state = gla_step(q[:, t], k[:, t], v[:, t], g[:, t], state, scale=0.7)
        outs.append(o)
    return torch.stack(outs, 1), state


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_steps_equal_recurrence(dtype):
    steps_equal_recurrence(
        _chain, lambda q, k, v, g, s: gla_recurrent(q, k, v, g, 0.7, initial_state=s, output_final_state=True),
        _inputs(), dtype)


def test_step_errors_name_the_argument():
    q, k, v, g, state = _inputs()
    with pytest.raises(ValueError, match="g must have shape"):
        gla_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0, :, :2], state)
    with pytest.raises(ValueError, match="k must have shape"):
        gla_step(q[:, 0], k[:, 0, :2], v[:, 0], g[:, 0], state)
