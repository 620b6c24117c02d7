"""LLaMA 1/2/3 (and Mistral, Yi, SmolLM, TinyLlama ...): the base pass. RoPE on adjacent
pairs; LLaMA 3.1-style rope scaling comes as per-pair factors in `rope_freqs.weight`; a
missing `output.weight` means the head is the token embedding (tied, LLaMA 3.2 1B/3B).
With `expert_count` set (Mixtral), the FFN is a mixture of experts as in qwen3moe.py."""

from . import Family

FAMILY = Family("llama", rope_neox=False)
