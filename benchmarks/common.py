"""Timing, error checks and the result table shared by the kernel benchmarks.

Times are ``triton.testing.do_bench`` medians on fresh random inputs. The
floor of an op is max(bytes moved once / copy bandwidth, FLOPs / matmul peak)
with the H100 ceilings measured for the project's anchors.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

COPY_BYTES_PER_S = 3.0e12
MATMUL_FLOP_PER_S = 716e12


def parse_args(doc: str, argv=None) -> argparse.Namespace:
    """The benchmarks' common options; exits when there is no GPU to time on."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--backends", default="triton,reference", help="seqmix backends to time")
    parser.add_argument("--quick", action="store_true", help="the first anchor shape(s) only")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("the benchmarks need a CUDA GPU")
    return args


def floor_ms(bytes_moved: float, flops: float = 0.0) -> float:
    return max(bytes_moved / COPY_BYTES_PER_S, flops / MATMUL_FLOP_PER_S) * 1e3


def _host_bench(fn, grad_to_none=None, return_mode="median", reps: int = 3) -> float:
    """Median host-clock ms of a few calls after one: the CPU rehearsal's stand-in for do_bench,
    which needs CUDA. It proves the timing path runs; its numbers say nothing about speed."""
    fn()
    times = []
    for _ in range(reps):
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def timed(fn, inputs, backward: bool) -> float:
    """Median ms of ``fn(*inputs)``, or of it and a backward from a fixed random gradient
    (``do_bench`` on a GPU; without CUDA, the rehearsal's host clock)."""
    if torch.cuda.is_available():
        from triton.testing import do_bench
    else:
        do_bench = _host_bench

    if not backward:
        with torch.no_grad():
            return do_bench(lambda: fn(*inputs), return_mode="median")
    grad = None

    def step():
        nonlocal grad
        out = fn(*inputs)
        if grad is None:
            grad = torch.randn_like(out)
        out.backward(grad)

    return do_bench(step, grad_to_none=[t for t in inputs if t.requires_grad], return_mode="median")


def rel_errors(fn, ref_fn, inputs) -> list[float]:
    """Relative errors ||a - b|| / ||b|| (float64) of ``fn``'s output (each, when it returns a tuple),
    then of its gradient for each input that requires one, against ``ref_fn`` run on float32 copies of
    the inputs; inf where ``fn`` gave a NaN or inf. The timed (autotuned) kernels are checked, not only
    the tested ones."""
    ref_inputs = [t.detach().float().requires_grad_(t.requires_grad) for t in inputs]
    outs, refs = fn(*inputs), ref_fn(*ref_inputs)
    outs, refs = (outs, refs) if isinstance(outs, tuple) else ((outs,), (refs,))
    wrt = [t for t in inputs if t.requires_grad]
    grads = ref_grads = ()
    if wrt:
        seeds = [torch.randn_like(r) for r in refs]
        grads = torch.autograd.grad(outs, wrt, [g.to(o.dtype) for g, o in zip(seeds, outs, strict=True)])
        ref_grads = torch.autograd.grad(refs, [t for t in ref_inputs if t.requires_grad], seeds)
    pairs = [*zip(outs, refs, strict=True), *zip(grads, ref_grads, strict=True)]
    return [_rel(a, b) for a, b in pairs]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def max_rel_err(fn, ref_fn, inputs) -> float:
    """Largest of :func:`rel_errors`."""
    return max(rel_errors(fn, ref_fn, inputs))


def measure(op: str, shapes, impls: dict, make_inputs, floor, dtype: str, anchor: str = "fla") -> list[dict]:
    """Time every impl at every shape, forward and forward+backward; the Triton impl is also
    checked against the reference. ``make_inputs(shape, requires_grad)`` and ``floor(shape, backward)``
    take a shape dict; ``impls`` maps names ("triton", "reference", "fla", ...) to callables; the
    impl named ``anchor`` (when present) is the one every other is compared with."""
    rows = []
    for shape in shapes:
        for backward in (False, True):
            inputs = make_inputs(shape, backward)
            times = {}
            for name, fn in impls.items():
                try:
                    times[name] = timed(fn, inputs, backward)
                except Exception as e:  # a comparator may refuse a call (fla on Hopper); seqmix's own may not
                    if name in ("triton", "reference", "cuda"):
                        raise
                    print(f"{op}: {name} refused {'fwd+bwd' if backward else 'fwd'} at {shape}: {e}", file=sys.stderr)
            error = None
            if backward and "triton" in impls and "reference" in impls:
                error = max_rel_err(impls["triton"], impls["reference"], make_inputs(shape, True))
            for name, ms in times.items():
                rows.append({
                    "op": op, "impl": name, **shape, "dtype": dtype, "mode": "fwd+bwd" if backward else "fwd",
                    "ms": ms, "floor_ms": floor(shape, backward),
                    "anchor": anchor if anchor in times else None,
                    "anchor_over_this": times[anchor] / ms if anchor in times else None,
                    "rel_err": error if name == "triton" else None,
                })
            del inputs
            torch.cuda.empty_cache()
    return rows


def report(title: str, rows: list[dict], shape_keys: tuple[str, ...], json_path: str | None,
           anchor: str = "fla") -> None:
    print(f"\n{title}, {torch.cuda.get_device_name()}")
    print(f"{anchor}/this > 1: faster than {anchor} (same process, same inputs); floor/this: fraction of the "
          "roofline floor reached; rel err: Triton output and gradients vs the float32 reference")
    head = " ".join(f"{k:>6}" for k in shape_keys)
    print(f"{'impl':<10} {head} {'mode':<8} {'ms':>9} {anchor + '/this':>9} {'floor/this':>10} {'rel err':>9}")
    for r in rows:
        vs = f"{r['anchor_over_this']:.2f}x" if r["anchor_over_this"] is not None else "-"
        err = f"{r['rel_err']:.1e}" if r["rel_err"] is not None else ""
        dims = " ".join(f"{r[k]:>6}" for k in shape_keys)
        floor = r["floor_ms"] / r["ms"]
        print(f"{r['impl']:<10} {dims} {r['mode']:<8} {r['ms']:>9.3f} {vs:>9} {floor:>10.1%} {err:>9}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)


def run_anchor_benchmark(op: str, doc: str, impls, make_inputs, floor, argv=None) -> None:
    """The command line of a [B, T, H16, D128] op benchmark: the anchor shapes (B8 T2048, B2 T8192),
    then unless --quick a sweep of T at 16K tokens per batch. ``impls(backends)`` maps names to
    callables; ``make_inputs(B, T, H, K, V, dtype, requires_grad)`` and
    ``floor(B, T, H, K, V, elem_bytes, backward)`` take the sizes."""
    args = parse_args(doc, argv)
    dtype = getattr(torch, args.dtype)
    H, D = 16, 128
    shapes = [(8, 2048), (2, 8192)]
    if not args.quick:
        shapes += [(16384 // T, T) for T in (512, 1024, 4096, 16384)]
    rows = measure(
        op, [{"B": B, "T": T} for B, T in shapes], impls(args.backends.split(",")),
        lambda s, grad: make_inputs(s["B"], s["T"], H, D, D, dtype, grad),
        lambda s, backward: floor(s["B"], s["T"], H, D, D, dtype.itemsize, backward),
        args.dtype,
    )
    report(f"{op}, {args.dtype}, H{H} D{D}", rows, ("B", "T"), args.json)
