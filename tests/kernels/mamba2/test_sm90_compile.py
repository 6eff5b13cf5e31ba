"""Every Triton kernel of SSD compiles for sm_90: bf16 at the anchor dims (P64 N128) and P128 N256, fp32 at P64 N64.

Run as a module it compiles and prints JSON (registers, stack, spills per
kernel); ``--all`` compiles every autotune config. The test runs the short set
in a subprocess with Triton's interpreter off (see tests/sm90.py).
"""

import sys

import pytest

from tests.sm90 import compile_in_subprocess, print_compiled

# Compiling every kernel for sm_90 takes a minute or more; the quick tier leaves it to CI (README, "Tests").
pytestmark = pytest.mark.slow


def _specs(full: bool):
    from seqmix.kernels.mamba2 import triton as kern

    dims = [("bf16", 64, 128), ("bf16", 128, 256), ("fp32", 64, 64)]
    for dt, P, N in dims:
        io = {n: f"*{dt}" for n in ("x", "z", "dt", "B", "C", "y", "out", "dx", "dy", "h", "dh")}
        f32 = {n: "*fp32" for n in ("A", "D", "dt_bias", "dtp", "lcum", "h0", "ht", "dht", "dh0", "ddt_part",
                                    "dl_part", "dd_part", "db", "dc", "ddt_direct", "dl", "ddt", "da_part")}
        index = {"chunk_index": "*i32", "cu_seqlens": "*i64", "chunk_offsets": "*i64", "part_stride": "i64",
                 "lo": "fp32", "hi": "fp32"}
        shape = {"H": 64, "G": 1, "P": P, "N": N, "BT": kern.CHUNK, "PREC": "tf32" if dt == "bf16" else "ieee",
                 **kern.block_sizes(P, N, 64)}
        flags = {"HAS_H0": True, "STORE_HT": True, "HAS_DHT": True, "STORE_DH0": True, "HAS_D": True,
                 "HAS_Z": True, "STORE_Y": True, "HAS_BIAS": True, "SOFTPLUS": True}
        for kernel in kern.KERNELS:
            for cfg in kernel.configs if full else kernel.configs[:1]:
                args = {**io, **f32, **index, **shape, **flags, **cfg.kwargs}
                yield kernel, args, cfg, {"dtype": dt, "P": P, "N": N}


def test_kernels_compile_for_sm90():
    from seqmix.kernels.mamba2 import triton as kern

    results = compile_in_subprocess("tests.kernels.mamba2.test_sm90_compile")
    assert {r["kernel"] for r in results} == {k.fn.__name__ for k in kern.KERNELS}


if __name__ == "__main__":
    print_compiled(_specs(full="--all" in sys.argv))
