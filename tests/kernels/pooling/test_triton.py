"""Hypothesis: the Triton segment ops against the reference, outputs and the gradients of x, y and the
boundaries, on dense and packed batches with random boundary rates (none and every token included)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqmix.kernels import segment_pool, segment_upsample
from tests.helpers import DEVICE, KERNEL_DTYPES, ON_GPU, TOL, assert_rel
from tests.kernels.pooling.oracle import cu

MAX_T = 1500 if ON_GPU else 300


@st.composite
def problems(draw):
    if draw(st.booleans()):
        lengths = draw(st.lists(st.integers(0, MAX_T // 2), min_size=1, max_size=4))
        lengths = lengths if sum(lengths) else lengths + [1]
        batch, T = 1, sum(lengths)
    else:
        lengths, batch, T = None, draw(st.integers(1, 2)), draw(st.integers(1, MAX_T))
    return {
        "batch": batch, "T": T, "lengths": lengths,
        "D": draw(st.sampled_from((1, 5, 16, 70) if not ON_GPU else (64, 200, 1024))),
        "rate": draw(st.sampled_from((0.0, 0.05, 0.25, 1.0))),
        "max_segments": draw(st.one_of(st.none(), st.integers(1, 8))),
        "dtype": draw(st.sampled_from(KERNEL_DTYPES)),
        "seed": draw(st.integers(0, 2**16)),
    }


def _run(case, backend):
    g = torch.Generator().manual_seed(case["seed"])
    B, T, D, dtype = case["batch"], case["T"], case["D"], case["dtype"]
    x = torch.randn(B, T, D, generator=g).to(DEVICE, dtype).requires_grad_()
    b = (torch.rand(B, T, generator=g) < case["rate"]).float().to(DEVICE).requires_grad_()
    cu_seqlens = None if case["lengths"] is None else cu(case["lengths"], DEVICE)
    pooled = segment_pool(x, b, max_segments=case["max_segments"], cu_seqlens=cu_seqlens, backend=backend)
    N, S = pooled.shape[:2]
    null = torch.randn(N, 1, D, generator=g).to(DEVICE, dtype)
    y = torch.cat([null, pooled * 1.5], 1)
    y.retain_grad()
    out = segment_upsample(y, b, cu_seqlens=cu_seqlens, backend=backend)
    gp = torch.randn(pooled.shape, generator=g).to(DEVICE, dtype)
    go = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
    ((pooled.float() * gp.float()).sum() + (out.float() * go.float()).sum()).backward()
    return {"pooled": pooled, "out": out, "dx": x.grad, "dy": y.grad, "db": b.grad}


@settings(max_examples=60 if ON_GPU else 25)
@given(case=problems())
def test_triton_matches_reference(case):
    fused, ref = _run(case, "triton"), _run(case, "reference")
    for name in ref:
        assert_rel(fused[name], ref[name], TOL[case["dtype"]], name)
