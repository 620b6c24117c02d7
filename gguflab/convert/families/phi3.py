"""Phi-3 and Phi-4 (llama.cpp's Phi3MiniModel): the fused `qkv_proj` (attn_qkv) and
`gate_up_proj` (ffn_up, gate rows first) as they are; its own key order, with the original
context length second and the window (0 when none) after general.file_type; LongRoPE
configs give rope_factors_long / rope_factors_short and the attention factor. The vocab:
Phi-4's GPT-2 BPE when tokenizer_config says GPT2Tokenizer, else SentencePiece with
Phi-3's rules for added tokens."""

from __future__ import annotations

import math

import numpy as np

from ...errors import UserError
from ...gguf import Keys, Value
from ..arch import Arch, Generated, HParams, f32, u32


def _rope(hp: HParams) -> tuple[int, int, int]:
    """(context length, original context length, RoPE dimensions)."""
    n_ctx = hp.find("n_positions", "max_position_embeddings")
    orig = hp.rope.get("original_max_position_embeddings")
    if n_ctx is None or orig is None:
        raise UserError(f"{hp.path}: Phi-3 needs max_position_embeddings and "
                        f"original_max_position_embeddings")
    rot = hp.rope.get("partial_rotary_factor", 1.0)
    return int(n_ctx), int(orig), int(rot * hp.n_embd) // hp.n_head


def _keys(hp: HParams, file_type: int) -> dict[str, Value]:
    k = hp.key
    n_ctx, orig, rope_dims = _rope(hp)
    theta = hp.rope.get("full_attention", hp.rope).get("rope_theta")
    if theta is None:
        raise UserError(f"{hp.path}: missing rope_theta (Phi-3 needs it)")
    n_kv = hp.find("num_key_value_heads", "n_head_kv")
    eps = hp.find("rms_norm_eps")
    if n_kv is None or eps is None:
        raise UserError(f"{hp.path}: Phi-3 needs num_key_value_heads and rms_norm_eps")
    return {
        k(Keys.CONTEXT_LENGTH): u32(n_ctx),
        k(Keys.ROPE_SCALING_ORIG_CTX_LEN): u32(orig),
        k(Keys.EMBEDDING_LENGTH): u32(hp.n_embd),
        k(Keys.FEED_FORWARD_LENGTH): u32(hp.n_ff),
        k(Keys.BLOCK_COUNT): u32(hp.n_layer),
        k(Keys.HEAD_COUNT): u32(hp.n_head),
        k(Keys.HEAD_COUNT_KV): u32(n_kv),
        k(Keys.LAYERNORM_RMS_EPS): f32(eps),
        k(Keys.ROPE_DIMENSION_COUNT): u32(rope_dims),
        k(Keys.ROPE_FREQ_BASE): f32(theta),
        Keys.FILE_TYPE: u32(file_type),
        k(Keys.SLIDING_WINDOW): u32(hp.config.get("sliding_window") or 0),  # 0: Phi-4
    }


def _long_rope(hp: HParams) -> Generated:
    long, short = hp.rope.get("long_factor"), hp.rope.get("short_factor")
    if not long:
        return Generated()
    n_ctx, orig, rope_dims = _rope(hp)
    scale = n_ctx / orig
    kind = str(hp.rope.get("rope_type", "")).lower()
    if kind in ("su", "longrope"):
        attn = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
    elif kind == "yarn":
        attn = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
    else:
        raise UserError(f"{hp.path}: rope scaling type {kind or '(none)'!r} with long/short "
                        f"factors: llama.cpp converts only longrope (su) and yarn")
    if not short or len(long) != len(short) or len(long) != rope_dims / 2:
        raise UserError(f"{hp.path}: rope long/short factors must be {rope_dims // 2} each")
    return Generated(
        (("rope_factors_long.weight", np.array(long, np.float32)),
         ("rope_factors_short.weight", np.array(short, np.float32))),
        {hp.key(Keys.ROPE_SCALING_ATTN_FACTOR): f32(attn)})


def _shapes(hp: HParams) -> dict[str, tuple[int, ...]]:
    return {"attn_qkv.weight": ((hp.n_head + 2 * hp.n_head_kv) * hp.head_dim, hp.n_embd),
            "ffn_up.weight": (2 * hp.n_ff, hp.n_embd)}


PHI3 = Arch(
    ("Phi3ForCausalLM",), "phi3", _keys,
    layer_tensors=("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down"),
    layer_names={"input_layernorm.weight": "attn_norm.weight",
                 "self_attn.qkv_proj.weight": "attn_qkv.weight",
                 "self_attn.o_proj.weight": "attn_output.weight",
                 "post_attention_layernorm.weight": "ffn_norm.weight",
                 "mlp.gate_up_proj.weight": "ffn_up.weight",
                 "mlp.down_proj.weight": "ffn_down.weight",
                 "self_attn.rotary_emb.inv_freq": None},
    vocab="phi3",
    extra_shapes=_shapes,
    generated=_long_rope,
)
