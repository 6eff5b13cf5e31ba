"""Validation bits per byte of a trained recurrent-depth LM decoded token by token: exact vs bounded state.

The exact state (one core state per iteration) decodes to the full call's result; the bounded one
(one core state whatever r, each past token seen as its last iteration left it) approximates it.
This prints the bits per byte of the full call and of one-token decoding in both modes, per r.

    python -m benchmarks.eval_recurrent_depth_states RUN/model [--num-steps 4,8] [--windows 4] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from seqmix.archs.lm import LanguageModel
from seqmix.data import load_corpus


def bits_per_byte(logits, y) -> float:
    nats = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
    return nats / math.log(2) / max(1, int((y < 256).sum()))


@torch.no_grad()
def decoded_logits(model, x, r, mode):
    for block in model.blocks:
        if getattr(block.mixer, "takes_steps", False):
            block.mixer.state_mode = mode
    state = model.init_state(x.shape[0], num_steps=r, capacity=x.shape[1])
    steps = []
    for t in range(x.shape[1]):
        logits, state = model(x[:, t : t + 1], state, num_steps=r)
        steps.append(logits)
    return torch.cat(steps, 1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--num-steps", default="4,8")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    model = LanguageModel.from_pretrained(args.model_dir).eval()
    corpus = load_corpus(None, args.seq_len)
    starts = corpus.val_starts(args.seq_len, args.windows * args.seq_len)
    x, y = corpus.batch("val", starts, args.seq_len)
    rows = []
    print(f"{x.shape[0]} validation windows of {x.shape[1]} tokens, decoded one token at a time")
    print(f"{'r':>3} {'full call':>10} {'exact':>10} {'bounded':>10} {'bounded-exact':>14} {'s/mode':>7}")
    for r in map(int, args.num_steps.split(",")):
        with torch.no_grad():
            full = bits_per_byte(model(x, num_steps=r)[0], y)
        start = time.perf_counter()
        exact = bits_per_byte(decoded_logits(model, x, r, "exact"), y)
        bounded = bits_per_byte(decoded_logits(model, x, r, "bounded"), y)
        seconds = (time.perf_counter() - start) / 2
        rows.append({"r": r, "full": full, "exact": exact, "bounded": bounded})
        print(f"{r:>3} {full:>10.4f} {exact:>10.4f} {bounded:>10.4f} {bounded - exact:>+14.4f} {seconds:>7.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
