"""LLaMA, Mistral and Mixtral (llama.cpp's LlamaModel): Q/K rows interleaved for GPT-J-style
RoPE; Mixtral's experts (`block_sparse_moe.experts.{e}.w1/w2/w3`) stacked into
ffn_gate_exps / ffn_down_exps / ffn_up_exps (that order) behind the router `ffn_gate_inp`;
"llama3" rope scaling as a generated `rope_freqs.weight`; the vocab size and RoPE dimension
written after general.file_type."""

from __future__ import annotations

from ...gguf import Keys, Value
from ..arch import (
    LAYER_NAMES,
    Arch,
    ExpertStack,
    Generated,
    HParams,
    llama3_rope_factors,
    text_model_keys,
    u32,
)


def _keys(hp: HParams, file_type: int) -> dict[str, Value]:
    out = text_model_keys(hp, file_type)
    out[hp.key(Keys.VOCAB_SIZE)] = u32(hp.need("vocab_size"))
    rope_dim = hp.config.get("head_dim")
    if rope_dim is None:
        rope_dim = hp.n_embd // hp.n_head
    out[hp.key(Keys.ROPE_DIMENSION_COUNT)] = u32(rope_dim)
    return out


def _rope_freqs(hp: HParams) -> Generated:
    factors = llama3_rope_factors(hp)
    return Generated(() if factors is None else (("rope_freqs.weight", factors),))


LLAMA = Arch(
    ("LlamaForCausalLM", "LLaMAForCausalLM", "MistralForCausalLM", "MixtralForCausalLM"),
    "llama", _keys,
    layer_names={**LAYER_NAMES, "block_sparse_moe.gate.weight": "ffn_gate_inp.weight"},
    permute_qk=True,
    experts=ExpertStack("block_sparse_moe.experts", (("w1", "ffn_gate_exps"),
                                                     ("w2", "ffn_down_exps"),
                                                     ("w3", "ffn_up_exps"))),
    vocab="llama",
    generated=_rope_freqs,
)
