"""Mamba-2 (Dao & Gu 2024): a selective state-space layer computed with SSD (state-space duality)."""

from __future__ import annotations

import math

import torch
from torch import nn

from seqmix.archs.mixer import Mixer, State, is_decoding_step, register_mixer, take_step
from seqmix.archs.modules import Linear, RMSNorm, ShortConvolution, no_weight_decay
from seqmix.kernels import ssd_xbc, ssd_zxbcdt, step_cpu
from seqmix.kernels.linear import linear
from seqmix.kernels.mamba2.step import ssd_step
from seqmix.kernels.step_cpu import StateOf


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """x with softplus(x) = y, for y > 0: y + log(1 - exp(-y))."""
    return y + torch.log(-torch.expm1(-y))


def log_uniform_dt(n: int, dt_min: float, dt_max: float, floor: float) -> torch.Tensor:
    """n step sizes drawn log-uniformly in [dt_min, dt_max], at least ``floor``: Mamba's dt init."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    return dt.clamp_min(floor)


@register_mixer("mamba2")
class Mamba2(Mixer):
    """One input projection to (z, x, B, C, dt); a short causal conv with SiLU over (x, B, C);
    SSD with dt' = softplus(dt + dt_bias), A = -exp(A_log) per head and the skip D; the output
    gated by silu(z) (inside the op) and RMS-normalised; the output projection.

    Args:
        hidden_size: model width.
        head_dim: P, channels per head; the heads are H = expand * hidden_size / P.
        d_state: N, the state size per head.
        expand: inner width over model width.
        n_groups: G, groups of B and C shared by H / G heads each.
        conv_size: width of the short convolution.
        dt_min, dt_max, dt_init_floor: dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max].
        A_init_range: A_log = log(U[lo, hi]).
        dt_limit: dt' is clamped to it.
        norm_eps: epsilon of the output RMSNorm.
        backend: backend of SSD and the short conv (None: automatic).
    """

    def __init__(self, hidden_size: int, head_dim: int = 64, d_state: int = 128, expand: int = 2,
                 n_groups: int = 1, conv_size: int = 4, dt_min: float = 1e-3, dt_max: float = 1e-1,
                 dt_init_floor: float = 1e-4, A_init_range: tuple[float, float] = (1.0, 16.0),
                 dt_limit: tuple[float, float] = (0.0, math.inf), norm_eps: float = 1e-5,
                 backend: str | None = None):
        super().__init__()
        d_inner = expand * hidden_size
        if d_inner % head_dim:
            raise ValueError(f"expand * hidden_size = {d_inner} is not divisible by head_dim={head_dim}")
        num_heads = d_inner // head_dim
        if num_heads % n_groups:
            raise ValueError(f"n_groups={n_groups} does not divide the number of heads {num_heads}")
        if not 0 < A_init_range[0] <= A_init_range[1]:
            raise ValueError(f"A_init_range must satisfy 0 < lo <= hi, got {A_init_range}")
        self.hidden_size, self.d_inner, self.num_heads, self.head_dim = hidden_size, d_inner, num_heads, head_dim
        self.d_state, self.n_groups, self.dt_limit, self.backend = d_state, n_groups, dt_limit, backend
        self.conv_dim = d_inner + 2 * n_groups * d_state
        self.in_proj = Linear(hidden_size, d_inner + self.conv_dim + num_heads, bias=False)
        self.conv = ShortConvolution(self.conv_dim, conv_size, activation="silu", bias=True, backend=backend)
        self.dt_bias = nn.Parameter(inverse_softplus(log_uniform_dt(num_heads, dt_min, dt_max, dt_init_floor)))
        self.A_log = nn.Parameter(torch.log(torch.empty(num_heads).uniform_(*A_init_range)))
        self.D = nn.Parameter(torch.ones(num_heads))
        no_weight_decay(self.dt_bias, self.A_log, self.D)
        self.norm = RMSNorm(d_inner, eps=norm_eps)
        self.out_proj = Linear(d_inner, hidden_size, bias=False)

    def mix(self, x, state: State | None, *, cu_seqlens=None):
        B, T, _ = x.shape
        H, P, G, N = self.num_heads, self.head_dim, self.n_groups, self.d_state
        decoding = is_decoding_step(x, state, cu_seqlens)
        step = self.cpu_decoding_step(x, state) if decoding else None
        if step is not None:
            return take_step(step, x, state)
        # Without a state to carry, the short conv goes into SSD's call: the cpu backend computes it inside the
        # chunks for training, its output and gradient never written (docs/design.md, "Seventh round"). A replaced
        # conv module (the recall benchmark's conv-off variant) and a call with a state take the module.
        conv_inside = state is None and isinstance(self.conv, ShortConvolution) and self.conv.activation == "silu"
        # Under autograd the gated norm is the op's (the same rms_norm as RMSNorm.forward's there): the cpu
        # backend's kernels normalise each token as they write it, with no pass of their own over the output and
        # its gradient (docs/design.md, "Twenty-seventh round").
        norm_in_op = torch.is_grad_enabled()
        if conv_inside and norm_in_op:
            # Training: in_proj as one product whose output SSD takes whole, so its backward is one product for
            # x's gradient and one for the weight's (docs/design.md, "Thirtieth round").
            y, _ = ssd_zxbcdt(linear(x, self.in_proj.weight), self._A(), conv_weight=self.conv.weight,
                              conv_bias=self.conv.bias, **self._ssd_options(cu_seqlens, norm_in_op))
            return self.out_proj(y.reshape(B, T, self.d_inner)), None
        sizes = [self.d_inner, self.conv_dim, H]
        if decoding:  # one token: one matmul, the fewest calls
            z, xbc, dt = self.in_proj(x).split(sizes, dim=-1)
        else:
            # One matmul per part of in_proj's output (slices of its weight): each part contiguous, so the
            # gate's and the conv's element-wise passes run on contiguous rows (6-7% off a training step when
            # they were PyTorch's, docs/design.md).
            z, xbc, dt = (linear(x, w) for w in self.in_proj.weight.split(sizes))
        if not conv_inside:
            xbc, conv_state = self.conv(xbc, None if state is None else state["conv"], cu_seqlens)
        if decoding:
            xs, b, c = xbc.split([self.d_inner, G * N, G * N], dim=-1)
            y, ssm_state = ssd_step(
                xs.view(B, H, P), dt[:, 0], self._decoding_constant("_step_A", [self.A_log], self._A),
                b.view(B, G, N), c.view(B, G, N),
                state["ssm"], D=self.D, z=z.view(B, H, P), dt_bias=self.dt_bias, dt_softplus=True,
                dt_limit=self.dt_limit,
            )
            return self.out_proj(self.norm(y.view(B, 1, self.d_inner))), {"conv": conv_state, "ssm": ssm_state}
        # x, B and C stay the column blocks of the conv's output (or input): on the cpu backend SSD reads them in
        # place and their gradient is one tensor (docs/design.md, "Sixth round: a C++ RMSNorm; SSD on the conv's
        # output in place; GLA's and Mamba's decoding steps").
        y, ssm_state = ssd_xbc(
            xbc, dt, self._A(), z=z.reshape(B, T, H, P), initial_state=None if state is None else state["ssm"],
            output_final_state=state is not None, conv_weight=self.conv.weight if conv_inside else None,
            conv_bias=self.conv.bias if conv_inside else None, **self._ssd_options(cu_seqlens, norm_in_op),
        )
        y = y.reshape(B, T, self.d_inner)
        out = self.out_proj(y if norm_in_op else self.norm(y))
        return out, None if state is None else {"conv": conv_state, "ssm": ssm_state}

    def cpu_decoding_step(self, like, state):
        """One token as one C++ call (in_proj, the conv's window step, SSD's step, the gate, the norm and out_proj:
        step_cpu.mamba2_step); the same outputs as the tensor-op steps of :meth:`mix` (tests/archs/test_mamba2.py),
        a dozen calls fewer (docs/design.md, "CPU references (issue 14)"). See :meth:`Mixer.cpu_decoding_step`."""
        if not step_cpu.serves_layer("mamba2_step", like, state, self):
            return None
        # Submodules and parameters from their dicts: Module.__getattr__ costs ~0.6 us a look-up, a dozen a step.
        modules, params = self._modules, self._parameters
        conv, norm = modules["conv"]._parameters, modules["norm"]
        weights = (modules["in_proj"]._parameters["weight"], conv["weight"], conv["bias"])
        A = self._decoding_constant("_step_A", [params["A_log"]], self._A)
        ssd = (A, params["D"], params["dt_bias"], True, *map(float, self.dt_limit))
        out_weights = (norm._parameters["weight"], norm.eps, modules["out_proj"]._parameters["weight"])
        return step_cpu.LayerCall(step_cpu.mamba2_step, (None, *weights, StateOf("conv"), *ssd, StateOf("ssm"),
                                                         *out_weights), ("conv", "ssm"))

    def _ssd_options(self, cu_seqlens, norm_in_op: bool) -> dict:
        """The layer's keyword arguments of ssd_xbc and ssd_zxbcdt (the gated norm's weight when it is the op's)."""
        return dict(num_heads=self.num_heads, n_groups=self.n_groups, d_state=self.d_state, D=self.D,
                    dt_bias=self.dt_bias, dt_softplus=True, dt_limit=self.dt_limit, cu_seqlens=cu_seqlens,
                    backend=self.backend, norm_weight=self.norm.weight if norm_in_op else None,
                    norm_eps=self.norm.eps)

    def _A(self):
        """A = -exp(A_log) [H] in float32."""
        return -torch.exp(self.A_log.float())

    def init_state(self, batch_size: int) -> State:
        device = self.in_proj.weight.device
        return {
            "conv": self.conv.init_state(batch_size),
            "ssm": torch.zeros(batch_size, self.num_heads, self.head_dim, self.d_state, device=device),
        }
