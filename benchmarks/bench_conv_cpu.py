"""The short causal conv (W4, SiLU) alone on the CPU: forward + backward, and the forward without gradients, of
the reference and the C++ kernels (backend "cpu") in one process, taking turns call by call, at the tiny LM's
shapes (q|k|v of DeltaNet: D 384; Mamba-2's x|B|C: about 512; B16 T128 and B2 T2048), with and without a
bias. Next to them a single elementwise multiply of the same size, forward + backward: the floor of a kernel
that passes over memory a few times. Medians of wall time in ms.

    python -m benchmarks.bench_conv_cpu [--threads 1] [--repeats 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from seqmix.kernels import causal_conv1d

SHAPES = ((16, 128, 384), (16, 128, 512), (2, 2048, 384), (2, 2048, 512))
W = 4
BACKENDS = ("reference", "cpu")


def _calls(x, w, b, dout, backend):
    leaves = [t for t in (x, w, b) if t is not None]

    def conv():
        return causal_conv1d(x, w, b, activation="silu", backend=backend)[0]

    def train():
        torch.autograd.grad(conv(), leaves, dout)

    def forward():
        with torch.no_grad():
            conv()

    return {"fwd+bwd": train, "fwd": forward}


def _multiply(x, dout):
    y = torch.randn_like(x).requires_grad_()
    return lambda: torch.autograd.grad(x * y, (x, y), dout)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"causal_conv1d on the CPU, {args.threads} thread(s), W{W}, SiLU, float32; median ms")
    for B, T, D in SHAPES:
        for with_bias in (False, True):
            x = torch.randn(B, T, D, requires_grad=True)
            w = (torch.randn(D, W) / W**0.5).requires_grad_()
            b = torch.randn(D, requires_grad=True) if with_bias else None
            dout = torch.randn(B, T, D)
            calls = {(be, k): fn for be in BACKENDS for k, fn in _calls(x, w, b, dout, be).items()}
            calls[("multiply", "fwd+bwd")] = _multiply(x, dout)
            for fn in calls.values():  # warm-up (and backend="cpu" builds the C++ kernels)
                fn()
            times = {key: [] for key in calls}
            for _ in range(args.repeats):
                for key, fn in calls.items():
                    start = time.perf_counter()
                    fn()
                    times[key].append(time.perf_counter() - start)
            med = {key: statistics.median(ts) * 1e3 for key, ts in times.items()}
            cells = [f"{be} fwd+bwd {med[(be, 'fwd+bwd')]:.2f} (fwd {med[(be, 'fwd')]:.2f})" for be in BACKENDS]
            ratio = med[("reference", "fwd+bwd")] / med[("cpu", "fwd+bwd")]
            print(f"B{B} T{T} D{D} bias={with_bias}: " + "; ".join(cells)
                  + f"; multiply fwd+bwd {med[('multiply', 'fwd+bwd')]:.2f}; cpu {ratio:.1f}x faster")


if __name__ == "__main__":
    main()
