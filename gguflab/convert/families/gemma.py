"""Gemma 2 and Gemma 3, text (llama.cpp's Gemma2Model, Gemma3Model): every norm weight
stored as 1 + w (HF's Gemma RMSNorm multiplies by 1 + w, llama.cpp's by w), the norm after
attention `post_attention_norm`, the one before the FFN `ffn_norm`, the one after it
`post_ffw_norm`; no output.weight for Gemma 2 (the head is the embedding, lm_head is
skipped); Gemma 3's embedding cut to the tokenizer's rows. Gemma 2 writes its own keys in
its own order (soft-capping and the window after general.file_type); Gemma 3 the shared
ones, then its defaults over them. SentencePiece vocab with add_space_prefix false."""

from __future__ import annotations

from ...errors import UserError
from ...gguf import Keys, Value
from ..arch import ATTENTION, DENSE_FFN, GLOBAL_NAMES, Arch, HParams, f32, text_model_keys, u32

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "self_attn.rotary_emb.inv_freq": None,
}
_LAYER_TENSORS = ATTENTION + DENSE_FFN + ("post_attention_norm", "post_ffw_norm")


def _gemma2_keys(hp: HParams, file_type: int) -> dict[str, Value]:
    k, c = hp.key, hp.config
    n_kv = c["num_key_value_heads"] if "num_key_value_heads" in c else hp.need(
        "num_attention_heads")
    return {
        k(Keys.CONTEXT_LENGTH): u32(hp.need("max_position_embeddings")),
        k(Keys.EMBEDDING_LENGTH): u32(hp.need("hidden_size")),
        k(Keys.BLOCK_COUNT): u32(hp.n_layer),
        k(Keys.FEED_FORWARD_LENGTH): u32(hp.need("intermediate_size")),
        k(Keys.HEAD_COUNT): u32(hp.need("num_attention_heads")),
        k(Keys.HEAD_COUNT_KV): u32(n_kv),
        k(Keys.LAYERNORM_RMS_EPS): f32(hp.need("rms_norm_eps")),
        k(Keys.KEY_LENGTH): u32(hp.need("head_dim")),
        k(Keys.VALUE_LENGTH): u32(hp.need("head_dim")),
        Keys.FILE_TYPE: u32(file_type),
        k(Keys.ATTN_LOGIT_SOFTCAPPING): f32(hp.need("attn_logit_softcapping")),
        k(Keys.FINAL_LOGIT_SOFTCAPPING): f32(hp.need("final_logit_softcapping")),
        k(Keys.SLIDING_WINDOW): u32(hp.need("sliding_window")),
    }


def _gemma3_keys(hp: HParams, file_type: int) -> dict[str, Value]:
    k, c = hp.key, hp.config
    out = text_model_keys(hp, file_type)
    # Gemma 3's defaults where config.json is silent; a key written above keeps its place
    out[k(Keys.CONTEXT_LENGTH)] = u32(c.get("max_position_embeddings", 131072))
    out[k(Keys.HEAD_COUNT)] = u32(c.get("num_attention_heads", 8))
    out[k(Keys.LAYERNORM_RMS_EPS)] = f32(c.get("rms_norm_eps", 1e-6))
    out[k(Keys.KEY_LENGTH)] = u32(c.get("head_dim", 256))
    out[k(Keys.VALUE_LENGTH)] = u32(c.get("head_dim", 256))
    out[k(Keys.ROPE_FREQ_BASE)] = f32(hp.rope.get("full_attention", hp.rope).get(
        "rope_theta", 1_000_000.0))  # the global layers'
    if c.get("attn_logit_softcapping") is not None:
        raise UserError(f"{hp.path}: attn_logit_softcapping is set, Gemma 3 has none")
    if final := c.get("final_logit_softcapping"):
        out[k(Keys.FINAL_LOGIT_SOFTCAPPING)] = f32(final)
    if c.get("sliding_window_pattern") != 1:
        out[k(Keys.SLIDING_WINDOW)] = u32(hp.need("sliding_window"))
    out[k(Keys.HEAD_COUNT_KV)] = u32(c.get("num_key_value_heads", 4))
    return out


GEMMA2 = Arch(
    ("Gemma2ForCausalLM",), "gemma2", _gemma2_keys,
    layer_tensors=_LAYER_TENSORS, layer_names=_LAYER_NAMES,
    global_names={**GLOBAL_NAMES, "lm_head.weight": None},  # llama.cpp skips it
    norm_shift=1.0, vocab="sentencepiece", spm_space_prefix=False,
)
GEMMA3 = Arch(
    ("Gemma3ForCausalLM",), "gemma3", _gemma3_keys,
    layer_tensors=_LAYER_TENSORS,
    layer_names={**_LAYER_NAMES, "self_attn.q_norm.weight": "attn_q_norm.weight",
                 "self_attn.k_norm.weight": "attn_k_norm.weight"},
    norm_shift=1.0, vocab="sentencepiece_or_bpe", spm_space_prefix=False,
    embedding_vocab_rows=True,
)
