"""Time the short causal conv (SiLU) per backend, forward and forward+backward.

Shapes: the anchor shapes B8 T2048 and B2 T8192 at D4096 W4. Next to seqmix's
backends it times plain ``F.conv1d`` + SiLU in the inputs' dtype (the anchor
table's "torch" row) and flash-linear-attention's Triton causal conv when fla
is importable, causal-conv1d's CUDA ``causal_conv1d_fn`` when importable, and seqmix's CUDA
backend when the extension is built, all in the same process on the same inputs.

    python -m benchmarks.bench_causal_conv1d [--json out.json] [--quick]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.common import floor_ms, measure, parse_args, report
from seqmix.kernels import causal_conv1d
from seqmix.kernels.backend import why_unavailable


def conv_floor_ms(B, T, D, elem_bytes, backward):
    """x read and out written once; the backward reads x and dout and writes dx."""
    return floor_ms(B * T * D * elem_bytes * (5 if backward else 2))


def make_inputs(B, T, D, W, dtype, requires_grad, device="cuda"):
    """x [B, T, D] and depthwise weights [D, W] scaled to unit output variance."""
    x = torch.randn(B, T, D, device=device, dtype=dtype, requires_grad=requires_grad)
    w = (torch.randn(D, W, device=device) / W**0.5).to(dtype).requires_grad_(requires_grad)
    return [x, w]


def impls(backends):
    out = {b: (lambda b: lambda x, w: causal_conv1d(x, w, activation="silu", backend=b)[0])(b) for b in backends}
    out["torch"] = lambda x, w: F.silu(F.conv1d(x.transpose(1, 2), w.unsqueeze(1), padding=w.shape[1] - 1,
                                                groups=w.shape[0])[..., : x.shape[1]]).transpose(1, 2)
    try:
        from causal_conv1d import causal_conv1d_fn
    except ImportError:
        pass
    else:  # channels-first [B, D, T] view of the channels-last input: its channel-last path
        out["cc1d"] = lambda x, w: causal_conv1d_fn(x.transpose(1, 2), w, activation="silu").transpose(1, 2)
    try:
        from fla.modules.causal_conv1d import causal_conv1d as fla_conv
    except ImportError:
        return out
    out["fla"] = lambda x, w: fla_conv(x, w, activation="silu")[0]
    return out


def main(argv=None):
    args = parse_args(__doc__, argv)
    dtype = getattr(torch, args.dtype)
    D, W = 4096, 4
    shapes = [(8, 2048)] if args.quick else [(8, 2048), (2, 8192)]
    backends = args.backends.split(",")
    if "cuda" not in backends and why_unavailable("cuda", torch.device("cuda")) is None:
        backends.insert(1, "cuda")
    rows = measure(
        "causal_conv1d", [{"B": B, "T": T} for B, T in shapes], impls(backends),
        lambda s, grad: make_inputs(s["B"], s["T"], D, W, dtype, grad),
        lambda s, backward: conv_floor_ms(s["B"], s["T"], D, dtype.itemsize, backward), args.dtype,
    )
    report(f"causal_conv1d + SiLU, {args.dtype}, D{D} W{W}", rows, ("B", "T"), args.json)


if __name__ == "__main__":
    main()
