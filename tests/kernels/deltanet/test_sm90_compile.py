"""Every Triton kernel of the delta rule compiles for sm_90: bf16 at head dims 128 and 256, fp32 at 64;
the gated delta rule's variants (USE_G) at bf16 128 and fp32 64.

Run as a module it compiles and prints JSON (registers, stack, spills per
kernel); ``--gated`` compiles the gated variants instead; ``--all`` compiles
every autotune config at head dims 64, 128 and 256 in both dtypes (minutes). The test runs the short set in a subprocess
with Triton's interpreter off.
"""

import sys

import pytest

from tests.sm90 import compile_in_subprocess, print_compiled

# Compiling every kernel for sm_90 takes a minute or more; the quick tier leaves it to CI (README, "Tests").
pytestmark = pytest.mark.slow


def _specs(full: bool, gated: bool):
    from seqmix.kernels.deltanet import triton as kern

    for dt in ("bf16", "fp32"):
        prec = "tf32" if dt == "bf16" else "ieee"
        dims = (64, 128, 256) if full else ((128,) if gated else (128, 256)) if dt == "bf16" else (64,)
        for d in dims:
            io = {n: f"*{dt}" for n in ("q", "k", "v", "beta", "w", "u", "v_new", "h", "dh", "do", "o",
                                        "dq", "dk", "dv", "dbeta")}
            f32 = {n: "*fp32" for n in ("m_wy", "h0", "ht", "dht", "dh0", "dv_local", "du", "dk_other", "dw",
                                        "gcum", "g", "dgcum")}
            index = {"chunk_index": "*i32", "cu_seqlens": "*i64", "chunk_offsets": "*i64", "scale": "fp32"}
            shape = {"H": 16, "K": d, "V": d, "BT": kern.CHUNK, "PREC": prec, **kern.key_value_blocks(d, d)}
            flags = {"HAS_H0": True, "STORE_HT": True, "HAS_DHT": True, "STORE_DH0": True, "INVERT": True}
            for kernel in kern.KERNELS:
                for cfg in kernel.configs if full else kernel.configs[:1]:
                    args = {**io, **f32, **index, **shape, **flags, "USE_G": gated, **cfg.kwargs}
                    yield kernel, args, cfg, {"dtype": dt, "d": d, "gated": gated}
    if gated:
        yield from _cumsum_specs(full)


def _cumsum_specs(full: bool):
    """The in-chunk cumulative sum of the log decays (forward) and of their gradients (reverse)."""
    from seqmix.kernels import triton_common

    kernel = triton_common.chunk_local_cumsum_fwd_kernel
    for reverse in (False, True):
        for cfg in kernel.configs if full else kernel.configs[:1]:
            args = {"x": "*fp32", "out": "*fp32", "chunk_index": "*i32", "cu_seqlens": "*i64",
                    "H": 16, "D": 1, "BT": 64, "BD": 1, "REVERSE": reverse, **cfg.kwargs}
            yield kernel, args, cfg, {"dtype": "fp32", "d": 1, "gated": True}


@pytest.mark.parametrize("variant", ["plain", "gated"])
def test_kernels_compile_for_sm90(variant):
    args = ("--gated",) if variant == "gated" else ()
    results = compile_in_subprocess("tests.kernels.deltanet.test_sm90_compile", args=args)
    assert results, "no kernel was compiled"
    names = {r["kernel"] for r in results}
    assert len(names) >= 7, names
    assert {r["gated"] for r in results} == {variant == "gated"}


if __name__ == "__main__":
    print_compiled(_specs(full="--all" in sys.argv, gated="--gated" in sys.argv))
