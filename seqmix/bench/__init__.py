"""Model-quality benchmarks: what each mixer is good for, next to how fast it runs.

    seqmix-bench recall --preset cpu      # multi-query associative recall (MQAR), seqmix.bench.recall
    seqmix-bench lm --preset cpu          # equal-budget byte-level LMs, seqmix.bench.lm

Each is also ``python -m seqmix.bench.<name>``; ``--help`` lists the options.
"""

from __future__ import annotations

import sys

COMMANDS = ("recall", "lm")


def main(argv=None) -> None:
    """``seqmix-bench <recall|lm> [options]``: the entry point of both benchmarks."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: seqmix-bench {{{','.join(COMMANDS)}}} [options]  (seqmix-bench <command> --help)",
              file=sys.stderr)
        raise SystemExit(2)
    command, rest = argv[0], argv[1:]
    if command == "recall":
        from seqmix.bench.recall import main as run
    else:
        from seqmix.bench.lm import main as run
    run(rest)
