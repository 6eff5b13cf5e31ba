"""Both Triton kernels of the selective scan compile for sm_90: bf16 at D4096 N16 (grouped and not), fp32 at N64.

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
    from seqmix.kernels.mamba import triton as kern

    for dt, G, N in (("bf16", 1, 16), ("bf16", 4, 16), ("fp32", 1, 64)):
        io = {n: f"*{dt}" for n in ("u", "delta", "B", "C", "z", "out", "dout", "du", "dz")}
        f32 = {n: "*fp32" for n in ("A", "D", "delta_bias", "hc", "h0", "ht", "scratch", "dht", "ddelta", "da_part",
                                    "dd_part", "db_part", "dc_part", "dh0")}
        index = {"chunk_offsets": "*i64", "cu_seqlens": "*i64", "part_stride": "i64"}
        shape = {"DIM": 4096, "G": G, "N": N, "BN": N, "CH": kern.CHUNK, "BD": kern.BD_BWD}
        flags = {"HAS_D": True, "HAS_Z": True, "HAS_BIAS": True, "SOFTPLUS": True, "HAS_H0": True,
                 "STORE_HT": True, "STORE_CHUNKS": True, "HAS_DHT": True, "STORE_DH0": True}
        for kernel in kern.KERNELS:
            for cfg in kernel.configs if full else kernel.configs[:1]:
                args = {**io, **f32, **index, **shape, **flags, **cfg.kwargs}
                yield kernel, args, cfg, {"dtype": dt, "G": G, "N": N}


def test_kernels_compile_for_sm90():
    results = compile_in_subprocess("tests.kernels.mamba.test_sm90_compile")
    assert {r["kernel"] for r in results} == {"selective_scan_recurrent_fwd_kernel",
                                              "selective_scan_recurrent_bwd_kernel"}


if __name__ == "__main__":
    print_compiled(_specs(full="--all" in sys.argv))
