"""The conv family's CUDA kernels (csrc/).

Everywhere: every ``.cu`` compiles for sm_90 with nvcc (the kernels need only the CUDA runtime
headers), the torch.library ops have working fake implementations (what torch.compile traces),
and ``backend="cuda"`` says why it cannot run. On a GPU with the extension built
(benchmarks/gpu_check.sh): CUDA against the float64 reference, outputs and gradients, and
torch.compile through the ops.

The binding (csrc/*.cpp, torch headers, ~40 s per file) is compile-checked by hand:
``python -m tests.kernels.conv.test_cuda --binding``.
"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

from seqmix.kernels import BackendUnavailable, causal_conv1d, causal_conv1d_update, dynamic_conv, light_conv
from seqmix.kernels.backend import why_unavailable
from tests.helpers import KERNEL_DTYPES, TOL, assert_rel

CSRC = Path(__file__).resolve().parents[3] / "csrc"
NVCC = shutil.which("nvcc")
CUDA_REASON = why_unavailable("cuda", torch.device("cuda")) if torch.cuda.is_available() else "no GPU"
needs_cuda = pytest.mark.skipif(CUDA_REASON is not None, reason=f"CUDA backend unavailable: {CUDA_REASON}")


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.cu")))
def test_cuda_source_compiles_for_sm90(source):
    with tempfile.TemporaryDirectory() as tmp:
        obj = Path(tmp) / "kernel.o"
        proc = subprocess.run(
            [NVCC, "-arch=sm_90", "-std=c++17", "-O3", "--use_fast_math", "-c", str(CSRC / source), "-o", str(obj)],
            capture_output=True, text=True, timeout=300, check=False,
        )
        assert proc.returncode == 0, f"nvcc failed on {source}:\n{proc.stderr[-4000:]}"
        assert obj.stat().st_size > 0


def test_cuda_sources_are_found():
    assert {"causal_conv1d.cu", "dynamic_conv.cu"} <= {p.name for p in CSRC.glob("*.cu")}


def test_fake_implementations_give_the_output_shapes():
    """What torch.compile sees of each op, without the extension."""
    ops = torch.ops.seqmix
    with FakeTensorMode():
        x, w, cu = torch.empty(10, 8), torch.empty(8, 4), torch.zeros(3, dtype=torch.int64)
        out, ht = ops.causal_conv1d_fwd(x, w, None, None, cu, True, True)
        assert (out.shape, ht.shape, ht.dtype) == ((10, 8), (2, 8, 3), torch.float32)
        dx, dw, db, dh0 = ops.causal_conv1d_bwd(x, w, w[:, 0], None, cu, True, x, None, True)
        assert (dx.shape, dw.shape, db.shape, dh0.shape) == ((10, 8), (8, 4), (8,), (2, 8, 3))
        assert ops.causal_conv1d_update(torch.empty(2, 3, 8), torch.empty(2, 8, 3), w, None, True).shape == (2, 3, 8)
        out, lse = ops.dynamic_conv_fwd(x, torch.empty(10, 2, 5), cu, 2, 4, True, 7, 100, 1.5)
        assert (out.shape, lse.shape) == ((10, 8), (10, 2))
        dx, dw = ops.dynamic_conv_bwd(x, torch.empty(2, 5), lse, x, cu, 2, 4, True, 7, 100, 1.5)
        assert (dx.shape, dw.shape) == ((10, 8), (2, 5))


@pytest.mark.skipif(CUDA_REASON is None, reason="the CUDA backend is available here")
def test_cuda_backend_says_why_it_is_unavailable():
    x = torch.randn(1, 6, 4)
    calls = [
        lambda: causal_conv1d(x, torch.randn(4, 3), backend="cuda"),
        lambda: causal_conv1d_update(x[:, 0], torch.zeros(1, 4, 2), torch.randn(4, 3), backend="cuda"),
        lambda: light_conv(x, torch.randn(2, 3), backend="cuda"),
        lambda: dynamic_conv(x, torch.randn(1, 6, 2, 3), backend="cuda"),
    ]
    for call in calls:
        with pytest.raises(BackendUnavailable, match="backend 'cuda' cannot serve this call: .*CUDA"):
            call()


def _grads(out, extra, inputs, seed):
    """Gradients of a random projection of ``out`` (and ``extra``) with respect to ``inputs``."""
    g = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=g).to(out)).sum()
    if extra is not None:
        loss = loss + (extra * torch.randn(extra.shape, generator=g).to(extra)).sum()
    return torch.autograd.grad(loss, inputs)


@needs_cuda
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@settings(max_examples=30)
@given(T=st.integers(1, 300), D=st.sampled_from([64, 200, 4096]), W=st.integers(1, 8), packed=st.booleans(),
       silu=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_causal_conv1d_cuda_matches_reference(dtype, T, D, W, packed, silu, seed):
    g = torch.Generator().manual_seed(seed)
    B = 1 if packed else 2
    cu = torch.tensor([0, T // 3, T // 3, T]) if packed else None
    n = 3 if packed else B
    x, w, b = torch.randn(B, T, D, generator=g), torch.randn(D, W, generator=g) / W**0.5, torch.randn(D, generator=g)
    h0 = torch.randn(n, D, W - 1, generator=g)
    runs = []
    for backend, dt in (("cuda", dtype), ("reference", torch.float64)):
        ins = [t.to("cuda", dt if t is not h0 or dt == torch.float64 else torch.float32).requires_grad_()
               for t in (x, w, b, h0)]
        out, final = causal_conv1d(*ins[:3], activation="silu" if silu else None, initial_state=ins[3],
                                   output_final_state=True, cu_seqlens=None if cu is None else cu.cuda(),
                                   backend=backend)
        runs.append((out, final, *_grads(out, final, ins, seed)))
    for name, a, ref in zip(("output", "final", "dx", "dweight", "dbias", "dh0"), *runs, strict=True):
        assert_rel(a, ref, TOL[dtype], name)


@needs_cuda
def test_causal_conv1d_update_cuda_matches_reference():
    g = torch.Generator().manual_seed(0)
    x, w, b, h0 = (torch.randn(*s, generator=g) for s in ((3, 2, 300), (300, 4), (300,), (3, 300, 3)))
    outs = []
    for backend, dt in (("cuda", torch.float32), ("reference", torch.float64)):
        state = h0.to("cuda", dt, copy=True)
        outs.append((causal_conv1d_update(x.to("cuda", dt), state, w.to("cuda", dt), b.to("cuda", dt), "silu",
                                          backend=backend), state))
    assert_rel(outs[0][0], outs[1][0], TOL[torch.float32], "output")
    assert_rel(outs[0][1], outs[1][1], TOL[torch.float32], "state")


@needs_cuda
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@settings(max_examples=30)
@given(T=st.integers(1, 300), H=st.integers(1, 16), R=st.sampled_from([1, 8, 64]), K=st.sampled_from([1, 3, 4, 31]),
       dynamic=st.booleans(), same=st.booleans(), softmax=st.booleans(), drop=st.sampled_from([0.0, 0.2]),
       packed=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_dynamic_conv_cuda_matches_reference(dtype, T, H, R, K, dynamic, same, softmax, drop, packed, seed):
    K += same and K % 2 == 0
    g = torch.Generator().manual_seed(seed)
    B = 1 if packed else 2
    cu = torch.tensor([0, T // 2, T]).cuda() if packed else None
    x, w = torch.randn(B, T, H * R, generator=g), torch.randn(*((B, T) if dynamic else ()), H, K, generator=g)
    op = dynamic_conv if dynamic else light_conv
    runs = []
    for backend, dt in (("cuda", dtype), ("reference", torch.float64)):
        ins = [t.to("cuda", dt).requires_grad_() for t in (x, w)]
        out = op(*ins, padding="same" if same else "causal", weight_softmax=softmax, dropconnect=drop, seed=seed,
                 cu_seqlens=cu, backend=backend)
        runs.append((out, *_grads(out, None, ins, seed)))
    for name, a, ref in zip(("output", "dx", "dweight"), *runs, strict=True):
        assert_rel(a, ref, TOL[dtype], name)


@needs_cuda
def test_torch_compile_traces_through_the_cuda_ops():
    """The ops in one graph (fullgraph: no break at the extension call), forward and backward."""
    x = torch.randn(64, 32, device="cuda", requires_grad=True)
    w = torch.randn(64, 4, 7, device="cuda", requires_grad=True)
    cw = torch.randn(32, 4, device="cuda", requires_grad=True)
    cu = torch.tensor([0, 40, 64], device="cuda")

    def f(x, w, cw):
        y, _ = torch.ops.seqmix.dynamic_conv_fwd(x, w, cu, 4, 6, True, 123, 1000, 1.25)
        return torch.ops.seqmix.causal_conv1d_fwd(y, cw, None, None, cu, True, False)[0]

    eager = f(x, w, cw)
    compiled = torch.compile(f, fullgraph=True)(x, w, cw)
    assert_rel(compiled, eager, 1e-6, "compiled output")
    for a, b in zip(_grads(compiled, None, (x, w, cw), 0), _grads(eager, None, (x, w, cw), 0), strict=True):
        assert_rel(a, b, 1e-6, "compiled gradient")


def _check_binding():
    """Compile the torch binding of csrc/ with the host compiler (syntax only; a few minutes)."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    flags = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    for src in sorted(CSRC.glob("*.cpp")):
        cmd = ["c++", "-std=c++20", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=_C", "-DSEQMIX_CUDA_ARCHS=90", *flags, str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        errors = [line for line in proc.stderr.splitlines() if "error" in line]
        print(f"{src.name}: {'ok' if proc.returncode == 0 else 'FAILED'}", *errors, sep="\n  ")


if __name__ == "__main__" and "--binding" in sys.argv:
    _check_binding()
