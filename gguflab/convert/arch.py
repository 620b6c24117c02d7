"""What each supported Hugging Face architecture becomes in GGUF: the llama.cpp
architecture name, tensor names, Q/K permutation and hyperparameter keys."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import UserError
from ..gguf import Keys, Value, ValueType

U32, F32V, STR = ValueType.UINT32, ValueType.FLOAT32, ValueType.STRING


@dataclass(frozen=True)
class Arch:
    hf_names: tuple[str, ...]  # config.json "architectures"
    gguf_arch: str  # llama.cpp's LLM_ARCH name
    permute_qk: bool  # llama.cpp rotates pairs (GPT-J style): HF's halves must be interleaved
    writes_vocab_and_rope_dims: bool = False  # llama.cpp's llama converter adds both keys


ARCHES = (
    Arch(("LlamaForCausalLM", "LLaMAForCausalLM", "MistralForCausalLM"), "llama", True, True),
    Arch(("Qwen2ForCausalLM",), "qwen2", False),
    Arch(("Qwen3ForCausalLM",), "qwen3", False),
)


def supported_architectures() -> list[str]:
    return [n for a in ARCHES for n in a.hf_names]


# HF tensor name -> GGUF tensor name ({} is the layer); None means "not needed"
_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "self_attn.rotary_emb.inv_freq": None,
}
_GLOBAL_MAP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def gguf_name(hf_name: str) -> str | None:
    """The GGUF name of an HF tensor; None for tensors llama.cpp drops (rotary caches)."""
    if hf_name in _GLOBAL_MAP:
        return _GLOBAL_MAP[hf_name]
    m = _LAYER_RE.fullmatch(hf_name)
    if m and m.group(2) in _LAYER_MAP:
        suffix = _LAYER_MAP[m.group(2)]
        return None if suffix is None else f"blk.{int(m.group(1))}.{suffix}"
    if hf_name.endswith(".rotary_emb.inv_freq"):
        return None
    raise UserError(f"cannot map tensor {hf_name!r} to a GGUF name")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows of each head from HF's [first halves | second halves] rotary layout
    to llama.cpp's interleaved pairs (works on weights and on biases)."""
    rows = w.shape[0]
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


@dataclass
class HParams:
    arch: Arch
    config: dict[str, Any]
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    n_ctx: int | None
    rms_eps: float | None
    rope_theta: float | None
    head_dim: int
    tie_embeddings: bool
    rope_scaling: dict[str, Any] = field(default_factory=dict)

    def metadata(self) -> dict[str, Value]:
        """Hyperparameter keys in the order llama.cpp's converter writes them."""
        a = self.arch.gguf_arch
        k = lambda key: Keys.arch(key, a)  # noqa: E731
        out: dict[str, Value] = {k(Keys.BLOCK_COUNT): Value(U32, self.n_layer)}
        if self.n_ctx is not None:
            out[k(Keys.CONTEXT_LENGTH)] = Value(U32, self.n_ctx)
        out[k(Keys.EMBEDDING_LENGTH)] = Value(U32, self.n_embd)
        out[k(Keys.FEED_FORWARD_LENGTH)] = Value(U32, self.n_ff)
        out[k(Keys.HEAD_COUNT)] = Value(U32, self.n_head)
        out[k(Keys.HEAD_COUNT_KV)] = Value(U32, self.n_head_kv)
        rs = self.rope_scaling
        rtype = (rs.get("rope_type") or rs.get("type") or "").lower()
        if rtype in ("linear", "yarn") and rs.get("factor") is not None:
            out[k(Keys.ROPE_SCALING_TYPE)] = Value(STR, rtype)
            out[k(Keys.ROPE_SCALING_FACTOR)] = Value(F32V, float(rs["factor"]))
            if rtype == "yarn":
                out[k(Keys.ROPE_SCALING_ORIG_CTX_LEN)] = Value(
                    U32, int(rs["original_max_position_embeddings"]))
        if self.rope_theta is not None:
            out[k(Keys.ROPE_FREQ_BASE)] = Value(F32V, float(self.rope_theta))
        if self.rms_eps is not None:
            out[k(Keys.LAYERNORM_RMS_EPS)] = Value(F32V, float(self.rms_eps))
        if self.config.get("head_dim") is not None:  # as llama.cpp: only when config says
            out[k(Keys.KEY_LENGTH)] = Value(U32, int(self.config["head_dim"]))
            out[k(Keys.VALUE_LENGTH)] = Value(U32, int(self.config["head_dim"]))
        return out

    def late_metadata(self) -> dict[str, Value]:
        """Keys the llama converter adds after general.file_type."""
        if not self.arch.writes_vocab_and_rope_dims:
            return {}
        a = self.arch.gguf_arch
        return {Keys.arch(Keys.VOCAB_SIZE, a): Value(U32, self.n_vocab),
                Keys.arch(Keys.ROPE_DIMENSION_COUNT, a): Value(U32, self.head_dim)}

    def expected_shape(self, gguf: str) -> tuple[int, ...] | None:
        """The HF (row-major) shape a tensor must have, from config.json."""
        hd = self.head_dim
        kind = gguf.split(".", 2)[-1] if gguf.startswith("blk.") else gguf
        return {
            "token_embd.weight": (self.n_vocab, self.n_embd),
            "output.weight": (self.n_vocab, self.n_embd),
            "output_norm.weight": (self.n_embd,),
            "attn_norm.weight": (self.n_embd,),
            "ffn_norm.weight": (self.n_embd,),
            "attn_q.weight": (self.n_head * hd, self.n_embd),
            "attn_k.weight": (self.n_head_kv * hd, self.n_embd),
            "attn_v.weight": (self.n_head_kv * hd, self.n_embd),
            "attn_q.bias": (self.n_head * hd,),
            "attn_k.bias": (self.n_head_kv * hd,),
            "attn_v.bias": (self.n_head_kv * hd,),
            "attn_q_norm.weight": (hd,),
            "attn_k_norm.weight": (hd,),
            "attn_output.weight": (self.n_embd, self.n_head * hd),
            "ffn_gate.weight": (self.n_ff, self.n_embd),
            "ffn_up.weight": (self.n_ff, self.n_embd),
            "ffn_down.weight": (self.n_embd, self.n_ff),
        }.get(kind)


def load_hparams(folder: str | os.PathLike) -> HParams:
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{folder}: no config.json: not a Hugging Face model folder") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read: {e}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: not a JSON object")
    names = config.get("architectures") or []
    arch = next((a for a in ARCHES for n in names if n in a.hf_names), None)
    if arch is None:
        raise UserError(f"{path}: unsupported architecture {', '.join(names) or '(none)'}; "
                        f"gguflab converts {', '.join(supported_architectures())}")

    def need(*keys: str) -> Any:
        for key in keys:
            if key in config:
                return config[key]
        raise UserError(f"{path}: missing {keys[0]}")

    n_head = int(need("num_attention_heads", "n_head", "n_heads"))
    n_embd = int(need("hidden_size", "n_embd", "dim"))
    head_dim = int(config.get("head_dim") or n_embd // n_head)
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    theta = config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta"))
    return HParams(
        arch=arch, config=config,
        n_layer=int(need("num_hidden_layers", "n_layer", "n_layers")),
        n_embd=n_embd,
        n_ff=int(need("intermediate_size", "n_inner", "hidden_dim")),
        n_head=n_head,
        n_head_kv=int(config.get("num_key_value_heads") or n_head),
        n_vocab=int(need("vocab_size")),
        n_ctx=next((int(config[k]) for k in ("max_position_embeddings", "n_ctx", "n_positions")
                    if k in config), None),
        rms_eps=config.get("rms_norm_eps"),
        rope_theta=theta,
        head_dim=head_dim,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_scaling=rope if isinstance(rope, dict) else {},
    )


def llama3_rope_factors(hp: HParams) -> np.ndarray | None:
    """llama.cpp's `rope_freqs.weight` for LLaMA 3.1-style "llama3" rope scaling."""
    rs = hp.rope_scaling
    if (rs.get("rope_type") or rs.get("type") or "").lower() != "llama3":
        return None
    base = float(hp.rope_theta or 10000.0)
    dim = hp.head_dim
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = float(rs.get("factor", 8.0))
    lo, hi = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
    old_ctx = float(rs.get("original_max_position_embeddings", 8192))
    out = []
    for f in freqs:
        wavelen = 2 * np.pi / f
        if wavelen < old_ctx / hi:
            out.append(1.0)
        elif wavelen > old_ctx / lo:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)
