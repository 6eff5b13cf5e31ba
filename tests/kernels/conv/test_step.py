"""The one-token decoding step of LightConv / DynamicConv, chained, against the unfold reference run on
the state's inputs followed by the new ones."""

import pytest
import torch

from seqmix.kernels.conv.dynamic_reference import dynamic_conv_reference
from seqmix.kernels.conv.step import dynamic_conv_step
from tests.kernels.contract import steps_equal_recurrence

B, T, C, H, K = 2, 6, 8, 2, 4


def _chain(x, weight, state):
    outs = []
    for t in range(T):
        y, state = dynamic_conv_step(x[:, t], weight if weight.dim() == 2 else weight[:, t], state)
        outs.append(y)
    return torch.stack(outs, 1), state


def _oracle(x, weight, state):
    """The causal conv over [state's K-1 inputs, x]; the prefix rows' outputs (and kernels) are dropped."""
    x_ext = torch.cat([state.transpose(1, 2), x], 1)
    if weight.dim() == 4:
        weight = torch.cat([weight[:, :1].expand(B, K - 1, H, K), weight], 1)
    y = dynamic_conv_reference(x_ext, weight, padding="causal", weight_softmax=True)[:, K - 1:]
    return y, x_ext[:, -(K - 1):].transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dynamic", [False, True])
def test_steps_equal_recurrence(dynamic, dtype):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(*((B, T, H, K) if dynamic else (H, K)), generator=gen, dtype=torch.float64)
    inputs = [torch.randn(B, T, C, generator=gen, dtype=torch.float64), weight,
              torch.randn(B, C, K - 1, generator=gen, dtype=torch.float64)]
    steps_equal_recurrence(_chain, _oracle, inputs, dtype)


def test_step_errors_name_the_argument():
    x, state = torch.randn(B, C), torch.randn(B, C, K - 1)
    with pytest.raises(ValueError, match="weight must have shape"):
        dynamic_conv_step(x, torch.randn(3, K), state)
    with pytest.raises(ValueError, match="state must have shape"):
        dynamic_conv_step(x, torch.randn(H, K), state[..., :1])
