"""Backbone specs (cheap, built at config time) and the loaded frozen components."""

from lit_ti.models.backbone import Backbone, DiffusersFolder, weight_dtype
from lit_ti.models.single_file import SingleFile
from lit_ti.models.tiny import TinyBackbone, clip_tokenizer

__all__ = ["Backbone", "DiffusersFolder", "SingleFile", "TinyBackbone", "clip_tokenizer", "weight_dtype"]
