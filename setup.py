"""Build of seqmix.

Pure Python unless a CUDA build is possible: with a CUDA build of torch
importable at build time (``pip install --no-build-isolation``), a CUDA
toolkit, and an architecture to build for (``TORCH_CUDA_ARCH_LIST`` or the
local GPU), ``csrc/`` compiles into ``seqmix._C``. Every probe is guarded:
whatever is missing, the install goes on without the extension and the ops
fall back to their Triton or reference backends. ``SEQMIX_SKIP_CUDA_BUILD=1``
turns the build off.
"""

import os
import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def _arch_codes(arch_list: str) -> list[int]:
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0a", "9.0+PTX", ...) as compute capabilities 80, 90, ..."""
    codes = []
    for arch in re.split(r"[;,\s]+", arch_list.strip()):
        major, _, minor = arch.split("+")[0].rstrip("a").partition(".")
        if major:
            codes.append(int(major) * 10 + int(minor or 0))
    return codes


def _cuda_build_plan():
    """(ext_modules, cmdclass) for the CUDA extension, or ([], {}) with the reason printed."""
    if os.environ.get("SEQMIX_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return [], {}, "SEQMIX_SKIP_CUDA_BUILD is set"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}, "torch is not importable at build time (use --no-build-isolation to build the extension)"
    if torch.version.cuda is None:
        return [], {}, "this torch is a CPU build"
    if CUDA_HOME is None:
        return [], {}, "no CUDA toolkit found (nvcc / CUDA_HOME)"
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not archs:
        try:
            major, minor = torch.cuda.get_device_capability()
        except (RuntimeError, AssertionError):
            return [], {}, "no GPU visible and TORCH_CUDA_ARCH_LIST is not set"
        archs = f"{major}.{minor}"
        # torch's build reads the variable; set it so only the local architecture is compiled.
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    sources = sorted(str(p.relative_to(ROOT)) for pattern in ("*.cpp", "*.cu") for p in (ROOT / "csrc").glob(pattern))
    ext = CUDAExtension(
        name="seqmix._C",
        sources=sources,
        define_macros=[("SEQMIX_CUDA_ARCHS", ",".join(str(c) for c in _arch_codes(archs)))],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
    )
    return [ext], {"build_ext": BuildExtension}, None


ext_modules, cmdclass, skipped = _cuda_build_plan()
if skipped:
    print(f"seqmix: building without the CUDA extension: {skipped}")

setup(
    name="seqmix",
    version="0.1.0",
    description="Fused sequence-mixer kernels (delta rule, GLA, SSMs, dynamic convolution, pooling, recurrent depth)",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["seqmix", "seqmix.*"]),
    # The C++ CPU kernels are compiled on first use (seqmix/kernels/cpu.py): their sources ship with the package.
    package_data={"seqmix": ["configs/*.yaml", "kernels/*.cpp", "kernels/*.h", "kernels/*/*.cpp"]},
    python_requires=">=3.10",
    # Not Triton: PyTorch's CUDA wheels for Linux bring it, and a CPU install never imports it (every backend but
    # Triton's runs without it: seqmix/kernels/triton_limits.py; tests/kernels/test_backend.py runs the mixers
    # with it blocked), while Triton 3.9 is ~1 GB installed. The "triton" extra adds it (its interpreter on a CPU).
    install_requires=["torch>=2.4", "numpy", "pyyaml", "safetensors", "tqdm", "matplotlib"],
    entry_points={"console_scripts": ["seqmix-train = seqmix.train:main", "seqmix-bench = seqmix.bench:main"]},
    extras_require={
        # The tests run the Triton kernels in Triton's interpreter, which turns one-element arrays into ints,
        # which NumPy 2.4 refuses. pytest-xdist: the README's test command runs the suite in one process per core.
        "test": ["pytest>=7", "pytest-xdist>=3", "hypothesis>=6.100", "numpy<2.4", "transformers>=5", "triton>=3.2"],
        "triton": ["triton>=3.2"],
        # seqmix.hf: the models as transformers models (Auto classes, generate, pipeline, lm-evaluation-harness).
        "hf": ["transformers>=5"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
