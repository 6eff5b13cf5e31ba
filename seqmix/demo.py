"""A DeltaNet layer end to end: training step, chunked prefill and one-token decoding.

``python -m seqmix.demo`` runs it on the GPU when there is one, else on the CPU
(reference kernels, or the Triton interpreter with ``TRITON_INTERPRET=1``), and
prints how far the decoded outputs are from one full forward call.
"""

from __future__ import annotations

import argparse
import time

import torch

from seqmix.archs import build_mixer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--decode", type=int, default=16, help="tokens decoded one at a time after the prefill")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layer = build_mixer("deltanet", hidden_size=args.hidden_size, num_heads=args.num_heads).to(device)
    total = args.seqlen + args.decode
    x = torch.randn(args.batch, total, args.hidden_size, device=device)

    start = time.perf_counter()
    y, _ = layer(x)
    y.square().mean().backward()
    grad_norm = torch.cat([p.grad.flatten() for p in layer.parameters()]).norm().item()
    train_s = time.perf_counter() - start

    with torch.no_grad():
        state = layer.init_state(args.batch)
        pieces = [layer(x[:, : args.seqlen], state)]
        state = pieces[0][1]
        start = time.perf_counter()
        for t in range(args.seqlen, total):
            y_t, state = layer(x[:, t : t + 1], state)
            pieces.append((y_t, state))
        decode_ms = (time.perf_counter() - start) * 1e3 / max(args.decode, 1)
        y_steps = torch.cat([p[0] for p in pieces], 1)
        err = ((y_steps - y).norm() / y.norm()).item()

    print(f"device {device}; DeltaNet hidden {args.hidden_size}, {args.num_heads} heads, "
          f"{sum(p.numel() for p in layer.parameters())} parameters")
    print(f"forward+backward on [{args.batch}, {total}]: {train_s * 1e3:.1f} ms, grad norm {grad_norm:.4f}")
    print(f"prefill {args.seqlen} + decode {args.decode}: {decode_ms:.2f} ms/token, "
          f"relative error vs one full call {err:.2e}")
    if not err < 1e-3:
        raise SystemExit(f"decoding disagrees with the full forward (relative error {err:.2e})")


if __name__ == "__main__":
    main()
