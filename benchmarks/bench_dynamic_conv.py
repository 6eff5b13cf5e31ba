"""Time DynamicConv (K=31, causal, softmax) per backend, forward and forward+backward, against
the unfold reference and causal SDPA attention of the same width.

Shapes: 16K tokens per batch, T from 512 to 8192, C=1024 in H=16 heads (R=64), so SDPA runs
16 heads of dim 64 on the same activations. Besides the table it prints, per shape, how many
times faster the fused kernels are than the unfold reference and than SDPA (the issue's
targets: >= 5x the reference, faster than SDPA at T >= 2048).

    python -m benchmarks.bench_dynamic_conv [--json out.json] [--backends triton,cuda,reference] [--quick]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.common import floor_ms, measure, parse_args, report
from seqmix.kernels import dynamic_conv, light_conv
from seqmix.kernels.backend import why_unavailable

C, H, K = 1024, 16, 31


def dynamic_conv_floor_ms(B, T, C, H, K, elem_bytes, backward):
    """x and the weights read once, out written once; the backward reads x, the weights and
    dout and writes dx and the weights' gradient."""
    per_token = (2 * C + H * K) + ((3 * C + 2 * H * K) if backward else 0)
    return floor_ms(B * T * per_token * elem_bytes)


def make_inputs(B, T, dtype, requires_grad, device="cuda", channels=C, heads=H, taps=K):
    x = torch.randn(B, T, channels, device=device, dtype=dtype)
    w = torch.randn(B, T, heads, taps, device=device, dtype=dtype)
    return [x.requires_grad_(requires_grad), w.requires_grad_(requires_grad)]


def _sdpa(x, w):
    """Causal attention of the same width on the same activations (q = k = v = x in H heads)."""
    B, T, _ = x.shape
    q = x.view(B, T, H, -1).transpose(1, 2)
    return F.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2).reshape(B, T, -1)


def _backend(name):
    return lambda x, w: dynamic_conv(x, w, backend=name)


def impls(backends):
    out = {b: _backend(b) for b in backends}
    out["sdpa"] = _sdpa
    return out


def make_light_inputs(B, T, dtype, requires_grad, device="cuda", channels=C, heads=H, taps=K):
    """x [B, T, C] and one kernel per head [H, K] (LightConv)."""
    x = torch.randn(B, T, channels, device=device, dtype=dtype)
    w = torch.randn(heads, taps, device=device, dtype=dtype)
    return [x.requires_grad_(requires_grad), w.requires_grad_(requires_grad)]


def light_impls(backends):
    """LightConv per backend (the anchor cases' check of the same kernels with shared weights)."""
    out = {b: (lambda b: lambda x, w: light_conv(x, w, backend=b))(b) for b in backends}
    out["sdpa"] = _sdpa
    return out


def speedups(rows) -> list[str]:
    """Lines 'B T mode: reference/fused, sdpa/fused' for each fused backend."""
    by_key = {}
    for r in rows:
        by_key.setdefault((r["B"], r["T"], r["mode"]), {})[r["impl"]] = r["ms"]
    lines = []
    for (B, T, mode), ms in by_key.items():
        for fused in ("triton", "cuda"):
            if fused in ms:
                ref = f"{ms['reference'] / ms[fused]:.1f}x" if "reference" in ms else "-"
                lines.append(f"{fused:<7} B{B:<3} T{T:<5} {mode:<8} reference/this {ref:>7}   sdpa/this "
                             f"{ms['sdpa'] / ms[fused]:.2f}x")
    return lines


def main(argv=None):
    args = parse_args(__doc__, argv)
    dtype = getattr(torch, args.dtype)
    backends = args.backends.split(",")
    if "cuda" not in backends and why_unavailable("cuda", torch.device("cuda")) is None:
        backends.insert(1, "cuda")
    Ts = (2048,) if args.quick else (512, 1024, 2048, 4096, 8192)
    rows = measure(
        "dynamic_conv", [{"B": 16384 // T, "T": T} for T in Ts], impls(backends),
        lambda s, grad: make_inputs(s["B"], s["T"], dtype, grad),
        lambda s, backward: dynamic_conv_floor_ms(s["B"], s["T"], C, H, K, dtype.itemsize, backward), args.dtype,
    )
    report(f"dynamic_conv K{K} causal softmax, {args.dtype}, C{C} H{H}", rows, ("B", "T"), args.json)
    print("\n".join(speedups(rows)))


if __name__ == "__main__":
    main()
