"""Random SSD problems for Hypothesis: shapes, groups, packed splits, dt processing, initial states, seeds."""

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from tests.helpers import ON_GPU
from tests.kernels.contract import PackedSequences, draw_sequences

# The interpreter runs every program on the CPU: keep its problems small.
MAX_T = 600 if ON_GPU else 150
HEAD_DIMS = (64,) if ON_GPU else (3, 8, 16)
STATE_DIMS = (64, 128) if ON_GPU else (5, 16)


@dataclass(frozen=True)
class Case(PackedSequences):
    batch: int
    lengths: tuple[int, ...] | None  # packed sequence lengths (then batch == 1), or None for dense
    seqlen: int
    heads: int
    groups: int
    p: int
    n: int
    initial_state: bool
    extras: bool  # D, z and dt_bias with softplus, or none of them
    seed: int
    log_decay: float = 1.0  # scale of dt' |A| per step: 20 makes exp(dt' A) underflow in float32

    def kwargs(self, inputs):
        """The op's keyword arguments for ``make_inputs``'s tensors."""
        _, _, _, _, _, D, z, dt_bias, h0 = inputs
        return {"D": D, "z": z, "dt_bias": dt_bias, "dt_softplus": self.extras, "initial_state": h0,
                "cu_seqlens": self.cu_seqlens(inputs[0].device)}


@st.composite
def cases(draw, max_t: int = MAX_T, head_dims=HEAD_DIMS, state_dims=STATE_DIMS):
    batch, lengths, seqlen = draw_sequences(draw, max_t, 4)
    groups = draw(st.sampled_from([1, 2]))
    return Case(
        batch=batch, lengths=lengths, seqlen=seqlen, heads=groups * draw(st.integers(1, 2)), groups=groups,
        p=draw(st.sampled_from(head_dims)), n=draw(st.sampled_from(state_dims)),
        initial_state=draw(st.booleans()), extras=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_inputs(case: Case, dtype, device, requires_grad=False):
    """x, dt, A, B, C, D, z, dt_bias, initial state (the last four None where the case has none).
    Without softplus, dt is positive already (dt' = dt); A in [-1.5, -0.5] times ``log_decay``."""
    g = torch.Generator().manual_seed(case.seed)
    Bs, T, H, G, P, N = case.batch, case.seqlen, case.heads, case.groups, case.p, case.n
    x = torch.randn(Bs, T, H, P, generator=g)
    if case.extras:
        dt = torch.randn(Bs, T, H, generator=g) - 1.0
    else:
        dt = torch.rand(Bs, T, H, generator=g) * 0.5 + 0.05
    A = -(torch.rand(H, generator=g) + 0.5) * case.log_decay
    B = torch.randn(Bs, T, G, N, generator=g) * N**-0.5
    C = torch.randn(Bs, T, G, N, generator=g) * N**-0.5
    main = [t.to(device=device, dtype=dtype) for t in (x, dt, B, C)]
    x, dt, B, C = main
    A = A.to(device)  # parameters stay float32, as in the layer
    D = z = dt_bias = h0 = None
    if case.extras:
        D = torch.randn(H, generator=g).to(device)
        z = torch.randn(Bs, T, H, P, generator=g).to(device=device, dtype=dtype)
        dt_bias = (torch.randn(H, generator=g) * 0.5).to(device)
    if case.initial_state:
        h0 = torch.randn(case.num_sequences, H, P, N, generator=g).to(device)
    tensors = (x, dt, A, B, C, D, z, dt_bias, h0)
    return [t.requires_grad_(requires_grad) if t is not None else None for t in tensors]
