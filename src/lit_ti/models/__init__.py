"""Backbone specs (cheap, built at config time) and the loaded frozen components."""

from lit_ti.models.backbone import Backbone, DiffusersFolder, weight_dtype
from lit_ti.models.real_size_sd3 import RealSizeSD3
from lit_ti.models.sd3 import SD3Folder
from lit_ti.models.sd3_single_file import SD3SingleFile
from lit_ti.models.single_file import SingleFile
from lit_ti.models.tiny import TinyBackbone, clip_tokenizer
from lit_ti.models.tiny_sd3 import TinySD3

__all__ = [
    "Backbone",
    "DiffusersFolder",
    "RealSizeSD3",
    "SD3Folder",
    "SD3SingleFile",
    "SingleFile",
    "TinyBackbone",
    "TinySD3",
    "clip_tokenizer",
    "weight_dtype",
]
