"""Time ``delta_rule`` per backend, forward and forward+backward, against flash-linear-attention.

Shapes: the two anchor shapes of the project (B8 T2048 and B2 T8192, H16 D128)
and a sweep of T from 512 to 16384 at 16K tokens per batch. For each shape it
prints the median ms (``triton.testing.do_bench``), the ratio to fla's
``chunk_delta_rule`` timed in the same process on the same inputs (when
fla is importable), and the fraction of the roofline floor reached:
floor = max(bytes moved once / copy bandwidth, chunked-form FLOPs / matmul peak),
with the H100 ceilings measured for the anchors (3.0 TB/s, 716 TFLOP/s).

    python benchmarks/bench_delta_rule.py [--json out.json] [--backends triton,reference] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from seqmix.kernels import delta_rule

COPY_BYTES_PER_S = 3.0e12
MATMUL_FLOP_PER_S = 716e12
CHUNK = 64


def floor_ms(B, T, H, K, V, elem_bytes, backward):
    """Roofline floor of the chunked delta rule in ms."""
    tokens = B * T * H
    io = tokens * ((2 * K + 2 * V + 1) * elem_bytes)  # q, k, v, beta in; o out
    # Per chunk of C rows: K K^T, T = (I+A)^-1 (~C^3/3), W, U, W S, Q S, Q K^T, P V', K^T V'.
    C = CHUNK
    per_token = 2 * C * K + C * C / 3 + 2 * C * K + 2 * C * V + 2 * K * V * 3 + 2 * C * K + 2 * C * V
    flops = tokens * per_token
    if backward:
        io *= 3  # the backward reads the inputs and dO and writes one gradient per input
        flops *= 3
    return max(io / COPY_BYTES_PER_S, flops / MATMUL_FLOP_PER_S) * 1e3


def make_inputs(B, T, H, K, V, dtype, requires_grad, device="cuda"):
    q = torch.randn(B, T, H, K, device=device, dtype=dtype)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, device=device, dtype=torch.float32), dim=-1).to(dtype)
    v = torch.randn(B, T, H, V, device=device, dtype=dtype)
    beta = torch.rand(B, T, H, device=device, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v, beta)]


def fla_chunk_delta_rule():
    try:
        from fla.ops.delta_rule import chunk_delta_rule
    except ImportError:
        return None
    return chunk_delta_rule


def triton_error(B, T, H, K, V, dtype, device="cuda"):
    """Largest relative error of the (autotuned) Triton output and input gradients against the
    float32 reference, on fresh inputs: the timed kernels are checked, not just the tested ones."""
    inputs = make_inputs(B, T, H, K, V, dtype, True, device)
    ref_inputs = [t.detach().float().requires_grad_() for t in inputs]
    o = delta_rule(*inputs, backend="triton")[0]
    o_ref = delta_rule(*ref_inputs, backend="reference")[0]
    do = torch.randn_like(o_ref)
    grads = torch.autograd.grad(o, inputs, do.to(o.dtype))
    ref_grads = torch.autograd.grad(o_ref, ref_inputs, do)
    pairs = [(o, o_ref), *zip(grads, ref_grads)]
    return max(((a.float() - b).norm() / b.norm()).item() for a, b in pairs)


def timed(fn, inputs, backward):
    from triton.testing import do_bench

    if not backward:
        with torch.no_grad():
            return do_bench(lambda: fn(*inputs), return_mode="median")
    do = None

    def step():
        nonlocal do
        o = fn(*inputs)
        if do is None:
            do = torch.randn_like(o)
        o.backward(do)

    return do_bench(step, grad_to_none=inputs, return_mode="median")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--backends", default="triton,reference")
    parser.add_argument("--quick", action="store_true", help="the two anchor shapes only")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_delta_rule needs a CUDA GPU")

    dtype = getattr(torch, args.dtype)
    H, D = 16, 128
    shapes = [(8, 2048), (2, 8192)]
    if not args.quick:
        shapes += [(16384 // T, T) for T in (512, 1024, 4096, 16384)]
    fla = fla_chunk_delta_rule()
    impls = {b: (lambda b: lambda q, k, v, beta: delta_rule(q, k, v, beta, backend=b)[0])(b)
             for b in args.backends.split(",")}
    if fla is not None:
        impls["fla"] = lambda q, k, v, beta: fla(q, k, v, beta)[0]

    rows = []
    for B, T in shapes:
        for backward in (False, True):
            inputs = make_inputs(B, T, H, D, D, dtype, backward)
            floor = floor_ms(B, T, H, D, D, dtype.itemsize, backward)
            times = {}
            for name, fn in impls.items():
                times[name] = timed(fn, inputs, backward)
            error = triton_error(B, T, H, D, D, dtype) if backward and "triton" in times else None
            for name, ms in times.items():
                rows.append({
                    "op": "delta_rule", "impl": name, "B": B, "T": T, "H": H, "D": D, "dtype": args.dtype,
                    "mode": "fwd+bwd" if backward else "fwd", "ms": ms, "floor_ms": floor,
                    "vs_fla": (times["fla"] / ms) if "fla" in times else None,
                    "rel_err": error if name == "triton" else None,
                })
            del inputs
            torch.cuda.empty_cache()

    print(f"\ndelta_rule, {torch.cuda.get_device_name()}, {args.dtype}, H{H} D{D}")
    print("fla/this > 1: faster than fla; floor/this: fraction of the roofline floor reached; "
          "rel err: Triton output and gradients vs the float32 reference")
    print(f"{'impl':<10} {'B':>3} {'T':>6} {'mode':<8} {'ms':>9} {'fla/this':>9} {'floor/this':>10} {'rel err':>9}")
    for r in rows:
        vs = f"{r['vs_fla']:.2f}x" if r["vs_fla"] is not None else "-"
        err = f"{r['rel_err']:.1e}" if r["rel_err"] is not None else ""
        print(f"{r['impl']:<10} {r['B']:>3} {r['T']:>6} {r['mode']:<8} {r['ms']:>9.3f} {vs:>9} "
              f"{r['floor_ms'] / r['ms']:>10.1%} {err:>9}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
