"""Time ``gla`` per backend, forward and forward+backward, against flash-linear-attention.

Shapes: the two anchor shapes (B8 T2048 and B2 T8192, H16 D128) and a sweep of T
from 512 to 16384 at 16K tokens per batch. For each shape it prints the median ms,
the ratio to fla's ``chunk_gla`` timed in the same process on the same inputs (when
fla is importable), the fraction of the roofline floor reached, and the Triton
kernels' error against the reference.

    python -m benchmarks.bench_gla [--json out.json] [--backends triton,reference] [--quick]
"""

from __future__ import annotations

import torch

from benchmarks.common import floor_ms, run_anchor_benchmark
from seqmix.kernels import gla

CHUNK = 64


def gla_floor_ms(B, T, H, K, V, elem_bytes, backward):
    """Roofline floor of chunked GLA in ms: q, k, v, g in and o out once; per chunk of C rows the
    score matrix, Q S, A V and the state update K^T V."""
    tokens = B * T * H
    io = tokens * ((3 * K + 2 * V) * elem_bytes)  # q, k, g, v in; o out
    C = CHUNK
    per_token = 2 * C * K + 2 * K * V + 2 * C * V + 2 * K * V
    factor = 3 if backward else 1  # the backward reads the inputs and dO and writes one gradient per input
    return floor_ms(factor * io, factor * tokens * per_token)


def make_inputs(B, T, H, K, V, dtype, requires_grad, device="cuda"):
    """q, k, v and log decays g = logsigmoid(normal) / 16, as the GLA layer makes them (in the inputs' dtype)."""
    q, k = (torch.randn(B, T, H, K, device=device, dtype=dtype) for _ in range(2))
    v = torch.randn(B, T, H, V, device=device, dtype=dtype)
    g = (torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, device=device)) / 16).to(dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v, g)]


def impls(backends):
    out = {b: (lambda b: lambda q, k, v, g: gla(q, k, v, g, backend=b)[0])(b) for b in backends}
    try:
        from fla.ops.gla import chunk_gla
    except ImportError:
        return out
    out["fla"] = lambda q, k, v, g: chunk_gla(q, k, v, g)[0]
    return out


def main(argv=None):
    run_anchor_benchmark("gla", __doc__, impls, make_inputs, gla_floor_ms, argv)


if __name__ == "__main__":
    main()
