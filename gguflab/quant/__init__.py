"""Quantization: every ggml type's arithmetic (one module per family), llama.cpp's
per-tensor mixes, and the streaming quantize pipeline."""

from . import floats  # noqa: F401  (registers the float types)
from .base import HIST_BINS, REGISTRY, QuantType, get, register

__all__ = ["HIST_BINS", "REGISTRY", "QuantType", "get", "register"]
