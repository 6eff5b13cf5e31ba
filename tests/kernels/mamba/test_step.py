"""The one-token decoding step of the selective scan (Mamba-1), chained, against the step-by-step oracle."""

import pytest
import torch

from seqmix.kernels.mamba.reference import selective_scan_recurrent
from seqmix.kernels.mamba.step import selective_scan_step
from tests.kernels.contract import steps_equal_recurrence

Bsz, T, Dm, N = 2, 6, 6, 4


def _inputs(groups):
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    bc = (Bsz, T, N) if groups is None else (Bsz, T, groups, N)
    A = -torch.rand(Dm, N, generator=gen, dtype=torch.float64) - 0.1
    return [randn(Bsz, T, Dm), randn(Bsz, T, Dm), A, randn(*bc), randn(*bc), randn(Dm), randn(Bsz, T, Dm),
            randn(Dm), randn(Bsz, Dm, N)]


def _chain(u, delta, A, B, C, D, z, delta_bias, state):
    outs = []
    for t in range(T):
        y, state = selective_scan_step(u[:, t], delta[:, t], A, B[:, t], C[:, t], state, D=D, z=z[:, t],
                                       delta_bias=delta_bias, delta_softplus=True)
        outs.append(y)
    return torch.stack(outs, 1), state


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("groups", [None, 2])
def test_steps_equal_recurrence(groups, dtype):
    steps_equal_recurrence(
        _chain, lambda *xs: selective_scan_recurrent(*xs[:-1], delta_softplus=True, initial_state=xs[-1],
                                                     output_final_state=True),
        _inputs(groups), dtype)


def test_step_errors_name_the_argument():
    u, delta, A, B, C, *_, state = _inputs(None)
    with pytest.raises(ValueError, match="state must have shape"):
        selective_scan_step(u[:, 0], delta[:, 0], A, B[:, 0], C[:, 0], state[:1])
    with pytest.raises(ValueError, match="A must have shape"):
        selective_scan_step(u[:, 0], delta[:, 0], A[:2], B[:, 0], C[:, 0], state)
