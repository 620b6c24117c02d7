"""Qwen2 / Qwen2.5: the base pass with NEOX RoPE and biases on q, k and v
(`attn_{q,k,v}.bias`)."""

from . import Family

FAMILY = Family("qwen2", rope_neox=True)
