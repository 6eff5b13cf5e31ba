"""The anchor cases: every fused op at the project's anchor shape, in one list.

One entry per op names its sizes at the anchor shape (B8 T2048; H16 D128 for the
delta rules and GLA, SSD at H64 P64 N128 G1, the short conv at D4096 W4, the
selective scan at D4096 N16, DynamicConv and LightConv at C1024 H16 K31, segment pooling
and upsampling at D1024 with 20% boundaries, add_rms_norm at D4096) and at the small
shape the CPU rehearsal runs, how to make its inputs, its implementations
(seqmix's backends and the comparators that import), the roofline floor,
which comparator the ratio is taken against and, for the ops with a recurrent
state, how to call them with an initial state (and the conv's separate
decoding update). The GPU check
(``benchmarks/gpu_quick.py``) and the static Hopper report
(``benchmarks/sm90_report.py``) both read this list, so the kernels they
compile, check and time are the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks import (
    bench_causal_conv1d,
    bench_delta_rule,
    bench_dynamic_conv,
    bench_gated_delta_rule,
    bench_gla,
    bench_pooling,
    bench_recurrent_depth,
    bench_ssd,
)
from seqmix.kernels import causal_conv1d, causal_conv1d_update, delta_rule, gated_delta_rule, gla, selective_scan, ssd


def _state(*dims):
    """A random float32 initial state [B, *sizes of dims]."""
    return lambda s, dtype, device: torch.randn(s["B"], *(s[d] for d in dims), device=device)


def _conv_state(s, dtype, device):
    """The conv's state: the last W-1 inputs [B, D, W-1], in the inputs' dtype."""
    return torch.randn(s["B"], s["D"], s["W"] - 1, device=device, dtype=dtype)


def _final(op):
    """(backend) -> fn(*inputs, h0) -> (out, final state) of an op called on its inputs alone."""
    def bind(backend):
        return lambda *args: op(*args[:-1], initial_state=args[-1], output_final_state=True, backend=backend)
    return bind


def _ssd_final(backend):
    return lambda x, dt, A, B, C, D, bias, h0: ssd(x, dt, A, B, C, D=D, dt_bias=bias, dt_softplus=True,
                                                   initial_state=h0, output_final_state=True, backend=backend)


def _scan_final(backend):
    return lambda u, delta, A, B, C, D, z, bias, h0: selective_scan(
        u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True, initial_state=h0,
        output_final_state=True, backend=backend)


def _conv_update(backend):
    def call(x, w, state):
        state = state.float().clone()  # updated in place; float32 as causal_conv1d's final states are
        return causal_conv1d_update(x, state, w, activation="silu", backend=backend), state
    return call


def _conv_final(backend):
    return lambda x, w, h0: causal_conv1d(x, w, activation="silu", initial_state=h0, output_final_state=True,
                                          backend=backend)


@dataclass(frozen=True)
class Anchor:
    op: str
    anchor: dict  # B, T and the op's sizes at the anchor shape
    tiny: dict  # the same at the rehearsal's shape (one partial chunk past a full one)
    make_inputs: Callable  # (sizes, dtype, requires_grad, device) -> list of tensors
    impls: Callable  # (backends) -> {name: callable}
    floor: Callable  # (sizes, elem_bytes, backward) -> ms
    comparator: str  # the impl the speed ratio is taken against, when it imports
    has_cuda: bool = False  # seqmix has a CUDA backend for it (csrc/)
    # Ops with a recurrent state: (backend) -> fn(*inputs, initial_state) -> (out, final state), and
    # (sizes, dtype, device) -> a random initial state.
    stateful: Callable | None = None
    initial_state: Callable | None = None
    # A separate decoding op (the conv's in-place update): (backend) -> fn(*inputs, state) -> (out, state after).
    update: Callable | None = None

    def sizes(self, rehearse: bool) -> dict:
        return self.tiny if rehearse else self.anchor


def _floor(module, name):
    return lambda s, nbytes, backward: getattr(module, name)(s["B"], s["T"], s["H"], s["D"], s["D"], nbytes, backward)


HEADS = {"H": 16, "D": 128}
TINY_HEADS = {"B": 1, "T": 70, "H": 2, "D": 16}

ANCHORS = (
    Anchor(
        "delta_rule", {"B": 8, "T": 2048, **HEADS}, TINY_HEADS,
        lambda s, dtype, grad, device: bench_delta_rule.make_inputs(
            s["B"], s["T"], s["H"], s["D"], s["D"], dtype, grad, device),
        bench_delta_rule.impls, _floor(bench_delta_rule, "delta_rule_floor_ms"), "fla",
        stateful=_final(delta_rule), initial_state=_state("H", "D", "D"),
    ),
    Anchor(
        "gated_delta_rule", {"B": 8, "T": 2048, **HEADS}, TINY_HEADS,
        lambda s, dtype, grad, device: bench_gated_delta_rule.make_inputs(
            s["B"], s["T"], s["H"], s["D"], s["D"], dtype, grad, device),
        bench_gated_delta_rule.impls, _floor(bench_delta_rule, "delta_rule_floor_ms"), "fla",
        stateful=_final(gated_delta_rule), initial_state=_state("H", "D", "D"),
    ),
    Anchor(
        "gla", {"B": 8, "T": 2048, **HEADS}, TINY_HEADS,
        lambda s, dtype, grad, device: bench_gla.make_inputs(
            s["B"], s["T"], s["H"], s["D"], s["D"], dtype, grad, device),
        bench_gla.impls, _floor(bench_gla, "gla_floor_ms"), "fla",
        stateful=_final(gla), initial_state=_state("H", "D", "D"),
    ),
    Anchor(
        "ssd", {"B": 8, "T": 2048, "H": 64, "P": 64, "N": 128, "G": 1},
        {"B": 1, "T": 70, "H": 2, "P": 8, "N": 16, "G": 1},
        lambda s, dtype, grad, device: bench_ssd.make_inputs(
            s["B"], s["T"], s["H"], s["P"], s["N"], s["G"], dtype, grad, device),
        bench_ssd.impls,
        lambda s, nbytes, backward: bench_ssd.ssd_floor_ms(s["B"], s["T"], s["H"], s["P"], s["N"], s["G"], nbytes,
                                                           backward),
        "fla", stateful=_ssd_final, initial_state=_state("H", "P", "N"),
    ),
    Anchor(
        "selective_scan", {"B": 8, "T": 2048, "D": 4096, "N": 16}, {"B": 1, "T": 40, "D": 8, "N": 4},
        lambda s, dtype, grad, device: bench_ssd.make_scan_inputs(s["B"], s["T"], s["D"], s["N"], dtype, grad, device),
        bench_ssd.scan_impls,
        lambda s, nbytes, backward: bench_ssd.scan_floor_ms(s["B"], s["T"], s["D"], s["N"], nbytes, backward),
        "mamba_ssm", stateful=_scan_final, initial_state=_state("D", "N"),
    ),
    Anchor(
        "causal_conv1d", {"B": 8, "T": 2048, "D": 4096, "W": 4}, {"B": 1, "T": 70, "D": 16, "W": 4},
        lambda s, dtype, grad, device: bench_causal_conv1d.make_inputs(
            s["B"], s["T"], s["D"], s["W"], dtype, grad, device),
        bench_causal_conv1d.impls,
        lambda s, nbytes, backward: bench_causal_conv1d.conv_floor_ms(s["B"], s["T"], s["D"], nbytes, backward),
        "fla", has_cuda=True, stateful=_conv_final, initial_state=_conv_state, update=_conv_update,
    ),
    Anchor(
        "dynamic_conv", {"B": 8, "T": 2048, "C": 1024, "H": 16, "K": 31}, {"B": 1, "T": 40, "C": 16, "H": 2, "K": 5},
        lambda s, dtype, grad, device: bench_dynamic_conv.make_inputs(
            s["B"], s["T"], dtype, grad, device, channels=s["C"], heads=s["H"], taps=s["K"]),
        bench_dynamic_conv.impls,
        lambda s, nbytes, backward: bench_dynamic_conv.dynamic_conv_floor_ms(
            s["B"], s["T"], s["C"], s["H"], s["K"], nbytes, backward),
        "sdpa", has_cuda=True,
    ),
    Anchor(
        "light_conv", {"B": 8, "T": 2048, "C": 1024, "H": 16, "K": 31}, {"B": 1, "T": 40, "C": 16, "H": 2, "K": 5},
        lambda s, dtype, grad, device: bench_dynamic_conv.make_light_inputs(
            s["B"], s["T"], dtype, grad, device, channels=s["C"], heads=s["H"], taps=s["K"]),
        bench_dynamic_conv.light_impls,
        lambda s, nbytes, backward: bench_causal_conv1d.conv_floor_ms(s["B"], s["T"], s["C"], nbytes, backward),
        "sdpa", has_cuda=True,
    ),
    Anchor(  # segment_pool then segment_upsample with the null row first, as the hourglass layer calls them
        "segment_pool_upsample", {"B": 8, "T": 2048, "D": 1024, "rate": 0.2}, {"B": 2, "T": 40, "D": 16, "rate": 0.2},
        lambda s, dtype, grad, device: bench_pooling.make_inputs(s["B"], s["T"], s["D"], s["rate"], dtype, grad,
                                                                 device),
        bench_pooling.impls,
        lambda s, nbytes, backward: bench_pooling.pool_floor_ms(s["B"], s["T"], s["D"], s["rate"], nbytes, backward),
        "dense",
    ),
    Anchor(
        "add_rms_norm", {"B": 8, "T": 2048, "D": 4096}, {"B": 1, "T": 70, "D": 40},
        lambda s, dtype, grad, device: bench_recurrent_depth.make_norm_inputs(s["B"], s["T"], s["D"], dtype, grad,
                                                                              device),
        bench_recurrent_depth.norm_impls,
        lambda s, nbytes, backward: bench_recurrent_depth.norm_floor_ms(s["B"], s["T"], s["D"], nbytes, backward),
        "torch",
    ),
)


def fused_backends(anchor: Anchor, device: torch.device) -> list[str]:
    """seqmix's fused backends of ``anchor`` that can run on ``device``: Triton, and CUDA where the op
    has CUDA kernels and the extension is built for this GPU."""
    from seqmix.kernels.backend import why_unavailable

    names = ("triton", "cuda") if anchor.has_cuda else ("triton",)
    return [b for b in names if why_unavailable(b, device) is None]
