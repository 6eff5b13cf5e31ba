"""Every Triton kernel of the segment ops compiles for sm_90, in bf16 and fp32 (D = 1024), without spilling.

Run as a module it compiles and prints JSON (registers, stack, spills per kernel); the test runs it in a
subprocess with Triton's interpreter off (see tests/sm90.py).
"""

from types import SimpleNamespace

import pytest
import torch

from tests.sm90 import compile_in_subprocess, print_compiled

# Compiling every kernel for sm_90 takes a minute or more; the quick tier leaves it to CI (README, "Tests").
pytestmark = pytest.mark.slow


def _specs():
    from seqmix.kernels.pooling import triton as kern

    for dt, dtype, prec in (("bf16", torch.bfloat16, "tf32"), ("fp32", torch.float32, "ieee")):
        args = {"x": f"*{dt}", "y": f"*{dt}", "out": f"*{dt}", "dout": f"*{dt}", "dx": f"*{dt}", "dpooled": f"*{dt}",
                "pooled": f"*{dt}", "bh": "*fp32", "counts": "*fp32", "dy": "*fp32", "db_part": "*fp32",
                "c": "*i64", "cu_seqlens": "*i64", "chunk_index": "*i32", "S": "i64", "L": "i64",
                "D": 1024, "BT": kern.BT, "BD": kern._block(1024, dtype), "PREC": prec}
        for kernel in kern.KERNELS:
            # num_stages: Triton's default, which the launchers use
            yield kernel, args, SimpleNamespace(num_warps=kern.NUM_WARPS, num_stages=3), {"dtype": dt}


def test_kernels_compile_for_sm90():
    from seqmix.kernels.pooling import triton as kern

    results = compile_in_subprocess("tests.kernels.pooling.test_sm90_compile")
    assert {r["kernel"] for r in results} == {k.__name__ for k in kern.KERNELS}
    assert all(r["spill_stores"] == r["spill_loads"] == 0 and r["stack"] <= 128 for r in results), results


if __name__ == "__main__":
    print_compiled(_specs())
