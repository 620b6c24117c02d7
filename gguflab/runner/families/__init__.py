"""What each model family changes in the one forward pass (`runner/model.py`): the
hyperparameters it reads, the tensors it has, the steps it adds. llama.cpp keeps a family
per file (`src/models/<family>.cpp`); so do we, as a declaration: a new family is one module
here and one line in FAMILIES."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    arch: str  # general.architecture
    rope_neox: bool  # RoPE rotates the two halves of a head (NEOX), not adjacent pairs
    qk_norm: bool = False  # attn_q_norm/attn_k_norm: RMSNorm of each q and k head before RoPE
    # Gemma's steps (llama.cpp's gemma2.cpp / gemma3.cpp)
    embed_scale: bool = False  # token embeddings times sqrt(n_embd)
    gelu: bool = False  # GeGLU FFN (GELU, tanh form) instead of SwiGLU
    post_norms: bool = False  # RMSNorm of the attention's and the FFN's output before the add
    swa_pattern: int = 0  # sliding window on layers il % n < n - 1 (the key may override)
    swa_default: int = 0  # the window when the file does not say
    swa_own_rope: bool = False  # local layers: RoPE base freq_base_swa (10000), no scaling
    attn_softcap: float = 0.0  # attention logits soft-capped at this (the key may override)
    final_softcap: float = 0.0  # output logits soft-capped at this (the key may override)
    big_model_layers: int = 0  # the model this deep (the 27B) scales q by 1/sqrt(n_embd/n_head)


from . import gemma2, gemma3, llama, phi3, qwen2, qwen3, qwen3moe  # noqa: E402  (a FAMILY each)

FAMILIES: dict[str, Family] = {f.arch: f for f in (
    llama.FAMILY, qwen2.FAMILY, qwen3.FAMILY, qwen3moe.FAMILY, gemma2.FAMILY, gemma3.FAMILY,
    phi3.FAMILY)}


def supported() -> str:
    return ", ".join(FAMILIES)
