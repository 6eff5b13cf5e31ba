"""Time ``gated_delta_rule`` per backend, forward and forward+backward, against flash-linear-attention.

Shapes: the two anchor shapes (B8 T2048 and B2 T8192, H16 D128) and a sweep of T
from 512 to 16384 at 16K tokens per batch. For each shape it prints the median ms,
the ratio to fla's ``chunk_gated_delta_rule`` timed in the same process on the same
inputs (when fla is importable; fla 0.6 refuses its backward on Hopper with
Triton 3.4-3.7.0, which the table then shows as missing), the fraction of the
roofline floor reached (the delta rule's: the decay adds O(C^2) per chunk), and the
Triton kernels' error against the reference.

    python -m benchmarks.bench_gated_delta_rule [--json out.json] [--backends triton,reference] [--quick]
"""

from __future__ import annotations

import torch

from benchmarks.bench_delta_rule import delta_rule_floor_ms
from benchmarks.bench_delta_rule import make_inputs as make_delta_rule_inputs
from benchmarks.common import run_anchor_benchmark
from seqmix.kernels import gated_delta_rule


def make_inputs(B, T, H, K, V, dtype, requires_grad, device="cuda"):
    """q, k (unit norm), v, g (float32 log decays as Gated DeltaNet makes them, mostly in [-1, 0]), beta."""
    q, k, v, beta = make_delta_rule_inputs(B, T, H, K, V, dtype, False, device)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device=device)) / 4
    return [t.requires_grad_(requires_grad) for t in (q, k, v, g, beta)]


def impls(backends):
    out = {b: (lambda b: lambda q, k, v, g, beta: gated_delta_rule(q, k, v, g, beta, backend=b)[0])(b)
           for b in backends}
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError:
        return out
    out["fla"] = lambda q, k, v, g, beta: chunk_gated_delta_rule(q, k, v, g, beta)[0]
    return out


def main(argv=None):
    run_anchor_benchmark("gated_delta_rule", __doc__, impls, make_inputs, delta_rule_floor_ms, argv)


if __name__ == "__main__":
    main()
