"""Time Mamba-2's ``ssd`` per backend, forward and forward+backward, against mamba_ssm.

Shapes: the project's anchor shapes B8 T2048 and B2 T8192 at H64 P64 N128 G1,
with D, dt_bias and softplus as the Mamba2 layer calls it. For each shape it
prints the median ms, the ratio to mamba_ssm's ``mamba_chunk_scan_combined``
(chunk 256) timed in the same process on the same inputs when mamba_ssm is
importable, the fraction of the floor reached, and the Triton kernels' error
against the reference.

    python -m benchmarks.bench_ssd [--json out.json] [--backends triton,reference] [--quick]
"""

from __future__ import annotations

import torch

from benchmarks.common import floor_ms, measure, parse_args, report
from seqmix.kernels import ssd

# The floor counts the FLOPs of the chunked algorithm at mamba_ssm's chunk size, as the anchor table does.
FLOOR_CHUNK = 256
H, P, N, G = 64, 64, 128, 1


def ssd_floor_ms(B, T, H, P, N, G, elem_bytes, backward, chunk=FLOOR_CHUNK):
    """max(bytes / copy bandwidth, FLOPs / matmul peak) in ms: x, dt, B, C read and y written once;
    per token and head the intra-chunk product (2 C P) and the state's write and read (4 P N);
    the backward counts three times both."""
    tokens = B * T
    io = tokens * (2 * H * P + H + 2 * G * N) * elem_bytes
    flops = tokens * H * (2 * chunk * P + 4 * P * N)
    factor = 3 if backward else 1
    return floor_ms(factor * io, factor * flops)


def make_inputs(B, T, H, P, N, G, dtype, requires_grad, device="cuda"):
    """x, dt, A, B, C, D, dt_bias as the Mamba2 layer produces them (A, D, dt_bias float32)."""
    x = torch.randn(B, T, H, P, device=device, dtype=dtype)
    dt = torch.randn(B, T, H, device=device, dtype=dtype) - 2.0
    A = -torch.empty(H, device=device).uniform_(1, 16)
    b = torch.randn(B, T, G, N, device=device, dtype=dtype) * N**-0.5
    c = torch.randn(B, T, G, N, device=device, dtype=dtype) * N**-0.5
    D = torch.ones(H, device=device)
    dt_bias = torch.randn(H, device=device) * 0.5
    return [t.requires_grad_(requires_grad) for t in (x, dt, A, b, c, D, dt_bias)]


def impls(backends):
    def seqmix_ssd(b):
        return lambda x, dt, A, B, C, D, bias: ssd(x, dt, A, B, C, D=D, dt_bias=bias, dt_softplus=True, backend=b)[0]

    out = {b: seqmix_ssd(b) for b in backends}
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError:
        return out
    out["mamba_ssm"] = lambda x, dt, A, B, C, D, bias: mamba_chunk_scan_combined(
        x, dt, A, B, C, FLOOR_CHUNK, D=D, dt_bias=bias, dt_softplus=True)
    return out


def main(argv=None):
    args = parse_args(__doc__, argv)
    dtype = getattr(torch, args.dtype)
    shapes = [(8, 2048)] if args.quick else [(8, 2048), (2, 8192)]
    rows = measure(
        "ssd", [{"B": B, "T": T} for B, T in shapes], impls(args.backends.split(",")),
        lambda s, grad: make_inputs(s["B"], s["T"], H, P, N, G, dtype, grad),
        lambda s, backward: ssd_floor_ms(s["B"], s["T"], H, P, N, G, dtype.itemsize, backward),
        args.dtype, anchor="mamba_ssm",
    )
    report(f"ssd, {args.dtype}, H{H} P{P} N{N} G{G}", rows, ("B", "T"), args.json, anchor="mamba_ssm")


if __name__ == "__main__":
    main()
