"""Every Triton kernel of the conv family compiles for sm_90: the causal conv (bf16 and fp32, widths
4 and 31) and LightConv / DynamicConv (bf16 DynamicConv K=31 with softmax and DropConnect, fp32
LightConv K=3 without).

Run as a module it compiles and prints JSON (registers, stack per kernel);
``--all`` compiles every autotune config. The test runs it in a subprocess
with Triton's interpreter off (see tests/sm90.py).
"""

import sys

import pytest

from tests.sm90 import compile_in_subprocess, print_compiled

# Compiling every kernel for sm_90 takes a minute or more; the quick tier leaves it to CI (README, "Tests").
pytestmark = pytest.mark.slow


def _specs(full: bool):
    yield from _causal_specs(full)
    yield from _dynamic_specs(full)


def _dynamic_specs(full: bool):
    from seqmix.kernels.conv import dynamic_triton as kern

    for dt, K, per_token, extras in (("bf16", 31, True, True), ("fp32", 3, False, False)):
        args = {
            "x": f"*{dt}", "weight": f"*{dt}", "out": f"*{dt}", "dout": f"*{dt}", "dx": f"*{dt}",
            "dw": f"*{dt}" if per_token else "*fp32", "lse_out": "*fp32", "lse": "*fp32",
            "chunk_index": "*i32", "cu_seqlens": "*i64", "seed_lo": "i64", "threshold": "i32", "scale": "fp32",
            "H": 16, "R": 64, "K": K, "P": K - 1, "ROW": 16 * K if per_token else 0, "BT": kern.CHUNK, "BK": 32 if K > 4 else 4,
            "SOFTMAX": extras, "DROP": extras,
        }
        for kernel in kern.KERNELS:
            for cfg in kernel.configs if full else kernel.configs[:1]:
                yield kernel, {**args, **cfg.kwargs}, cfg, {"dtype": dt, "K": K}


def _causal_specs(full: bool):
    from seqmix.kernels.conv import triton as kern

    for dt, W in (("bf16", 4), ("bf16", 31), ("fp32", 4)):
        args = {
            "x": f"*{dt}", "weight": f"*{dt}", "bias": f"*{dt}", "out": f"*{dt}", "dout": f"*{dt}", "dx": f"*{dt}",
            "h0": "*fp32", "ht": "*fp32", "dht": "*fp32", "dh0": "*fp32", "dz": "*fp32", "dw_part": "*fp32",
            "db_part": "*fp32", "chunk_index": "*i32", "cu_seqlens": "*i64", "state": "*fp32", "T": "i32",
            "D": 4096, "W": W, "BT": kern.CHUNK, "HAS_BIAS": True, "HAS_H0": True, "HAS_DHT": True, "SILU": True,
        }
        for kernel in kern.KERNELS:
            for cfg in kernel.configs if full else kernel.configs[:1]:
                yield kernel, {**args, **cfg.kwargs}, cfg, {"dtype": dt, "W": W}


def test_kernels_compile_for_sm90():
    results = compile_in_subprocess("tests.kernels.conv.test_sm90_compile")
    assert {r["kernel"] for r in results} == {
        "causal_conv1d_output_fwd_kernel", "causal_conv1d_final_state_fwd_kernel", "causal_conv1d_dz_bwd_kernel",
        "causal_conv1d_dx_bwd_kernel", "causal_conv1d_dh0_bwd_kernel", "causal_conv1d_update_fwd_kernel",
        "dynamic_conv_output_fwd_kernel", "dynamic_conv_dxdw_bwd_kernel",
    }


if __name__ == "__main__":
    print_compiled(_specs(full="--all" in sys.argv))
