"""Functional ops of seqmix, one subpackage per family; each op takes ``backend=``, and :func:`explain` says
which backend an op would take for given inputs, and why."""

from seqmix.kernels.backend import BackendUnavailable, explain
from seqmix.kernels.conv import causal_conv1d, causal_conv1d_update, dynamic_conv, light_conv
from seqmix.kernels.deltanet import delta_rule, gated_delta_rule
from seqmix.kernels.gated_linear_attention import gla
from seqmix.kernels.mamba import selective_scan
from seqmix.kernels.mamba2 import ssd, ssd_xbc, ssd_zxbcdt
from seqmix.kernels.norm import add_rms_norm, add_rms_norm_backend, rms_norm
from seqmix.kernels.pooling import chunk_select, ema_dechunk, segment_pool, segment_upsample
from seqmix.kernels.mlp import swiglu

__all__ = [
    "BackendUnavailable",
    "add_rms_norm",
    "add_rms_norm_backend",
    "causal_conv1d",
    "causal_conv1d_update",
    "chunk_select",
    "delta_rule",
    "dynamic_conv",
    "ema_dechunk",
    "explain",
    "gated_delta_rule",
    "gla",
    "light_conv",
    "rms_norm",
    "segment_pool",
    "segment_upsample",
    "selective_scan",
    "ssd",
    "ssd_xbc",
    "ssd_zxbcdt",
    "swiglu",
]
