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


def random_weights(cfg: dict, seed: int = 0, bias: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d, ff, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = d // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd

    def w(*shape, scale=None):
        scale = scale or 1 / np.sqrt(shape[-1])
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    out = {"model.embed_tokens.weight": w(v, d, scale=1.0)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
        out[p + "self_attn.q_proj.weight"] = w(d, d)
        out[p + "self_attn.k_proj.weight"] = w(kv, d)
        out[p + "self_attn.v_proj.weight"] = w(kv, d)
        out[p + "self_attn.o_proj.weight"] = w(d, d)
        if bias:
            out[p + "self_attn.q_proj.bias"] = w(d, scale=0.1)
            out[p + "self_attn.k_proj.bias"] = w(kv, scale=0.1)
            out[p + "self_attn.v_proj.bias"] = w(kv, scale=0.1)
        out[p + "post_attention_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(d)).astype(
            np.float32)
        out[p + "mlp.gate_proj.weight"] = w(ff, d)
        out[p + "mlp.up_proj.weight"] = w(ff, d)
        out[p + "mlp.down_proj.weight"] = w(d, ff)
    out["model.norm.weight"] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
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
    hd, eps, theta = d // nh, cfg["rms_norm_eps"], cfg["rope_theta"]
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

        q = _rope_hf(proj("q").reshape(T, nh, hd), pos, theta)
        k = _rope_hf(proj("k").reshape(T, nkv, hd), pos, theta)
        v = proj("v").reshape(T, nkv, hd)
        k, v = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)
        att = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", att, v).reshape(T, d)
        x = x + o @ W[p + "self_attn.o_proj.weight"].T
        h = _rms(x, W[p + "post_attention_layernorm.weight"], eps)
        g = h @ W[p + "mlp.gate_proj.weight"].T
        u = h @ W[p + "mlp.up_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ W[p + "mlp.down_proj.weight"].T
    x = _rms(x, W["model.norm.weight"], eps)
    head = W.get("lm_head.weight", W["model.embed_tokens.weight"])
    return x @ head.T
