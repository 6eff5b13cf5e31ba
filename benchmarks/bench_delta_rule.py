"""Time ``delta_rule`` per backend, forward and forward+backward, against flash-linear-attention.

Shapes: the two anchor shapes of the project (B8 T2048 and B2 T8192, H16 D128)
and a sweep of T from 512 to 16384 at 16K tokens per batch. For each shape it
prints the median ms, the ratio to fla's ``chunk_delta_rule`` timed in the same
process on the same inputs (when fla is importable), the fraction of the
roofline floor reached, and the Triton kernels' error against the reference.

    python -m benchmarks.bench_delta_rule [--json out.json] [--backends triton,reference] [--quick]
"""

from __future__ import annotations

import torch

from benchmarks.common import floor_ms, run_anchor_benchmark
from seqmix.kernels import delta_rule

CHUNK = 64


def delta_rule_floor_ms(B, T, H, K, V, elem_bytes, backward):
    """Roofline floor of the chunked delta rule in ms."""
    tokens = B * T * H
    io = tokens * ((2 * K + 2 * V + 1) * elem_bytes)  # q, k, v, beta in; o out
    # Per chunk of C rows: K K^T, T = (I+A)^-1 (~C^3/3), W, U, W S, Q S, Q K^T, P V', K^T V'.
    C = CHUNK
    per_token = 2 * C * K + C * C / 3 + 2 * C * K + 2 * C * V + 2 * K * V * 3 + 2 * C * K + 2 * C * V
    factor = 3 if backward else 1  # the backward reads the inputs and dO and writes one gradient per input
    return floor_ms(factor * io, factor * tokens * per_token)


def make_inputs(B, T, H, K, V, dtype, requires_grad, device="cuda"):
    q = torch.randn(B, T, H, K, device=device, dtype=dtype)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, device=device, dtype=torch.float32), dim=-1).to(dtype)
    v = torch.randn(B, T, H, V, device=device, dtype=dtype)
    beta = torch.rand(B, T, H, device=device, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v, beta)]


def impls(backends):
    out = {b: (lambda b: lambda q, k, v, beta: delta_rule(q, k, v, beta, backend=b)[0])(b) for b in backends}
    try:
        from fla.ops.delta_rule import chunk_delta_rule
    except ImportError:
        return out
    out["fla"] = lambda q, k, v, beta: chunk_delta_rule(q, k, v, beta)[0]
    return out


def main(argv=None):
    run_anchor_benchmark("delta_rule", __doc__, impls, make_inputs, delta_rule_floor_ms, argv)


if __name__ == "__main__":
    main()
