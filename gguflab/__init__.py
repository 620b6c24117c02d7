"""gguflab: convert, quantize, test and chat with GGUF models from one terminal."""

__version__ = "0.1.0"
