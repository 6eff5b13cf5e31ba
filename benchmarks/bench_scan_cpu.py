"""The selective scan (Mamba-1) alone on the CPU: forward + backward, and the forward without gradients, of
the reference and the C++ kernels (backend "cpu") in one process, taking turns call by call, at the tiny
LM's shapes (D = 256, N = 16, B16 T128 and B2 T2048; the Mamba layer's inputs: z, D and delta_bias,
softplus). Medians of wall time in ms.

    python -m benchmarks.bench_scan_cpu [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.bench_ssd import make_scan_inputs
from seqmix.kernels import selective_scan

SHAPES = ((16, 128), (2, 2048))
D, N = 256, 16
BACKENDS = ("reference", "cpu")


def _calls(inputs, dy, backend):
    u, delta, A, B, C, skip, z, bias = inputs

    def scan():
        return selective_scan(u, delta, A, B, C, D=skip, z=z, delta_bias=bias, delta_softplus=True, backend=backend)[0]

    def train():
        torch.autograd.grad(scan(), inputs, dy)

    def forward():
        with torch.no_grad():
            scan()

    return {"fwd+bwd": train, "fwd": forward}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"selective_scan on the CPU, {args.threads} thread(s), D{D} N{N}, float32; median ms")
    for Bsz, T in SHAPES:
        inputs = make_scan_inputs(Bsz, T, D, N, torch.float32, True, "cpu")
        dy = torch.randn(Bsz, T, D)
        calls = {b: _calls(inputs, dy, b) for b in BACKENDS}
        times = {(b, k): [] for b in BACKENDS for k in calls[b]}
        for b in BACKENDS:  # warm-up (and the first call builds the C++ kernels)
            for fn in calls[b].values():
                fn()
        for _ in range(args.repeats):
            for (b, k), ts in times.items():
                start = time.perf_counter()
                calls[b][k]()
                ts.append(time.perf_counter() - start)
        med = {key: statistics.median(ts) * 1e3 for key, ts in times.items()}
        cells = [f"{b} fwd+bwd {med[(b, 'fwd+bwd')]:.1f} (fwd {med[(b, 'fwd')]:.1f})" for b in BACKENDS]
        ratio = med[("reference", "fwd+bwd")] / med[("cpu", "fwd+bwd")]
        print(f"B{Bsz} T{T}: " + "; ".join(cells) + f"; cpu {ratio:.1f}x faster")


if __name__ == "__main__":
    main()
