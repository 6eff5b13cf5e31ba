"""Time the recurrent-depth layer: iterations/s of its core, fused vs plain PyTorch, and decoding ms/token.

- Core iterations/s at r = 4, 8, 16, 32 (the layer's call divided into r iterations), inference
  (no gradient) and training (forward + backward, gradients through the last k = min(8, r)):
  ``fused`` is the layer (split adapter with ``W_e e`` computed once per call and added in the
  GEMM's epilogue, ``add_rms_norm`` for the sandwich norms: Triton on a GPU, its PyTorch reference
  on the CPU); ``plain`` is the paper's formulation on the same weights in plain PyTorch (the
  adapter on ``[s; e]`` every iteration, each residual add and RMSNorm as separate ops). Both call
  the same core mixers, so the ratio is what the fusions buy. The two are checked against each
  other (relative error of the output) in the same run.
- Decoding ms/token at fixed r: one token per sequence after a prefill, from preallocated attention
  caches (no host sync, no shape change), eager and compiled (``torch.compile(fullgraph=True)``;
  on a GPU ``mode="reduce-overhead"``, which captures a CUDA graph).

    python -m benchmarks.bench_recurrent_depth [--device cpu|cuda] [--json out.json] [--quick]

Shapes: GPU B4 T1024, hidden 1024, 8 heads, bf16; CPU B2 T64, hidden 128, 4 heads, float32; the
default core (four attention blocks) in both.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from benchmarks.common import floor_ms
from seqmix.archs import build_mixer
from seqmix.kernels import add_rms_norm

STEPS = (4, 8, 16, 32)
BACKPROP = 8
EPS = 1e-5  # add_rms_norm's default, and the blocks'


def _rms(x, weight, eps):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def make_norm_inputs(B, T, D, dtype, requires_grad, device="cuda"):
    """``add_rms_norm``'s inputs as the core's blocks pass them: a sublayer output x and the residual stream
    [B, T, D], and the norm's weight [D] (positive, around 1), all three with gradients."""
    x = torch.randn(B, T, D, device=device, dtype=dtype)
    residual = torch.randn(B, T, D, device=device, dtype=dtype)
    weight = (torch.rand(D, device=device) + 0.5).to(dtype)
    return [t.requires_grad_(requires_grad) for t in (x, residual, weight)]


def plain_add_rms_norm(x, residual, weight, eps=EPS):
    """The unfused form: PyTorch's add, then its RMSNorm (``F.rms_norm`` where this torch has it); (normed, h)."""
    h = x + residual
    if hasattr(F, "rms_norm"):
        return F.rms_norm(h, (h.shape[-1],), weight, eps), h
    return _rms(h, weight, eps), h


def norm_impls(backends) -> dict:
    """``add_rms_norm``'s normed output per seqmix backend, and the unfused form's (``torch``): the sandwich
    blocks use the normed output alone (it replaces the stream), so the gradients come from it."""
    out = {b: (lambda b: lambda x, residual, weight: add_rms_norm(x, residual, weight, EPS, backend=b)[0])(b)
           for b in backends}
    out["torch"] = lambda x, residual, weight: plain_add_rms_norm(x, residual, weight)[0]
    return out


def norm_floor_ms(B, T, D, elem_bytes, backward):
    """Bytes moved once for the normed output alone: x and the residual read, normed written (3 tensors); with
    the backward, h written and read back (or x and the residual read again: 2 either way), normed's gradient
    read and h's written (x's and the residual's are one tensor): 7. The op's forward also writes h, which
    the sandwich blocks drop: that write is not in the forward's floor."""
    return floor_ms(B * T * D * elem_bytes * (7 if backward else 3))


def plain_forward(layer, e, s, r, k):
    """The paper's loop on ``layer``'s weights in plain PyTorch: A([s; e]) every iteration, add then norm."""
    grad = torch.is_grad_enabled()
    for i in range(r):
        with torch.set_grad_enabled(grad and i >= r - k):
            h = F.linear(torch.cat([s, e], -1), layer.adapter.weight)
            for block in layer.core:
                y, _ = block.mixer(_rms(h, block.norm_mixer_in, block.eps))
                h = _rms(h + y, block.norm_mixer_out, block.eps)
                h = _rms(h + block.mlp(_rms(h, block.norm_mlp_in, block.eps)), block.norm_mlp_out, block.eps)
            s = h
    return s


def fused_forward(layer, e, s, r, k):
    return layer(e, num_steps=r, backprop_steps=k, initial_latent=s)[0]


def _timer(device, repeats):
    """``ms_of(*fns)``: each callable's time in ms: do_bench medians on a GPU; on the CPU the calls are
    interleaved and each gets its minimum over the repeats (the CPU machines are shared, and the minimum
    is the time least disturbed by other processes)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda *fns: [do_bench(fn, return_mode="median") for fn in fns]

    def cpu_ms(*fns):
        times = [[] for _ in fns]
        for fn in fns:
            fn()
        for _ in range(repeats):
            for fn, out in zip(fns, times):
                start = time.perf_counter()
                fn()
                out.append((time.perf_counter() - start) * 1e3)
        return [min(t) for t in times]

    return cpu_ms


def _shapes(device, quick):
    if device.type == "cuda":
        return {"B": 4, "T": 1024, "hidden": 1024, "heads": 8, "dtype": torch.bfloat16, "prompt": 512,
                "steps": STEPS[:2] if quick else STEPS}
    return {"B": 2, "T": 64, "hidden": 128, "heads": 4, "dtype": torch.float32, "prompt": 32,
            "steps": STEPS[:2] if quick else STEPS}


def core_rows(layer, shape, device, ms_of) -> list[dict]:
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    e = torch.randn(shape["B"], shape["T"], shape["hidden"], device=device, dtype=shape["dtype"], generator=g)
    s0 = torch.randn(e.shape, device=device, dtype=e.dtype, generator=g) * layer.init_std
    for r in shape["steps"]:
        k = min(BACKPROP, r)
        with torch.no_grad():
            a, b = fused_forward(layer, e, s0, r, k), plain_forward(layer, e, s0, r, k)
            err = ((a.float() - b.float()).norm() / b.float().norm()).item()
        for mode in ("inference", "training"):
            calls = []
            for fn in (fused_forward, plain_forward):
                if mode == "inference":
                    def call(fn=fn):
                        with torch.no_grad():
                            fn(layer, e, s0, r, k)
                else:
                    def call(fn=fn):
                        fn(layer, e, s0, r, k).float().square().mean().backward()
                calls.append(call)
            times = dict(zip(("fused", "plain"), ms_of(*calls), strict=True))
            row = {"kind": "core", "mode": mode, "r": r, "k": k, "fused_ms": times["fused"], "plain_ms": times["plain"],
                   "fused_it_per_s": r / times["fused"] * 1e3, "plain_it_per_s": r / times["plain"] * 1e3,
                   "speedup": times["plain"] / times["fused"], "rel_err": err}
            print(f"{mode:>10} {r:>3} {row['fused_it_per_s']:>11.1f} {row['plain_it_per_s']:>11.1f} "
                  f"{row['speedup']:>7.2f}x {err:>9.2e}", flush=True)
            rows.append(row)
    return rows


def decode_rows(layer, shape, device, ms_of, compile_steps, compile_backend) -> list[dict]:
    rows = []
    g = torch.Generator(device=device).manual_seed(1)
    B, P, hidden = shape["B"], shape["prompt"], shape["hidden"]
    x = torch.randn(B, P + 1, hidden, device=device, dtype=shape["dtype"], generator=g)
    for r in compile_steps:
        with torch.no_grad():
            # Room for the warm-up and timed calls of every variant: each decodes from the same prefilled state.
            _, state = layer(x[:, :P], layer.init_state(B, num_steps=r, capacity=P + 1), num_steps=r)
            token = x[:, P:]
            eager = lambda: layer(token, state, num_steps=r)
            mode = "reduce-overhead" if device.type == "cuda" and compile_backend == "inductor" else None
            torch._dynamo.reset()
            compiled_layer = torch.compile(layer, fullgraph=True, mode=mode, backend=compile_backend)
            compiled = lambda: compiled_layer(token, state, num_steps=r)
            start = time.perf_counter()
            compiled()
            compile_s = time.perf_counter() - start
            err = ((compiled()[0].float() - eager()[0].float()).norm() / eager()[0].float().norm()).item()
            eager_ms, compiled_ms = ms_of(eager, compiled)
        capture = "cuda graph (reduce-overhead)" if mode else f"none ({compile_backend}, {device.type})"
        row = {"kind": "decode", "r": r, "eager_ms_per_token": eager_ms, "compiled_ms_per_token": compiled_ms,
               "speedup": eager_ms / compiled_ms, "compile_s": compile_s, "rel_err": err, "capture": capture}
        print(f"{'':>10} {r:>3} {eager_ms:>11.2f} {compiled_ms:>11.2f} {row['speedup']:>7.2f}x {err:>9.2e}  {capture} "
              f"(compile {compile_s:.0f} s)", flush=True)
        rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--quick", action="store_true", help="r = 4 and 8 only")
    parser.add_argument("--decode-steps", default="8", help="depths r of the decoding timing, comma-separated")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per variant on the CPU")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the decoding timing")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shape = _shapes(device, args.quick)
    torch.manual_seed(0)
    layer = build_mixer("recurrent_depth", hidden_size=shape["hidden"], num_heads=shape["heads"])
    layer = layer.to(device=device, dtype=shape["dtype"]).eval()
    ms_of = _timer(device, args.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"recurrent_depth on {name}: B{shape['B']} T{shape['T']} hidden {shape['hidden']} heads {shape['heads']} "
          f"{str(shape['dtype']).removeprefix('torch.')}, core {len(layer.core)} x attention; decode after "
          f"{shape['prompt']} tokens")
    print(f"{'core':>10} {'r':>3} {'fused it/s':>11} {'plain it/s':>11} {'speedup':>8} {'rel err':>9}", flush=True)
    rows = core_rows(layer, shape, device, ms_of)
    print(f"{'decode':>10} {'r':>3} {'eager ms':>11} {'compiled ms':>11} {'speedup':>8} {'rel err':>9}  capture",
          flush=True)
    rows += decode_rows(layer, shape, device, ms_of, [int(r) for r in args.decode_steps.split(",") if r],
                        args.compile_backend)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "shape": {k: str(v) for k, v in shape.items()}, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
