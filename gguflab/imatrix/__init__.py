"""Importance matrices (llama-imatrix): the file formats here; collecting one from a model
run lives in `gguflab.imatrix.collect` (imported on demand: it pulls in the runner)."""

from .file import Entry, Imatrix, combine, load, save

__all__ = ["Entry", "Imatrix", "combine", "load", "save"]
