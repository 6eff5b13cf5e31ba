"""Functional ops of seqmix, one subpackage per family; each op takes ``backend=``."""

from seqmix.kernels.backend import BackendUnavailable
from seqmix.kernels.conv import causal_conv1d
from seqmix.kernels.deltanet import delta_rule

__all__ = ["BackendUnavailable", "causal_conv1d", "delta_rule"]
from seqmix.kernels.deltanet import gated_delta_rule

__all__ += ["gated_delta_rule"]
from seqmix.kernels.gated_linear_attention import gla

__all__ += ["gla"]
