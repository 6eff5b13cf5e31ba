"""seqmix: fused sequence-mixer kernels and the layers built on them."""

__version__ = "0.1.0"
