"""The add_rms_norm kernels compile for sm_90 (bf16 at D = 4096, where a tile is one row, and fp32 at
D = 320), with no spills. Run as a module it compiles and prints JSON (registers, stack per kernel);
the test runs it in a subprocess with Triton's interpreter off (see tests/sm90.py). With 4096 elements
per tile the fp32 backward at D = 320 used 255 registers and 72 bytes of stack; 2048 keeps it at ~150."""

import pytest
import triton

from tests.sm90 import compile_in_subprocess, print_compiled

# Compiling every kernel for sm_90 takes a minute or more; the quick tier leaves it to CI (README, "Tests").
pytestmark = pytest.mark.slow


def _specs():
    from seqmix.kernels.norm import triton as kern

    for dt, D in (("bf16", 4096), ("fp32", 320)):
        BM, BD, warps = kern._tile(D)
        args = {
            "x": f"*{dt}", "residual": f"*{dt}", "weight": "*fp32", "normed": f"*{dt}", "new_residual": f"*{dt}",
            "rstd": "*fp32", "h": f"*{dt}", "dnormed": f"*{dt}", "dnew_residual": f"*{dt}", "dh": f"*{dt}",
            "dweight_part": "*fp32", "M": "i32", "D": "i32", "eps": "fp32", "rows_per_program": "i32",
            "HAS_RESIDUAL": True, "HAS_DNORMED": True, "HAS_DRESIDUAL": True, "BM": BM, "BD": BD,
        }
        for kernel in kern.KERNELS:
            yield kernel, args, triton.Config({}, num_warps=warps), {"dtype": dt, "D": D}


def test_kernels_compile_for_sm90():
    results = compile_in_subprocess("tests.kernels.norm.test_sm90_compile")
    assert {r["kernel"] for r in results} == {"add_rms_norm_fwd_kernel", "add_rms_norm_bwd_kernel"}
    assert all(r["stack"] == r["spill_stores"] == r["spill_loads"] == 0 for r in results), f"spills: {results}"


if __name__ == "__main__":
    print_compiled(_specs())
