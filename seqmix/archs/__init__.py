"""Sequence mixers behind one interface (:class:`Mixer`), built by name with :func:`build_mixer`."""

from seqmix.archs.deltanet import DeltaNet
from seqmix.archs.mixer import MIXERS, Mixer, State, build_mixer, register_mixer

__all__ = ["MIXERS", "DeltaNet", "Mixer", "State", "build_mixer", "register_mixer"]
from seqmix.archs.deltanet import GatedDeltaNet

__all__ += ["GatedDeltaNet"]
from seqmix.archs.gla import GatedLinearAttention

__all__ += ["GatedLinearAttention"]
