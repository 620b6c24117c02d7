"""Tiny Hugging Face model folders made by the tests (random weights from a fixed seed),
and a plain numpy forward pass of them in HF's own conventions: the converter's oracle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np


def llama_config(arch="LlamaForCausalLM", n_vocab=32000, n_embd=64, n_layer=2, n_head=4,
                 n_head_kv=2, n_ff=128, tie=False, **extra) -> dict:
    return {"architectures": [arch], "hidden_size": n_embd, "intermediate_size": n_ff,
            "num_hidden_layers": n_layer, "num_attention_heads": n_head,
            "num_key_value_heads": n_head_kv, "vocab_size": n_vocab,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": tie, "torch_dtype": "float32", **extra}


_QK_NORM = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma3ForCausalLM")
_GEMMA = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")


def random_weights(cfg: dict, seed: int = 0, bias: bool = False) -> dict[str, np.ndarray]:
    """HF tensors for `cfg`'s architecture: LLaMA/Qwen's layout, Mixtral's and Qwen3-MoE's
    experts (one tensor per expert and projection, and the router), Gemma's four norms per
    layer (weights around 0: HF's Gemma norm multiplies by 1 + w), Phi-3's fused qkv_proj
    and gate_up_proj."""
    rng = np.random.default_rng(seed)
    arch = cfg["architectures"][0]
    d, ff, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    kv, qd = cfg["num_key_value_heads"] * hd, cfg["num_attention_heads"] * hd
    n_expert = cfg.get("num_local_experts") or cfg.get("num_experts") or 0
    gemma = arch in _GEMMA

    def w(*shape, scale=None):
        scale = scale or 1 / np.sqrt(shape[-1])
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm(n):
        return ((0.0 if gemma else 1.0) + 0.1 * rng.standard_normal(n)).astype(np.float32)

    out = {"model.embed_tokens.weight": w(v, d, scale=1.0)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = norm(d)
        if arch == "Phi3ForCausalLM":
            out[p + "self_attn.qkv_proj.weight"] = w(qd + 2 * kv, d)
        else:
            out[p + "self_attn.q_proj.weight"] = w(qd, d)
            out[p + "self_attn.k_proj.weight"] = w(kv, d)
            out[p + "self_attn.v_proj.weight"] = w(kv, d)
        out[p + "self_attn.o_proj.weight"] = w(d, qd)
        if arch in _QK_NORM:
            for n in ("q_norm", "k_norm"):
                out[p + f"self_attn.{n}.weight"] = ((0.0 if gemma else 1.0) + 0.2 * (
                    rng.standard_normal(hd))).astype(np.float32)
        if bias:
            out[p + "self_attn.q_proj.bias"] = w(qd, scale=0.1)
            out[p + "self_attn.k_proj.bias"] = w(kv, scale=0.1)
            out[p + "self_attn.v_proj.bias"] = w(kv, scale=0.1)
        out[p + "post_attention_layernorm.weight"] = norm(d)
        if gemma:
            out[p + "pre_feedforward_layernorm.weight"] = norm(d)
            out[p + "post_feedforward_layernorm.weight"] = norm(d)
        if n_expert and arch == "MixtralForCausalLM":
            out[p + "block_sparse_moe.gate.weight"] = w(n_expert, d)
            for x in range(n_expert):
                e = p + f"block_sparse_moe.experts.{x}."
                out[e + "w1.weight"], out[e + "w2.weight"] = w(ff, d), w(d, ff)
                out[e + "w3.weight"] = w(ff, d)
        elif n_expert:  # Qwen3-MoE
            mff = cfg.get("moe_intermediate_size") or ff
            out[p + "mlp.gate.weight"] = w(n_expert, d)
            for x in range(n_expert):
                e = p + f"mlp.experts.{x}."
                out[e + "gate_proj.weight"], out[e + "up_proj.weight"] = w(mff, d), w(mff, d)
                out[e + "down_proj.weight"] = w(d, mff)
        elif arch == "Phi3ForCausalLM":
            out[p + "mlp.gate_up_proj.weight"] = w(2 * ff, d)
            out[p + "mlp.down_proj.weight"] = w(d, ff)
        else:
            out[p + "mlp.gate_proj.weight"] = w(ff, d)
            out[p + "mlp.up_proj.weight"] = w(ff, d)
            out[p + "mlp.down_proj.weight"] = w(d, ff)
    out["model.norm.weight"] = norm(d)
    if not cfg.get("tie_word_embeddings"):
        out["lm_head.weight"] = w(v, d)
    return out


def write_folder(folder: Path, cfg: dict, weights: dict[str, np.ndarray],
                 spm_model: Path | None = None, tokenizer_config: dict | None = None) -> Path:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(weights, str(folder / "model.safetensors"))
    if spm_model is not None:
        shutil.copy(spm_model, folder / "tokenizer.model")
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config or {
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False}))
    return folder


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope_hf(x, pos, theta):
    """HF's rotate_half RoPE on (T, heads, head_dim)."""
    hd = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.outer(pos, inv)
    cos = np.concatenate([np.cos(ang)] * 2, axis=-1)[:, None, :]
    sin = np.concatenate([np.sin(ang)] * 2, axis=-1)[:, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + np.concatenate([-x2, x1], axis=-1) * sin


def hf_forward(cfg: dict, w: dict[str, np.ndarray], tokens: list[int]) -> np.ndarray:
    """Logits (T, vocab) of the HF model, in float64."""
    W = {k: v.astype(np.float64) for k, v in w.items()}
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg["hidden_size"]
    hd, eps, theta = cfg.get("head_dim") or d // nh, cfg["rms_norm_eps"], cfg["rope_theta"]
    T = len(tokens)
    pos = np.arange(T)
    x = W["model.embed_tokens.weight"][tokens]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms(x, W[p + "input_layernorm.weight"], eps)

        def proj(n, h=h, p=p):
            y = h @ W[p + f"self_attn.{n}_proj.weight"].T
            return y + W.get(p + f"self_attn.{n}_proj.bias", 0)

        q, k = proj("q").reshape(T, nh, hd), proj("k").reshape(T, nkv, hd)
        if p + "self_attn.q_norm.weight" in W:  # Qwen3: each head RMS-normalised first
            q = _rms(q, W[p + "self_attn.q_norm.weight"], eps)
            k = _rms(k, W[p + "self_attn.k_norm.weight"], eps)
        q, k = _rope_hf(q, pos, theta), _rope_hf(k, pos, theta)
        v = proj("v").reshape(T, nkv, hd)
        k, v = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)
        att = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", att, v).reshape(T, nh * hd)
        x = x + o @ W[p + "self_attn.o_proj.weight"].T
        h = _rms(x, W[p + "post_attention_layernorm.weight"], eps)
        g = h @ W[p + "mlp.gate_proj.weight"].T
        u = h @ W[p + "mlp.up_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ W[p + "mlp.down_proj.weight"].T
    x = _rms(x, W["model.norm.weight"], eps)
    head = W.get("lm_head.weight", W["model.embed_tokens.weight"])
    return x @ head.T


def write_smollm2_tokenizer(d: Path, keys: dict) -> None:
    """SmolLM2's tokenizer.json and tokenizer_config.json, rebuilt from the tokenizer keys
    of its GGUF with the tokenizers library (BPE, digits split one by one, byte-level)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    from gguflab.gguf import Keys

    tokens = keys[Keys.TOKENS].to_python()
    types = keys[Keys.TOKEN_TYPE].to_python()
    merges = [tuple(m.split(" ")) for m in keys[Keys.MERGES].to_python()]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    control = 3
    specials = [t for t, ty in zip(tokens, types) if ty == control]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False, "add_bos_token": False, "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>",
        "chat_template": keys[Keys.CHAT_TEMPLATE].value, "tokenizer_class": "GPT2Tokenizer"}))


def export_hf_folder(gguf_path: str, folder: Path) -> dict:
    """A llama GGUF back to an HF folder: dequantized F32 safetensors (Q/K rotary
    permutation undone), config.json and the SmolLM2-style tokenizer files. Returns the
    config."""
    from safetensors.numpy import save_file

    from gguflab import quant
    from gguflab.gguf import GGUFReader, Keys

    r = GGUFReader(gguf_path)
    a = r.architecture
    hp = lambda k: r.get(Keys.arch(k, a))  # noqa: E731
    n_head, n_kv = hp(Keys.HEAD_COUNT), hp(Keys.HEAD_COUNT_KV)
    names = {"token_embd.weight": "model.embed_tokens.weight",
             "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
    layer = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    weights = {}
    for t in r:
        x = quant.get(t.type).dequantize(t.data.reshape(-1, t.data.shape[-1]))
        x = x.reshape(t.shape)
        if t.name.startswith("blk."):
            _, i, kind, suffix = t.name.split(".")
            if kind in ("attn_q", "attn_k"):  # undo llama.cpp's interleaving of rotary pairs
                h = n_head if kind == "attn_q" else n_kv
                x = x.reshape(h, x.shape[0] // h // 2, 2, *x.shape[1:]).swapaxes(1, 2)
                x = x.reshape(t.shape)
            hf = f"model.layers.{i}.{layer[kind]}.{suffix}"
        else:
            hf = names[t.name]
        weights[hf] = np.ascontiguousarray(x, np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / "model.safetensors"))
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": hp(Keys.EMBEDDING_LENGTH),
           "intermediate_size": hp(Keys.FEED_FORWARD_LENGTH),
           "num_hidden_layers": hp(Keys.BLOCK_COUNT), "num_attention_heads": n_head,
           "num_key_value_heads": n_kv, "vocab_size": len(r.get(Keys.TOKENS)),
           "max_position_embeddings": hp(Keys.CONTEXT_LENGTH),
           "rms_norm_eps": hp(Keys.LAYERNORM_RMS_EPS), "rope_theta": hp(Keys.ROPE_FREQ_BASE),
           "tie_word_embeddings": "output.weight" not in {t.name for t in r},
           "bos_token_id": r.get(Keys.BOS_ID), "eos_token_id": r.get(Keys.EOS_ID)}
    (folder / "config.json").write_text(json.dumps(cfg))
    write_smollm2_tokenizer(folder, {k: v for k, v in r.metadata.items()
                                     if k.startswith("tokenizer.")})
    return cfg
