"""LightningModules ("systems"): one per method, sharing `DiffusionMethod`'s step."""

from lit_ti.methods.base import DiffusionMethod
from lit_ti.methods.dreamartist import DreamArtist
from lit_ti.methods.hypernetwork import HypernetworkMethod
from lit_ti.methods.pivotal import PivotalTuning
from lit_ti.methods.textual_inversion import TextualInversion

__all__ = ["DiffusionMethod", "DreamArtist", "HypernetworkMethod", "PivotalTuning", "TextualInversion"]
