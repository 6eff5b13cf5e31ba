"""Every Triton kernel of gated linear attention compiles for sm_90: bf16 at head dim 128, fp32 at 64
(``--all``: every autotune config at head dims 64, 128 and 256 in both dtypes, minutes).

Run as a module it compiles and prints JSON (registers, stack, spills per kernel); the test runs
the short set in a subprocess with Triton's interpreter off.
"""

import sys

import pytest

from tests.sm90 import compile_in_subprocess, print_compiled

# Compiling every kernel for sm_90 takes a minute or more; the quick tier leaves it to CI (README, "Tests").
pytestmark = pytest.mark.slow


def _specs(full: bool):
    from seqmix.kernels.gated_linear_attention import triton as kern

    for dt in ("bf16", "fp32"):
        prec = "tf32" if dt == "bf16" else "ieee"
        dims = (64, 128, 256) if full else ((128,) if dt == "bf16" else (64,))
        for d in dims:
            io = {n: f"*{dt}" for n in ("q", "k", "v", "h", "dh", "do", "o", "dq", "dk", "dv")}
            f32 = {n: "*fp32" for n in ("g", "gcum", "A", "dA", "dgcum", "h0", "ht", "dht", "dh0")}
            index = {"chunk_index": "*i32", "cu_seqlens": "*i64", "chunk_offsets": "*i64", "scale": "fp32"}
            shape = {"H": 16, "K": d, "V": d, "BT": kern.CHUNK, "BC": kern.SUB, "PREC": prec,
                     **kern.key_value_blocks(d, d)}
            flags = {"HAS_H0": True, "STORE_HT": True, "HAS_DHT": True, "STORE_DH0": True}
            for kernel in kern.KERNELS:
                for cfg in kernel.configs if full else kernel.configs[:1]:
                    args = {**io, **f32, **index, **shape, **flags, **cfg.kwargs}
                    yield kernel, args, cfg, {"dtype": dt, "d": d}


def test_kernels_compile_for_sm90():
    results = compile_in_subprocess("tests.kernels.gated_linear_attention.test_sm90_compile")
    names = {r["kernel"] for r in results}
    assert len(names) == 8, names


if __name__ == "__main__":
    print_compiled(_specs(full="--all" in sys.argv))
