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


from . import llama, qwen2, qwen3, qwen3moe  # noqa: E402  (each declares its FAMILY)

FAMILIES: dict[str, Family] = {
    f.arch: f for f in (llama.FAMILY, qwen2.FAMILY, qwen3.FAMILY, qwen3moe.FAMILY)}


def supported() -> str:
    return ", ".join(FAMILIES)
