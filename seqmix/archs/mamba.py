"""Mamba (Gu & Dao 2023): a selective state-space layer, one diagonal SSM per channel."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seqmix.archs.mamba2 import inverse_softplus, log_uniform_dt
from seqmix.archs.mixer import Mixer, State, is_decoding_step, register_mixer, take_step
from seqmix.archs.modules import Linear, ShortConvolution, no_weight_decay
from seqmix.kernels import selective_scan, step_cpu
from seqmix.kernels.conv.step import causal_conv1d_step
from seqmix.kernels.linear import linear
from seqmix.kernels.mamba.step import selective_scan_step_unchecked
from seqmix.kernels.step_cpu import StateOf


@register_mixer("mamba")
class Mamba(Mixer):
    """An input projection to (x, z); a short causal conv with SiLU over x; from x, a low-rank
    step size (x_proj to dt_rank, then dt_proj) and the input-dependent B and C; the selective
    scan with delta' = softplus(dt_proj(dt) + bias), A = -exp(A_log) per channel and state index,
    the skip D and the gate silu(z); the output projection.

    Args:
        hidden_size: model width.
        d_state: N, the state size per channel.
        expand: inner width D over model width.
        dt_rank: rank of the step-size projection; None for ceil(hidden_size / 16).
        conv_size: width of the short convolution.
        dt_min, dt_max, dt_init_floor: dt_proj's bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max].
        dt_scale: dt_proj's weight is uniform in +-dt_scale / sqrt(dt_rank).
        backend: backend of the selective scan and the short conv (None: automatic).
    """

    def __init__(self, hidden_size: int, d_state: int = 16, expand: int = 2, dt_rank: int | None = None,
                 conv_size: int = 4, dt_min: float = 1e-3, dt_max: float = 1e-1, dt_init_floor: float = 1e-4,
                 dt_scale: float = 1.0, backend: str | None = None):
        super().__init__()
        d_inner = expand * hidden_size
        dt_rank = math.ceil(hidden_size / 16) if dt_rank is None else dt_rank
        if min(d_inner, d_state, dt_rank) < 1:
            raise ValueError(f"expand * hidden_size, d_state and dt_rank must be positive, got "
                             f"{d_inner}, {d_state}, {dt_rank}")
        self.hidden_size, self.d_inner, self.d_state, self.dt_rank = hidden_size, d_inner, d_state, dt_rank
        self.backend = backend
        self.in_proj = Linear(hidden_size, 2 * d_inner, bias=False)
        self.conv = ShortConvolution(d_inner, conv_size, activation="silu", bias=True, backend=backend)
        self.x_proj = Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = Linear(dt_rank, d_inner, bias=True)
        bound = dt_scale * dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        with torch.no_grad():
            self.dt_proj.bias.copy_(inverse_softplus(log_uniform_dt(d_inner, dt_min, dt_max, dt_init_floor)))
        # A = -[1, ..., N] for every channel.
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        no_weight_decay(self.A_log, self.D, self.dt_proj.bias)
        self.out_proj = Linear(d_inner, hidden_size, bias=False)

    def mix(self, x, state: State | None, *, cu_seqlens=None):
        if is_decoding_step(x, state, cu_seqlens):
            step = self.cpu_decoding_step(x, state)
            return self._step(x, state) if step is None else take_step(step, x, state)
        # x and z projected apart (in_proj's row halves) so that both are contiguous: halves of one output make
        # every elementwise pass over them (the conv's taps, the scan's z) strided and slow, and their
        # gradients would be joined by a copy.
        w_x, w_z = self.in_proj.weight.split(self.d_inner)
        xs, z = linear(x, w_x), linear(x, w_z)
        xs, conv_state = self.conv(xs, None if state is None else state["conv"], cu_seqlens)
        dt, b, c = self.x_proj(xs).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        # dt_proj inside the scan (its bias added there before the softplus): the cpu backend computes the step
        # sizes where it reads them (docs/design.md, "Thirtieth round").
        y, ssm_state = selective_scan(
            xs, dt, self._A(), b, c, D=self.D, z=z, delta_proj_weight=self.dt_proj.weight,
            delta_bias=self.dt_proj.bias, delta_softplus=True,
            initial_state=None if state is None else state["ssm"], output_final_state=state is not None,
            cu_seqlens=cu_seqlens, backend=self.backend,
        )
        out = self.out_proj(y)
        if state is None:
            return out, None
        return out, {"conv": conv_state, "ssm": ssm_state}

    def _step(self, x, state: State):
        """One token (x [B, 1, hidden]) in the fewest calls: rows [B, ...] throughout, the weights through
        F.linear (a submodule's call costs microseconds of Python), the conv's window step called directly
        on CPU tensors (on CUDA without a gradient the conv module takes its fused update kernel; on CPU without a
        gradient it is one C++ call), the selective scan's step without its argument checks."""
        xs, z = F.linear(x[:, 0], self.in_proj.weight).chunk(2, dim=-1)
        if x.is_cuda and not torch.is_grad_enabled():
            xs, conv_state = self.conv(xs.unsqueeze(1), state["conv"])
            xs = xs[:, 0]
        else:
            xs, conv_state = causal_conv1d_step(xs, self.conv.weight, self.conv.bias, self.conv.activation,
                                                state["conv"])
        dt, b, c = F.linear(xs, self.x_proj.weight).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        # The unchecked form: every input here is built by this layer, so its shapes are right by construction.
        y, ssm_state = selective_scan_step_unchecked(
            xs, F.linear(dt, self.dt_proj.weight, self.dt_proj.bias), self._step_A(), b, c, state["ssm"], D=self.D,
            z=z, delta_softplus=True,
            # The step has a C++ and a reference form; a Triton layer's step takes the automatic choice.
            backend="reference" if self.backend == "reference" else None,
        )
        return F.linear(y, self.out_proj.weight).unsqueeze(1), {"conv": conv_state, "ssm": ssm_state}

    def cpu_decoding_step(self, like, state):
        """One token as one C++ call (in_proj, the conv's window step, x_proj, dt_proj, the scan's step, the gate
        and out_proj: step_cpu.mamba_step); the same outputs as :meth:`_step` (tests/archs/test_mamba.py). See
        :meth:`Mixer.cpu_decoding_step`."""
        if not step_cpu.serves_layer("mamba_step", like, state, self):
            return None
        modules, params = self._modules, self._parameters
        conv, dt_proj = modules["conv"]._parameters, modules["dt_proj"]._parameters
        in_weights = (modules["in_proj"]._parameters["weight"], conv["weight"], conv["bias"])
        scan = (modules["x_proj"]._parameters["weight"], dt_proj["weight"], dt_proj["bias"], self._step_A(),
                params["D"])
        out_weight = modules["out_proj"]._parameters["weight"]
        return step_cpu.LayerCall(step_cpu.mamba_step, (None, *in_weights, StateOf("conv"), *scan, StateOf("ssm"),
                                                        out_weight), ("conv", "ssm"))

    def _A(self):
        """A = -exp(A_log) [D, N] in float32 at least (a float64 layer keeps float64)."""
        a_log = self.A_log if self.A_log.dtype in (torch.float32, torch.float64) else self.A_log.float()
        return -torch.exp(a_log)

    def _step_A(self):
        """:meth:`_A` for the decoding step, kept while A_log is unchanged (saves -exp's two ops per token)."""
        return self._decoding_constant("_step_A_cache", [self.A_log], self._A)

    def init_state(self, batch_size: int) -> State:
        device = self.in_proj.weight.device
        return {"conv": self.conv.init_state(batch_size),
                "ssm": torch.zeros(batch_size, self.d_inner, self.d_state, device=device)}
