"""Sequence mixers behind one interface (:class:`Mixer`), built by name with :func:`build_mixer`."""

from seqmix.archs.deltanet import DeltaNet
from seqmix.archs.mamba import Mamba
from seqmix.archs.mamba2 import Mamba2
from seqmix.archs.mixer import MIXERS, Mixer, State, build_mixer, register_mixer

__all__ = ["MIXERS", "DeltaNet", "Mamba", "Mamba2", "Mixer", "State", "build_mixer", "register_mixer"]
