"""Qwen 2, Qwen 3 and Qwen3-MoE (llama.cpp's Qwen2Model, Qwen3Model, Qwen3MoeModel): NEOX
RoPE, so Q/K as they are; Qwen 2's q/k/v biases, Qwen 3's q/k norms; Qwen3-MoE's router
`mlp.gate` (ffn_gate_inp, kept F32) and its experts (`mlp.experts.{e}.down/gate/up_proj`)
stacked into ffn_down_exps / ffn_gate_exps / ffn_up_exps (that order), the experts' width
written after general.file_type. Qwen 2/3 take a SentencePiece vocab when there is one,
Qwen3-MoE always the byte-level BPE tokenizer.json."""

from __future__ import annotations

from ...gguf import Keys, Value
from ..arch import ATTENTION, LAYER_NAMES, MOE_FFN, Arch, ExpertStack, HParams, text_model_keys, u32


def _moe_keys(hp: HParams, file_type: int) -> dict[str, Value]:
    out = text_model_keys(hp, file_type)
    for key, name in ((Keys.EXPERT_FEED_FORWARD_LENGTH, "moe_intermediate_size"),
                      (Keys.EXPERT_SHARED_FEED_FORWARD_LENGTH, "shared_expert_intermediate_size")):
        if hp.config.get(name) is not None:
            out[hp.key(key)] = u32(hp.config[name])
    return out


QWEN2 = Arch(("Qwen2ForCausalLM",), "qwen2", text_model_keys)
QWEN3 = Arch(("Qwen3ForCausalLM",), "qwen3", text_model_keys)
QWEN3MOE = Arch(
    ("Qwen3MoeForCausalLM",), "qwen3moe", _moe_keys,
    # every layer is a MoE layer: llama.cpp's qwen3moe has no dense FFN tensors
    layer_tensors=ATTENTION + MOE_FFN,
    layer_names={**{k: v for k, v in LAYER_NAMES.items() if not k.startswith("mlp.")},
                 "mlp.gate.weight": "ffn_gate_inp.weight"},
    experts=ExpertStack("mlp.experts", (("down_proj", "ffn_down_exps"),
                                        ("gate_proj", "ffn_gate_exps"),
                                        ("up_proj", "ffn_up_exps"))),
    vocab="bpe",
)
