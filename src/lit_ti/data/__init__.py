"""Concept images, captions and prompt templates: one datamodule for every method."""

from lit_ti.data.datamodule import ConceptDataModule

__all__ = ["ConceptDataModule"]
