"""``python -m seqmix.kernels.build``: compile the C++ CPU kernels now (or load them when they are current),
so that every op that has them takes them from the first call on (seqmix/kernels/cpu.py, :func:`ready`)."""

import logging

from seqmix.kernels import cpu

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    why = cpu.unavailable()
    print(f"seqmix: the C++ CPU kernels are ready in {cpu.build_dir()}" if why is None else f"seqmix: {why}")
    raise SystemExit(0 if why is None else 1)
