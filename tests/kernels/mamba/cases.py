"""Random selective-scan problems for Hypothesis: shapes, groups, packed splits, initial states, seeds."""

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from tests.helpers import ON_GPU
from tests.kernels.contract import PackedSequences, draw_sequences

# The interpreter steps through every token of every program: keep the channels to one block
# and the sequences short, but long enough for two chunks of 64 (the backward's checkpoints).
MAX_T = 600 if ON_GPU else 140
CHANNELS = (64, 256) if ON_GPU else (4, 6, 24)
STATE_DIMS = (16,) if ON_GPU else (3, 16)


@dataclass(frozen=True)
class Case(PackedSequences):
    batch: int
    lengths: tuple[int, ...] | None  # packed sequence lengths (then batch == 1), or None for dense
    seqlen: int
    channels: int
    groups: int | None  # None: B and C are [B, T, N]
    n: int
    initial_state: bool
    extras: bool  # D, z and delta_bias with softplus, or none of them
    seed: int
    decay: float = 1.0  # scale of |A|: 40 makes exp(delta' A) underflow in float32

    def kwargs(self, inputs):
        _, _, _, _, _, D, z, delta_bias, h0 = inputs
        return {"D": D, "z": z, "delta_bias": delta_bias, "delta_softplus": self.extras, "initial_state": h0,
                "cu_seqlens": self.cu_seqlens(inputs[0].device)}


@st.composite
def cases(draw, max_t: int = MAX_T, channels=CHANNELS, state_dims=STATE_DIMS):
    batch, lengths, seqlen = draw_sequences(draw, max_t, 3)
    return Case(
        batch=batch, lengths=lengths, seqlen=seqlen, channels=draw(st.sampled_from(channels)),
        groups=draw(st.sampled_from([None, 1, 2])), n=draw(st.sampled_from(state_dims)),
        initial_state=draw(st.booleans()), extras=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_inputs(case: Case, dtype, device, requires_grad=False):
    """u, delta, A, B, C, D, z, delta_bias, initial state (the last four None where the case has none).
    Without softplus delta is positive already; A = -[1..N] per channel times a random factor and ``decay``."""
    g = torch.Generator().manual_seed(case.seed)
    Bs, T, Dm, N = case.batch, case.seqlen, case.channels, case.n
    bc_shape = (Bs, T, N) if case.groups is None else (Bs, T, case.groups, N)
    u = torch.randn(Bs, T, Dm, generator=g)
    delta = torch.randn(Bs, T, Dm, generator=g) - 1.0 if case.extras else torch.rand(Bs, T, Dm, generator=g) * 0.3
    A = -torch.arange(1, N + 1, dtype=torch.float32)[None, :] * (torch.rand(Dm, 1, generator=g) + 0.5) * case.decay
    B = torch.randn(*bc_shape, generator=g)
    C = torch.randn(*bc_shape, generator=g)
    u, delta, B, C = (t.to(device=device, dtype=dtype) for t in (u, delta, B, C))
    A = A.to(device)
    D = z = delta_bias = h0 = None
    if case.extras:
        D = torch.randn(Dm, generator=g).to(device)
        z = torch.randn(Bs, T, Dm, generator=g).to(device=device, dtype=dtype)
        delta_bias = (torch.randn(Dm, generator=g) * 0.5).to(device)
    if case.initial_state:
        h0 = torch.randn(case.num_sequences, Dm, N, generator=g).to(device)
    tensors = (u, delta, A, B, C, D, z, delta_bias, h0)
    return [t.requires_grad_(requires_grad) if t is not None else None for t in tensors]
