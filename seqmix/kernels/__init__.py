"""Functional ops of seqmix, one subpackage per family; each op takes ``backend=``."""

from seqmix.kernels.backend import BackendUnavailable
from seqmix.kernels.conv import causal_conv1d
from seqmix.kernels.deltanet import delta_rule
from seqmix.kernels.selective_scan import selective_scan
from seqmix.kernels.ssd import ssd

__all__ = ["BackendUnavailable", "causal_conv1d", "delta_rule", "selective_scan", "ssd"]
