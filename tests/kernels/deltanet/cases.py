"""Random delta-rule problems for Hypothesis: shapes, packed splits, initial states, seeds."""

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from tests.helpers import ON_GPU
from tests.kernels.contract import PackedSequences

# The interpreter runs every program on the CPU: keep its problems small. On the GPU every
# head dim compiles its own kernels, so few are drawn; odd and large ones have fixed tests.
MAX_T = 600 if ON_GPU else 160
# The C++ kernels' tests (CPU tensors wherever they run) draw the small ones.
CPU_HEAD_DIMS = (5, 16, 24, 32)
HEAD_DIMS = (64, 128) if ON_GPU else CPU_HEAD_DIMS


@dataclass(frozen=True)
class Case(PackedSequences):
    batch: int
    lengths: tuple[int, ...] | None  # packed sequence lengths (then batch == 1), or None for dense
    seqlen: int
    heads: int
    k: int
    v: int
    initial_state: bool
    seed: int


@st.composite
def cases(draw, max_t: int = MAX_T, head_dims=HEAD_DIMS, packed: bool | None = None):
    packed = draw(st.booleans()) if packed is None else packed
    if packed:
        lengths = tuple(draw(st.lists(st.integers(0, max_t // 2), min_size=1, max_size=4)))
        if sum(lengths) == 0:
            lengths = lengths + (1,)
        batch, seqlen = 1, sum(lengths)
    else:
        lengths, batch, seqlen = None, draw(st.integers(1, 2)), draw(st.integers(1, max_t))
    return Case(
        batch=batch, lengths=lengths, seqlen=seqlen, heads=draw(st.integers(1, 2)),
        k=draw(st.sampled_from(head_dims)), v=draw(st.sampled_from(head_dims)),
        initial_state=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_inputs(case: Case, dtype, device, requires_grad=False):
    """q, k (unit norm, as DeltaNet feeds them), v, beta in (0, 1), and an initial state or None."""
    g = torch.Generator().manual_seed(case.seed)
    B, T, H, K, V = case.batch, case.seqlen, case.heads, case.k, case.v
    q = torch.randn(B, T, H, K, generator=g)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    v = torch.randn(B, T, H, V, generator=g)
    beta = torch.rand(B, T, H, generator=g)
    h0 = torch.randn(case.num_sequences, H, K, V, generator=g) if case.initial_state else None
    tensors = [t.to(device=device, dtype=dtype) for t in (q, k, v, beta)]
    if h0 is not None:
        h0 = h0.to(device)
    return [t.requires_grad_(requires_grad) if t is not None else None for t in (*tensors, h0)]


def make_gated_inputs(case: Case, dtype, device, requires_grad=False, g=None):
    """As :func:`make_inputs`, plus log decays g [B, T, H] in float32: uniform in [-4, 0) unless given."""
    q, k, v, beta, h0 = make_inputs(case, dtype, device)
    if g is None:
        gen = torch.Generator().manual_seed(case.seed + 7)
        g = -4 * torch.rand(case.batch, case.seqlen, case.heads, generator=gen)
    g = g.to(device)
    return [t.requires_grad_(requires_grad) if t is not None else None for t in (q, k, v, g, beta, h0)]
