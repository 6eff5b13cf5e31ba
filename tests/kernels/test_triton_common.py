"""seqmix/kernels/triton_common.py's autotune: every autotuned kernel keeps its timings on disk where Triton can."""

import inspect
import pathlib

import pytest
import triton
from triton.runtime.autotuner import Autotuner

import seqmix
from seqmix.kernels import triton_common
from tests.helpers import ON_GPU

CACHES = "cache_results" in inspect.signature(triton.autotune).parameters


def test_autotune_asks_triton_to_cache_and_passes_the_rest(monkeypatch):
    calls = []
    monkeypatch.setattr(triton, "autotune", lambda **kwargs: calls.append(kwargs))
    configs = [triton.Config({"B": 32}, num_warps=4)]
    triton_common.autotune(configs=configs, key=["D"], restore_value=["state"])
    assert calls == [{"configs": configs, "key": ["D"], "restore_value": ["state"],
                      **({"cache_results": True} if CACHES else {})}]


def test_every_autotuned_kernel_goes_through_it():
    package = pathlib.Path(seqmix.__file__).parent
    direct = [str(p.relative_to(package)) for p in package.rglob("*.py") if "@triton.autotune(" in p.read_text()]
    assert direct == []


@pytest.mark.skipif(not ON_GPU or not CACHES, reason="the interpreter never caches (nor benchmarks) configs")
def test_the_kernels_cache_their_timings():
    from seqmix.kernels.gated_linear_attention import triton as gla

    kernels = [k for k in vars(gla).values() if isinstance(k, Autotuner)]
    assert kernels and all(k.cache_results for k in kernels)
