"""The one-token decoding step of SSD (Mamba-2), chained, against the step-by-step oracle."""

import pytest
import torch

from seqmix.kernels.mamba2.reference import ssd_recurrent
from seqmix.kernels.mamba2.step import ssd_step
from tests.kernels.contract import steps_equal_recurrence

Bsz, T, H, P, G, N = 2, 6, 4, 3, 2, 5
OPTIONS = {"dt_softplus": True, "dt_limit": (0.0, 2.0)}


def _inputs():
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    A = -torch.rand(H, generator=gen, dtype=torch.float64) - 0.1
    return [randn(Bsz, T, H, P), randn(Bsz, T, H), A, randn(Bsz, T, G, N), randn(Bsz, T, G, N), randn(H),
            randn(Bsz, T, H, P), randn(H), randn(Bsz, H, P, N)]


def _chain(x, dt, A, B, C, D, z, dt_bias, state):
    outs = []
    for t in range(T):
        y, state = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], state, D=D, z=z[:, t], dt_bias=dt_bias,
                            **OPTIONS)
        outs.append(y)
    return torch.stack(outs, 1), state


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_steps_equal_recurrence(dtype):
    steps_equal_recurrence(
        _chain, lambda *xs: ssd_recurrent(*xs[:-1], **OPTIONS, initial_state=xs[-1], output_final_state=True),
        _inputs(), dtype)


def test_step_without_skip_and_gate():
    x, dt, A, B, C, _, _, _, state = _inputs()
    y, h = ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], state)
    y_ref, h_ref = ssd_recurrent(x[:, :1], dt[:, :1], A, B[:, :1], C[:, :1], initial_state=state,
                                 output_final_state=True)
    torch.testing.assert_close(y, y_ref[:, 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-12)


def test_step_errors_name_the_argument():
    x, dt, A, B, C, _, _, _, state = _inputs()
    with pytest.raises(ValueError, match="must divide the heads"):
        ssd_step(x[:, 0], dt[:, 0], A, B[:, 0, :, :].repeat(1, 3, 1)[:, :3], C[:, 0], state)
    with pytest.raises(ValueError, match="state must have shape"):
        ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], state[..., :2])
