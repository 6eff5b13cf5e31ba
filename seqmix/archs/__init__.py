"""Sequence mixers behind one interface (:class:`Mixer`), built by name with :func:`build_mixer`."""

from seqmix.archs.attention import Attention
from seqmix.archs.conv import DynamicConv, LightConv, ShortConv
from seqmix.archs.deltanet import DeltaNet, GatedDeltaNet
from seqmix.archs.gla import GatedLinearAttention
from seqmix.archs.hourglass import Hourglass
from seqmix.archs.mamba import Mamba
from seqmix.archs.mamba2 import Mamba2
from seqmix.archs.mixer import MIXERS, Mixer, State, build_mixer, register_mixer
from seqmix.archs.recurrent_depth import RecurrentDepth

__all__ = [
    "MIXERS", "Attention", "DeltaNet", "DynamicConv", "GatedDeltaNet", "GatedLinearAttention", "Hourglass", "LightConv",
    "Mamba", "Mamba2", "Mixer", "RecurrentDepth", "ShortConv", "State", "build_mixer", "register_mixer",
]
