"""Quantization: every ggml type's arithmetic (one module per family), llama.cpp's
per-tensor mixes, and the streaming quantize pipeline."""

from . import floats, iquants, kquants, legacy  # noqa: F401  (each family registers its types)
from .base import HIST_BINS, REGISTRY, IntGroup, QuantType, get, register, weight_types

__all__ = ["HIST_BINS", "REGISTRY", "IntGroup", "QuantType", "get", "register", "weight_types"]
