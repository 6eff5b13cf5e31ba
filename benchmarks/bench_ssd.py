"""Time Mamba-2's ``ssd`` and Mamba-1's ``selective_scan`` per backend, forward and forward+backward, against mamba_ssm.

Shapes: the project's anchor shapes B8 T2048 and B2 T8192; SSD at H64 P64 N128
G1, the selective scan at D4096 N16 (a 2048-wide Mamba with expand 2), both
with D, the step-size bias and softplus as the layers call them (and the gate
z for the selective scan). For each shape it prints the median ms, the ratio
to mamba_ssm timed in the same process on the same inputs when mamba_ssm is
importable (``mamba_chunk_scan_combined`` with chunk 256, and the CUDA
``selective_scan_fn``, whose channels-first layout is made from ours inside
the timed call), flash-linear-attention's ``chunk_simple_gla`` for SSD when fla
is importable, the fraction of the floor reached, and the Triton kernels'
error against the reference.

    python -m benchmarks.bench_ssd [--json out.json] [--backends triton,reference] [--quick]
"""

from __future__ import annotations

import json

import torch

from benchmarks.common import floor_ms, measure, parse_args, report
from seqmix.kernels import selective_scan, ssd

# The floor counts the FLOPs of the chunked algorithm at mamba_ssm's chunk size, as the anchor table does.
FLOOR_CHUNK = 256
H, P, N, G = 64, 64, 128, 1
SCAN_D, SCAN_N = 4096, 16


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


def _ssd_as_simple_gla(chunk_simple_gla, x, dt, A, B, C, D, dt_bias):
    """SSD through fla's ``chunk_simple_gla`` (a scalar decay per head and token): q = C and k = B
    broadcast to the heads, v = dt x, log decay dt A, scale 1, plus the skip D x. The broadcasts and
    the elementwise prologue are part of the timed call, as they would be in a layer using it."""
    heads = x.shape[2]
    step = torch.nn.functional.softplus(dt.float() + dt_bias)
    q, k = (t.repeat_interleave(heads // t.shape[2], dim=2) for t in (C, B))
    v = x * step.unsqueeze(-1).to(x.dtype)
    y = chunk_simple_gla(q, k, v, g=step * A, scale=1.0)[0]
    return y + x * D.unsqueeze(-1).to(x.dtype)


def impls(backends):
    def seqmix_ssd(b):
        return lambda x, dt, A, B, C, D, bias: ssd(x, dt, A, B, C, D=D, dt_bias=bias, dt_softplus=True, backend=b)[0]

    out = {b: seqmix_ssd(b) for b in backends}
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError:
        pass
    else:
        out["fla"] = lambda x, dt, A, B, C, D, bias: _ssd_as_simple_gla(chunk_simple_gla, x, dt, A, B, C, D, bias)
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError:
        return out
    out["mamba_ssm"] = lambda x, dt, A, B, C, D, bias: mamba_chunk_scan_combined(
        x, dt, A, B, C, FLOOR_CHUNK, D=D, dt_bias=bias, dt_softplus=True)
    return out


def scan_floor_ms(B, T, D, N, elem_bytes, backward):
    """u, delta, z, B, C read and y written once; the backward counts three times that. There is
    no matmul, so this is a bandwidth floor; the exp per channel, state index and token may bind first."""
    return floor_ms((3 if backward else 1) * B * T * (4 * D + 2 * N) * elem_bytes)


def make_scan_inputs(B, T, D, N, dtype, requires_grad, device="cuda"):
    """u, delta, A, B, C, D, z, delta_bias as the Mamba layer produces them (A, D, delta_bias float32)."""
    u = torch.randn(B, T, D, device=device, dtype=dtype)
    delta = torch.randn(B, T, D, device=device, dtype=dtype) * 0.5
    A = -torch.arange(1, N + 1, device=device, dtype=torch.float32).repeat(D, 1)
    b = torch.randn(B, T, N, device=device, dtype=dtype)
    c = torch.randn(B, T, N, device=device, dtype=dtype)
    skip = torch.ones(D, device=device)
    z = torch.randn(B, T, D, device=device, dtype=dtype)
    bias = torch.randn(D, device=device) * 0.5 - 4.0
    return [t.requires_grad_(requires_grad) for t in (u, delta, A, b, c, skip, z, bias)]


def scan_impls(backends):
    def seqmix_scan(b):
        return lambda u, delta, A, B, C, D, z, bias: selective_scan(
            u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True, backend=b)[0]

    out = {b: seqmix_scan(b) for b in backends}
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return out

    def channels_first(t):
        return t.transpose(1, 2).contiguous()

    out["mamba_ssm"] = lambda u, delta, A, B, C, D, z, bias: selective_scan_fn(
        channels_first(u), channels_first(delta), A, channels_first(B), channels_first(C), D=D,
        z=channels_first(z), delta_bias=bias, delta_softplus=True).transpose(1, 2)
    return out


def main(argv=None):
    args = parse_args(__doc__, argv)
    dtype = getattr(torch, args.dtype)
    shapes = [{"B": B, "T": T} for B, T in ([(8, 2048)] if args.quick else [(8, 2048), (2, 8192)])]
    backends = args.backends.split(",")
    rows = measure(
        "ssd", shapes, impls(backends),
        lambda s, grad: make_inputs(s["B"], s["T"], H, P, N, G, dtype, grad),
        lambda s, backward: ssd_floor_ms(s["B"], s["T"], H, P, N, G, dtype.itemsize, backward),
        args.dtype, anchor="mamba_ssm",
    )
    report(f"ssd, {args.dtype}, H{H} P{P} N{N} G{G}", rows, ("B", "T"), None, anchor="mamba_ssm")
    scan_rows = measure(
        "selective_scan", shapes, scan_impls(backends),
        lambda s, grad: make_scan_inputs(s["B"], s["T"], SCAN_D, SCAN_N, dtype, grad),
        lambda s, backward: scan_floor_ms(s["B"], s["T"], SCAN_D, SCAN_N, dtype.itemsize, backward),
        args.dtype, anchor="mamba_ssm",
    )
    report(f"selective_scan, {args.dtype}, D{SCAN_D} N{SCAN_N}", scan_rows, ("B", "T"), None, anchor="mamba_ssm")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows + scan_rows, f, indent=1)


if __name__ == "__main__":
    main()
