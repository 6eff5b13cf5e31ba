"""Fused Triton selective scan against the float64 recurrence: outputs, final states and every gradient.

Without a GPU the kernels run in Triton's interpreter (float32, small shapes);
with one, the same tests run compiled, in float32 and bfloat16, at larger shapes.
"""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

from seqmix.kernels.mamba import selective_scan, selective_scan_recurrent
from tests.helpers import DEVICE, KERNEL_DTYPES, ON_GPU, TOL, assert_rel
from tests.kernels.contract import check_against_oracle
from tests.kernels.mamba.cases import Case, cases, make_inputs

NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]


def _oracle(case, inputs):
    up = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    y, s = selective_scan_recurrent(*up[:5], **case.kwargs(up), output_final_state=True)
    return up, y, s


def _check_against_oracle(case, dtype, final_state=True):
    inputs = make_inputs(case, dtype, DEVICE, requires_grad=True)
    return check_against_oracle(partial(selective_scan, backend="triton"), selective_scan_recurrent, NAMES, inputs,
                                case.kwargs, case.seed, dtype, final_state)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@settings(max_examples=5)
@given(case=cases())
def test_scan_matches_recurrence(case, dtype):
    _check_against_oracle(case, dtype)


def test_recurrence_is_the_contract():
    """One step by hand: h1 = exp(d A) h0 + d u B, y = (h1 C + D u) silu(z), d = softplus(delta + bias)."""
    g = torch.Generator().manual_seed(0)
    u, delta, z = (torch.randn(1, 1, 3, generator=g, dtype=torch.float64) for _ in range(3))
    A = -torch.rand(3, 4, generator=g, dtype=torch.float64)
    B, C = torch.randn(1, 1, 4, generator=g, dtype=torch.float64), torch.randn(1, 1, 4, generator=g,
                                                                               dtype=torch.float64)
    D, bias = torch.randn(3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    h0 = torch.randn(1, 3, 4, generator=g, dtype=torch.float64)
    y, h1 = selective_scan_recurrent(u, delta, A, B, C, D, z, bias, True, h0, True)
    d = F.softplus(delta[0, 0] + bias)
    H1 = torch.exp(d[:, None] * A) * h0[0] + (d * u[0, 0])[:, None] * B[0, 0][None, :]
    torch.testing.assert_close(h1[0], H1)
    torch.testing.assert_close(y[0, 0], (H1 @ C[0, 0] + D * u[0, 0]) * F.silu(z[0, 0]))


@pytest.mark.slow
def test_strong_decay_over_chunks_and_packed_sequences():
    """delta' A down to about -20 per step (exp underflows in float32), across checkpoints and a boundary."""
    case = Case(batch=1, lengths=(70, 60), seqlen=130, channels=6, groups=3, n=4, initial_state=True, extras=False,
                seed=21, decay=40.0)
    y, s = _check_against_oracle(case, torch.float32)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()


def test_channel_blocks_spanning_groups():
    """Two blocks of channels, each touching several groups of B and C; no final-state gradient."""
    case = Case(batch=1, lengths=None, seqlen=20, channels=40, groups=4, n=3, initial_state=True, extras=True,
                seed=5)
    _check_against_oracle(case, torch.float32, final_state=False)


def test_float16():
    case = Case(batch=1, lengths=(30, 40), seqlen=70, channels=8, groups=None, n=16, initial_state=True,
                extras=True, seed=8)
    _check_against_oracle(case, torch.float16)


def test_packed_sequences_with_empty_ones_keep_their_states():
    case = Case(batch=1, lengths=(0, 9, 0, 5), seqlen=14, channels=4, groups=1, n=3, initial_state=True,
                extras=False, seed=5)
    _, s = _check_against_oracle(case, torch.float32)
    h0 = make_inputs(case, torch.float32, DEVICE)[8]
    torch.testing.assert_close(s[0], h0[0])
    torch.testing.assert_close(s[2], h0[2])


@settings(max_examples=6)
@given(case=cases(max_t=10))
def test_decoding_without_gradients_matches_recurrence(case):
    inputs = make_inputs(case, torch.float32, DEVICE)
    with torch.no_grad():
        y, s = selective_scan(*inputs[:5], **case.kwargs(inputs), output_final_state=True, backend="triton")
        _, y_ref, s_ref = _oracle(case, inputs)
    assert_rel(y, y_ref, TOL[torch.float32], "output")
    assert_rel(s, s_ref, TOL[torch.float32], "final state")


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU: the full-size bf16 check is too slow for the interpreter")
@pytest.mark.parametrize("shape", [(8, 2048), (2, 8192)])
def test_anchor_shapes_bf16(shape):
    """At the anchor (B, T) with D = 1024: the float64 oracle keeps every step's state for autograd,
    which at D = 4096 would need tens of GiB."""
    B, T = shape
    case = Case(batch=B, lengths=None, seqlen=T, channels=1024, groups=None, n=16, initial_state=True, extras=True,
                seed=11)
    _check_against_oracle(case, torch.bfloat16)
