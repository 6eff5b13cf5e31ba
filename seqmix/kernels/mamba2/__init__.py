"""Mamba-2's SSD (state-space duality): public op, argument checks, backend dispatch and the
kernels as torch.library ops (seqmix/kernels/op.py runs them). The math: docs/math/mamba2.md.

The subpackage is named after the family (Mamba-2), not the op: see docs/design.md, "Layout and names".
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from seqmix.kernels import triton_limits
from seqmix.kernels.backend import LazyModule, select_backend
from seqmix.kernels.checks import check_eps, check_negative, check_same_dtype, check_sequences, check_tensor
from seqmix.kernels.conv import causal_conv1d
from seqmix.kernels.conv import cpu as conv_cpu
from seqmix.kernels.library import custom_op
from seqmix.kernels.mamba2 import cpu as cpu_kernels
from seqmix.kernels.mamba2.reference import ssd_chunked, ssd_recurrent
from seqmix.kernels.norm import rms_norm
from seqmix.kernels.op import (
    FusedOp,
    as_input_grads,
    chunking_of,
    fake_outputs,
    no_tokens_result,
    nothing,
    or_empty,
    register_autograd,
    run_fused,
    wants_grad,
)
from seqmix.kernels.triton_limits import SSD_CHUNK

__all__ = ["ssd", "ssd_chunked", "ssd_recurrent", "ssd_xbc", "ssd_zxbcdt"]

kernels = LazyModule("seqmix.kernels.mamba2.triton")


def check_dt_limit(dt_limit) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in dt_limit)
    except (TypeError, ValueError):
        raise ValueError(f"dt_limit must be a pair (lo, hi) of numbers, got {dt_limit!r}") from None
    if not 0.0 <= lo <= hi:
        raise ValueError(f"dt_limit must satisfy 0 <= lo <= hi, got {dt_limit!r}")
    return lo, hi


def _check_inputs(x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens):
    check_tensor("x", x, (None, None, None, None), dims="[B, T, H, P]")
    Bsz, T, H, P = x.shape
    check_tensor("dt", dt, (Bsz, T, H), dims="[B, T, H]", like=x)
    check_tensor("A", A, (H,), dims="[H]", like=x)
    check_tensor("B", B, (Bsz, T, None, None), dims="[B, T, G, N]", like=x)
    G, N = B.shape[2:]
    check_tensor("C", C, (Bsz, T, G, N), dims="[B, T, G, N]", like=x)
    if P == 0 or N == 0 or G == 0:
        raise ValueError(f"head dim P, state dim N and groups G must be positive, got P={P}, N={N}, G={G}")
    if H % G:
        raise ValueError(f"the number of groups G={G} of B and C must divide the number of heads H={H}")
    check_same_dtype(("x", "dt", "B", "C"), (x, dt, B, C))
    for name, t, shape, dims in (("D", D, (H,), "[H]"), ("z", z, (Bsz, T, H, P), "[B, T, H, P]"),
                                 ("dt_bias", dt_bias, (H,), "[H]")):
        if t is not None:
            check_tensor(name, t, shape, dims=dims, like=x)
    check_negative("A", A)
    n = check_sequences(cu_seqlens, initial_state, (H, P, N), dims="[N, H, P, N]", like=x)
    return n


def _outputs_like(x, B, cu_seqlens, store_final):
    L, H, P = x.shape
    return fake_outputs(x, (L, H, P), (cu_seqlens.shape[0] - 1, H, P, B.shape[-1]), store_final)


# The kernels as torch.library ops (the protocol of seqmix/kernels/op.py): x, z [L, H, P], dt [L, H],
# B, C [L, G, N] packed; A, D, dt_bias [H]; h0 [N, H, P, N] float32; dt' = clamp(softplus?(dt + dt_bias),
# lo, hi).

@custom_op("seqmix::ssd_chunk_fwd", mutates_args=())
def _chunk_fwd(x: Tensor, dt: Tensor, B: Tensor, C: Tensor, z: Tensor | None, A: Tensor, D: Tensor | None,
               dt_bias: Tensor | None, h0: Tensor | None, cu_seqlens: Tensor, chunk_index: Tensor,
               chunk_offsets: Tensor, softplus: bool, lo: float, hi: float, store_final: bool
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (out, final state, and for the backward: dt' and the in-chunk cumulative log decays
    [L, H] float32, the ungated y [L, H, P] when z is given)."""
    chunking = chunking_of(cu_seqlens, chunk_index, chunk_offsets, SSD_CHUNK)
    out, ht, dtp, lcum, y = kernels.chunk_ssd_fwd(x, dt, A, B, C, D, z, dt_bias, h0,
                                                  kernels.DtConfig(softplus, (lo, hi)), chunking, store_final)
    return out, or_empty(ht, x), dtp, lcum, or_empty(y, x)


@_chunk_fwd.register_fake
def _(x, dt, B, C, z, A, D, dt_bias, h0, cu_seqlens, chunk_index, chunk_offsets, softplus, lo, hi, store_final):
    f32 = {"dtype": torch.float32}
    y = nothing(x) if z is None else torch.empty_like(x)
    return *_outputs_like(x, B, cu_seqlens, store_final), dt.new_empty(dt.shape, **f32), dt.new_empty(
        dt.shape, **f32), y


@custom_op("seqmix::ssd_chunk_bwd", mutates_args=())
def _chunk_bwd(x: Tensor, dt: Tensor, B: Tensor, C: Tensor, z: Tensor | None, A: Tensor, D: Tensor | None,
               dt_bias: Tensor | None, h0: Tensor | None, cu_seqlens: Tensor, chunk_index: Tensor,
               chunk_offsets: Tensor, dtp: Tensor, lcum: Tensor, y: Tensor, softplus: bool, lo: float, hi: float,
               store_final: bool, dout: Tensor, dht: Tensor | None, needs: list[bool]
               ) -> list[Tensor]:
    chunking = chunking_of(cu_seqlens, chunk_index, chunk_offsets, SSD_CHUNK)
    dz, dy = None, dout
    if z is not None:
        # out = y silu(z): the gate's backward is elementwise, left to PyTorch.
        zf, sig = z.float(), torch.sigmoid(z.float())
        dz = dout.float() * y.float() * sig * (1 + zf * (1 - sig))
        dy = (dout.float() * zf * sig).to(x.dtype)
    dx, ddt, dA, dB, dC, dD, ddt_bias, dh0 = kernels.chunk_ssd_bwd(
        x, dt, A, B, C, D, dt_bias, h0, dtp, lcum, kernels.DtConfig(softplus, (lo, hi)), chunking, dy, dht,
        h0 is not None and needs[8],
    )
    inputs = (x, dt, B, C, z, A, D, dt_bias, h0, cu_seqlens, chunk_index, chunk_offsets)
    return as_input_grads((dx, ddt, dB, dC, dz, dA, dD, ddt_bias, dh0, None, None, None), inputs, needs, x)


register_autograd(_chunk_fwd, _chunk_bwd, num_inputs=12)


@custom_op("seqmix::ssd_recurrent_fwd", mutates_args=())
def _recurrent_fwd(x: Tensor, dt: Tensor, B: Tensor, C: Tensor, z: Tensor | None, A: Tensor, D: Tensor | None,
                   dt_bias: Tensor | None, h0: Tensor | None, cu_seqlens: Tensor, chunk_index: Tensor,
                   chunk_offsets: Tensor, softplus: bool, lo: float, hi: float, store_final: bool
                   ) -> tuple[Tensor, Tensor]:
    out, ht = kernels.recurrent_ssd_fwd(x, dt, A, B, C, D, z, dt_bias, h0, kernels.DtConfig(softplus, (lo, hi)),
                                        cu_seqlens, store_final)
    return out, or_empty(ht, x)


@_recurrent_fwd.register_fake
def _(x, dt, B, C, z, A, D, dt_bias, h0, cu_seqlens, chunk_index, chunk_offsets, softplus, lo, hi, store_final):
    return _outputs_like(x, B, cu_seqlens, store_final)


FUSED = FusedOp(SSD_CHUNK, _chunk_fwd, _recurrent_fwd)


def ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mamba-2's SSD: per head, ``h_t = exp(dt'_t A) h_{t-1} + dt'_t x_t B_t^T``, ``y_t = h_t C_t + D x_t``.

    ``dt' = clamp(softplus(dt + dt_bias), *dt_limit)`` (bias and softplus optional); with z,
    ``y *= silu(z)``. Head h reads group ``h // (H // G)`` of B and C.

    Args:
        x: [B, T, H, P] inputs.
        dt: [B, T, H] step sizes (before bias, softplus and clamp).
        A: [H] negative state decay rates (``-exp(A_log)``).
        B: [B, T, G, N] input projections of the state; G must divide H.
        C: [B, T, G, N] output projections of the state.
        D: [H] skip connection, or None.
        z: [B, T, H, P] gate, or None.
        dt_bias: [H] added to dt, or None.
        dt_softplus: apply softplus to dt + dt_bias.
        dt_limit: (lo, hi) with 0 <= lo <= hi: dt' is clamped to it (always, so dt' >= 0).
        initial_state: [N, H, P, N] state before the first token of each sequence (N = B,
            or the number of packed sequences); float32 by convention.
        output_final_state: also return the state after the last token.
        cu_seqlens: [N+1] int32/int64 boundaries of sequences packed as ``[1, sum(T_i), ...]``;
            states reset at every boundary.
        backend: None (automatic: Triton on CUDA tensors; on CPU tensors the C++ kernels once
            compiled (``python -m seqmix.kernels.build``), else Triton under its interpreter, else the
            reference), ``"reference"``, ``"triton"`` or ``"cpu"`` (float32 and float64, builds the
            C++ kernels; their final state and gradients in the inputs' dtype).

    Returns:
        y: [B, T, H, P] in x's dtype.
        final_state: [N, H, P, N] float32 (float64 for float64 inputs), or None.
    """
    n = _check_inputs(x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens)
    lo, hi = check_dt_limit(dt_limit)
    return _run(_select(x, B, backend), n, x, dt, A, B, C, D, z, dt_bias, dt_softplus, lo, hi, initial_state,
                output_final_state, cu_seqlens)


def _select(x, B, backend):
    # The C++ kernels only once compiled (build_cpu=False): the chunked reference is fast enough that a short
    # run should not wait for the compile; backend="cpu" builds them.
    return select_backend("ssd", backend, x.device, ("cpu", "triton", "reference"),
                          {"triton": triton_limits.unsupported("x, dt, B, C", x.dtype, "head dim and state dim",
                                                               P=x.shape[-1], N=B.shape[-1]),
                           "cpu": cpu_kernels.unsupported(x.dtype)},
                          build_cpu=False)


def _run(name, n, x, dt, A, B, C, D, z, dt_bias, dt_softplus, lo, hi, initial_state, output_final_state,
         cu_seqlens):
    """:func:`ssd` on checked inputs with the backend ``name``."""
    Bsz, T, H, P = x.shape
    N = B.shape[-1]
    if Bsz * T == 0:
        return no_tokens_result((Bsz, T, H, P), (n, H, P, N), initial_state, output_final_state, x)
    if name == "cpu":  # the kernel computes in x's dtype: the parameters and the gate are cast to it
        params = [None if t is None else t.to(x.dtype) for t in (A, D, dt_bias)]
        return run_fused(cpu_kernels.FUSED, (x, dt, B, C, None if z is None else z.to(x.dtype)), params,
                         initial_state, (dt_softplus, lo, hi), output_final_state, cu_seqlens)
    if name == "triton":
        return run_fused(FUSED, (x, dt, B, C, z), (A, D, dt_bias), initial_state, (dt_softplus, lo, hi),
                         output_final_state, cu_seqlens)
    return ssd_chunked(x, dt, A, B, C, D, z, dt_bias, dt_softplus, (lo, hi), initial_state, output_final_state,
                       cu_seqlens)


def ssd_xbc(
    xbc: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    *,
    num_heads: int,
    n_groups: int,
    d_state: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
    conv_weight: torch.Tensor | None = None,
    conv_bias: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`ssd` on x, B and C given as the column blocks of one tensor, as Mamba-2's layer has them after its
    short conv: ``x = xbc[..., :H P]``, ``B = xbc[..., H P : H P + G N]``, ``C = xbc[..., H P + G N:]``; with
    ``conv_weight``, xbc is that conv's input and the blocks are those of
    ``causal_conv1d(xbc, conv_weight, conv_bias, activation="silu")[0]`` (zeros before each sequence).

    The results of ``ssd`` on those blocks. With autograd on the cpu backend the kernels read the blocks where
    they are and return xbc's gradient as one tensor, instead of three gradients that a split's backward
    concatenates and three packing copies (docs/design.md, "Sixth round: a C++ RMSNorm; SSD on the conv's output
    in place; GLA's and Mamba's decoding steps"); with the conv they compute it per chunk and its output and
    gradient are never written (docs/design.md, "Seventh round"). Otherwise it is the conv, then ``ssd`` on views
    of the blocks.

    Args:
        xbc: [B, T, H P + 2 G N].
        num_heads: H; n_groups: G (dividing H); d_state: N. The head dim P follows from xbc's width.
        conv_weight: [H P + 2 G N, W] taps of the depthwise causal conv (``weight[:, -1]`` on the current token),
            or None: xbc is then the conv's output.
        conv_bias: [H P + 2 G N] or None (only with conv_weight).
        norm_weight: [H P] or None: the output, gated, then RMS-normalised over each token's H P values,
            ``rms_norm(y.flatten(-2), norm_weight, eps=norm_eps)`` (Mamba-2's gated norm). On the cpu backend's
            training path with one group the kernels do it per token, and its pass over the output and its
            gradient goes (docs/design.md, "Twenty-seventh round"); elsewhere :func:`seqmix.kernels.norm.rms_norm`
            follows the op.
        norm_eps: the norm's epsilon.
        dt, A, D, z, dt_bias, dt_softplus, dt_limit, initial_state, output_final_state, cu_seqlens, backend:
            as :func:`ssd` (dt [B, T, H], z [B, T, H, P], initial state [N, H, P, N]).

    Returns:
        y: [B, T, H, P] in xbc's dtype.
        final_state: [N, H, P, N] float32 (float64 for float64 inputs), or None.
    """
    check_tensor("xbc", xbc, (None, None, None), dims="[B, T, H P + 2 G N]")
    H, G, N = _check_sizes(num_heads, n_groups, d_state)
    width = xbc.shape[-1]
    if width <= 2 * G * N or (width - 2 * G * N) % H:
        raise ValueError(f"xbc's last dim must be H P + 2 G N with P >= 1 (H={H}, G={G}, N={N}), got {width}")
    return _ssd_blocks(xbc, dt, A, z, None, H, G, N, D, dt_bias, dt_softplus, dt_limit, initial_state,
                       output_final_state, cu_seqlens, backend, conv_weight, conv_bias, norm_weight, norm_eps)


def ssd_zxbcdt(
    zxbcdt: torch.Tensor,
    A: torch.Tensor,
    *,
    num_heads: int,
    n_groups: int,
    d_state: int,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
    conv_weight: torch.Tensor | None = None,
    conv_bias: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`ssd_xbc` on Mamba-2's whole input projection, as one product of in_proj gives it (mamba_ssm's
    ``zxbcdt``): ``z = zxbcdt[..., :H P]``, ``xbc = zxbcdt[..., H P : 2 H P + 2 G N]``, ``dt = zxbcdt[..., -H:]``.

    The results of ``ssd_xbc(xbc, dt, A, z=z.unflatten(-1, (H, P)), ...)``. With autograd on the cpu backend the
    kernels read the five column blocks where they are and return zxbcdt's gradient as one tensor, so that the
    projection's backward is one product for its input's gradient and one for its weight's, instead of one per
    block and the sums of the input's (docs/design.md, "Thirtieth round"). Otherwise it is ssd_xbc on views of
    the blocks.

    Args:
        zxbcdt: [B, T, 2 H P + 2 G N + H].
        num_heads: H; n_groups: G (dividing H); d_state: N. The head dim P follows from zxbcdt's width.
        A, D, dt_bias, dt_softplus, dt_limit, initial_state, output_final_state, cu_seqlens, backend, conv_weight,
            conv_bias, norm_weight, norm_eps: as :func:`ssd_xbc`.

    Returns:
        y: [B, T, H, P] in zxbcdt's dtype.
        final_state: [N, H, P, N] float32 (float64 for float64 inputs), or None.
    """
    check_tensor("zxbcdt", zxbcdt, (None, None, None), dims="[B, T, 2 H P + 2 G N + H]")
    H, G, N = _check_sizes(num_heads, n_groups, d_state)
    width = zxbcdt.shape[-1]
    HP = (width - 2 * G * N - H) // 2
    if HP <= 0 or HP % H or 2 * HP + 2 * G * N + H != width:
        raise ValueError(f"zxbcdt's last dim must be 2 H P + 2 G N + H with P >= 1 (H={H}, G={G}, N={N}), "
                         f"got {width}")
    z, xbc, dt = zxbcdt.split([HP, HP + 2 * G * N, H], dim=-1)
    return _ssd_blocks(xbc, dt, A, z.unflatten(-1, (H, -1)), zxbcdt, H, G, N, D, dt_bias, dt_softplus, dt_limit,
                       initial_state, output_final_state, cu_seqlens, backend, conv_weight, conv_bias, norm_weight,
                       norm_eps)


def _check_sizes(num_heads, n_groups, d_state) -> tuple[int, int, int]:
    for name, value in (("num_heads", num_heads), ("n_groups", n_groups), ("d_state", d_state)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return num_heads, n_groups, d_state


def _ssd_blocks(xbc, dt, A, z, zxbcdt, H, G, N, D, dt_bias, dt_softplus, dt_limit, initial_state, output_final_state,
                cu_seqlens, backend, conv_weight, conv_bias, norm_weight, norm_eps):
    """ssd_xbc's and ssd_zxbcdt's checks and dispatch: xbc, dt and z as ssd_xbc takes them, and zxbcdt, the
    tensor of which they are the column blocks, or None."""
    width = xbc.shape[-1]
    if conv_weight is not None:
        check_tensor("conv_weight", conv_weight, (width, None), dims="[H P + 2 G N, W]", like=xbc)
    if conv_bias is not None:
        if conv_weight is None:
            raise ValueError("conv_bias is given without conv_weight")
        check_tensor("conv_bias", conv_bias, (width,), dims="[H P + 2 G N]", like=xbc)
    if norm_weight is not None:
        check_tensor("norm_weight", norm_weight, (width - 2 * G * N,), dims="[H P]", like=xbc)
        check_eps("norm_eps", norm_eps)

    def blocks(t):  # x [B, T, H, P], B and C [B, T, G, N]: views of t's column blocks
        x, B, C = t.split([width - 2 * G * N, G * N, G * N], dim=-1)
        return x.unflatten(-1, (H, -1)), B.unflatten(-1, (G, N)), C.unflatten(-1, (G, N))

    x, B, C = blocks(xbc)
    n = _check_inputs(x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens)
    lo, hi = check_dt_limit(dt_limit)
    name = _select(x, B, backend)
    conv = () if conv_weight is None else (conv_weight, conv_bias)
    fused = name == "cpu" and xbc.shape[1] > 0 and wants_grad(xbc, dt, A, D, z, dt_bias, initial_state, *conv) and (
        conv_weight is None or conv_cpu.unsupported(conv_weight.shape[1]) is None)
    if not fused:
        if conv:
            x, B, C = blocks(causal_conv1d(xbc, conv_weight, conv_bias, activation="silu", cu_seqlens=cu_seqlens,
                                           backend=backend)[0])
        y, final = _run(name, n, x, dt, A, B, C, D, z, dt_bias, dt_softplus, lo, hi, initial_state,
                        output_final_state, cu_seqlens)
        return _normed(y, norm_weight, norm_eps), final
    norm_inside = norm_weight is not None and G == 1  # a kernel task holds one group's heads
    params = [None if t is None else t.to(xbc.dtype)
              for t in (A, D, dt_bias, conv_weight, conv_bias, norm_weight if norm_inside else None)]
    op = cpu_kernels.xbc_fused(xbc.shape[1], cu_seqlens)
    per_token = (xbc, dt, None if z is None else z.to(xbc.dtype)) if zxbcdt is None else (zxbcdt, None, None)
    y, final = run_fused(op, per_token, params, initial_state,
                         (H, G, N, dt_softplus, lo, hi, op.chunk_size, float(norm_eps), zxbcdt is not None),
                         output_final_state, cu_seqlens)
    return (y if norm_inside else _normed(y, norm_weight, norm_eps)), final


def _normed(y: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """y [B, T, H, P] RMS-normalised over each token's H P values and scaled by weight [H P] (ssd_xbc's norm), or
    y as it is without a weight."""
    if weight is None:
        return y
    return rms_norm(y.flatten(-2), weight, None, eps).view(y.shape)
