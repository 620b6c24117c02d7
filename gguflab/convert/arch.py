"""What a Hugging Face architecture becomes in GGUF, as llama.cpp's converter makes it: the
family declaration (`Arch`: tensor names, Q/K permutation, experts, norm shift, vocab, keys),
the hyperparameters read from config.json (`HParams`), and the keys llama.cpp's shared
`TextModel` writes for every family. The families are declared in `convert/families/`."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from ..errors import UserError
from ..gguf import Keys, Value, ValueType

U32, F32V, STR, BOOL = ValueType.UINT32, ValueType.FLOAT32, ValueType.STRING, ValueType.BOOL


def u32(x: Any) -> Value:
    return Value(U32, int(x))


def f32(x: Any) -> Value:
    return Value(F32V, float(x))


# ---------------------------------------------------------------------------------------------
# tensor names: HF name -> GGUF name ({} is the layer); None means "not written"

LAYER_NAMES: Mapping[str, str | None] = MappingProxyType({
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
})
GLOBAL_NAMES: Mapping[str, str | None] = MappingProxyType({
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
})
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
ATTENTION = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output")
DENSE_FFN = ("ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
MOE_FFN = ("ffn_norm", "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
# kept F32 whatever the outtype, as llama.cpp keeps them (besides norms, biases and vectors)
F32_TENSORS = ("ffn_gate_inp.weight",)


@dataclass(frozen=True)
class ExpertStack:
    """Per-expert HF tensors (`model.layers.{i}.{prefix}.{expert}.{projection}.weight`) that
    llama.cpp stacks into one 3-D tensor per projection, expert 0 first; the stacks of a
    layer are written where that layer's last expert tensor comes in the checkpoint."""

    prefix: str
    order: tuple[tuple[str, str], ...]  # (HF projection, GGUF tensor), in llama.cpp's order

    def match(self, hf_name: str) -> tuple[int, int, str] | None:
        """(layer, expert, projection) of an expert tensor, else None."""
        m = re.fullmatch(rf"model\.layers\.(\d+)\.{re.escape(self.prefix)}\.(\d+)\.(\w+)\.weight",
                         hf_name)
        return None if m is None else (int(m.group(1)), int(m.group(2)), m.group(3))


@dataclass(frozen=True)
class Generated:
    """Tensors a family computes from config.json (rope factors), written before the
    checkpoint's, and keys llama.cpp sets while making them (right after
    general.architecture, since its converter prepares tensors before the metadata)."""

    tensors: tuple[tuple[str, np.ndarray], ...] = ()
    keys: dict[str, Value] = field(default_factory=dict)


@dataclass(frozen=True)
class Arch:
    """One family of llama.cpp's converter (`conversion/<family>.py`), as data."""

    hf_names: tuple[str, ...]  # config.json "architectures"
    gguf_arch: str  # llama.cpp's LLM_ARCH name
    # llama.cpp's set_gguf_parameters: the hyperparameter keys in its order, with
    # general.file_type (the argument) where the family writes it
    hparams_keys: Callable[[HParams, int], dict[str, Value]]
    layer_tensors: tuple[str, ...] = ATTENTION + DENSE_FFN  # every layer must have these
    moe_layer_tensors: tuple[str, ...] = ATTENTION + MOE_FFN  # ... when config has experts
    layer_names: Mapping[str, str | None] = field(default_factory=lambda: LAYER_NAMES)
    global_names: Mapping[str, str | None] = field(default_factory=lambda: GLOBAL_NAMES)
    permute_qk: bool = False  # llama.cpp rotates pairs (GPT-J style): HF's halves interleaved
    experts: ExpertStack | None = None
    norm_shift: float = 0.0  # added to every *norm.weight (Gemma stores 1 + w)
    # the tokenizer: "llama" (LlamaModel's rules), "sentencepiece_or_bpe", "bpe",
    # "sentencepiece", "phi3"; spm_space_prefix: add_space_prefix written after an SPM vocab
    vocab: str = "sentencepiece_or_bpe"
    spm_space_prefix: bool | None = None
    embedding_vocab_rows: bool = False  # token_embd cut to the tokenizer's size (Gemma 3)
    extra_shapes: Callable[[HParams], dict[str, tuple[int, ...]]] | None = None
    generated: Callable[[HParams], Generated] | None = None

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF name of an HF tensor; None for tensors llama.cpp drops."""
        if hf_name in self.global_names:
            return self.global_names[hf_name]
        m = _LAYER_RE.fullmatch(hf_name)
        if m and m.group(2) in self.layer_names:
            suffix = self.layer_names[m.group(2)]
            return None if suffix is None else f"blk.{int(m.group(1))}.{suffix}"
        if hf_name.endswith((".rotary_emb.inv_freq", ".attention.masked_bias",
                             ".attention.bias")):
            return None
        raise UserError(f"cannot map tensor {hf_name!r} to a GGUF name "
                        f"(llama.cpp's {self.gguf_arch} has no such tensor)")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows of each head from HF's [first halves | second halves] rotary layout
    to llama.cpp's interleaved pairs (works on weights and on biases)."""
    rows = w.shape[0]
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


# ---------------------------------------------------------------------------------------------
# hyperparameters

_GLOBAL_THETA = ("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta",
                 "rotary_emb_base")
_LOCAL_THETA = ("local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta",
                "rope_local_base_freq")


def _find(config: dict[str, Any], *keys: str) -> Any:
    """The value of the first key config.json has (None too), as llama.cpp's find_hparam."""
    return next((config[k] for k in keys if k in config), None)


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """config.json's rope_parameters (or rope_scaling), completed as llama.cpp's TextModel
    completes it: the global and local RoPE bases, rope_type from "type", the partial
    rotary factor and the original context length mirrored in."""
    rope = config.get("rope_parameters", config.get("rope_scaling")) or {}
    rope = dict(rope) if isinstance(rope, dict) else {}
    if "full_attention" not in rope and "sliding_attention" not in rope:
        if (local := _find(config, *_LOCAL_THETA)) is not None:
            rope["sliding_attention"] = {"rope_theta": local}
        if "rope_theta" not in rope and (theta := _find(config, *_GLOBAL_THETA)) is not None:
            rope["rope_theta"] = theta
        if "rope_type" not in rope and rope.get("type") is not None:
            rope["rope_type"] = rope["type"]
        for key, names in (("partial_rotary_factor",
                            ("partial_rotary_factor", "rope_pct", "rope_percent")),
                           ("original_max_position_embeddings",
                            ("original_max_position_embeddings",))):
            if key not in rope and (v := _find(config, *names)) is not None:
                rope[key] = v
    return rope


@dataclass
class HParams:
    arch: Arch
    config: dict[str, Any]
    path: str  # config.json, for messages
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    head_dim: int
    tie_embeddings: bool
    rope: dict[str, Any] = field(default_factory=dict)  # as llama.cpp completes it
    n_expert: int = 0
    n_ff_expert: int = 0

    def find(self, *keys: str) -> Any:
        return _find(self.config, *keys)

    def need(self, key: str) -> Any:
        """A key the family cannot do without (llama.cpp fails without it too)."""
        if self.config.get(key) is None:
            raise UserError(f"{self.path}: missing {key} ({self.arch.hf_names[0]} needs it)")
        return self.config[key]

    def key(self, name: str) -> str:
        return Keys.arch(name, self.arch.gguf_arch)

    def metadata(self, file_type: int) -> dict[str, Value]:
        """The hyperparameter keys (general.file_type among them) in llama.cpp's order."""
        return self.arch.hparams_keys(self, file_type)

    def expected_shape(self, gguf: str) -> tuple[int, ...] | None:
        """The HF (row-major) shape a tensor must have, from config.json."""
        hd, d = self.head_dim, self.n_embd
        kind = gguf.split(".", 2)[-1] if gguf.startswith("blk.") else gguf
        table = {
            "token_embd.weight": (self.n_vocab, d),
            "output.weight": (self.n_vocab, d),
            "output_norm.weight": (d,),
            "attn_norm.weight": (d,),
            "ffn_norm.weight": (d,),
            "post_attention_norm.weight": (d,),
            "post_ffw_norm.weight": (d,),
            "attn_q.weight": (self.n_head * hd, d),
            "attn_k.weight": (self.n_head_kv * hd, d),
            "attn_v.weight": (self.n_head_kv * hd, d),
            "attn_q.bias": (self.n_head * hd,),
            "attn_k.bias": (self.n_head_kv * hd,),
            "attn_v.bias": (self.n_head_kv * hd,),
            "attn_q_norm.weight": (hd,),
            "attn_k_norm.weight": (hd,),
            "attn_output.weight": (d, self.n_head * hd),
            "ffn_gate.weight": (self.n_ff, d),
            "ffn_up.weight": (self.n_ff, d),
            "ffn_down.weight": (d, self.n_ff),
            "ffn_gate_inp.weight": (self.n_expert, d),
            # one expert of a stack
            "ffn_gate_exps.weight": (self.n_ff_expert, d),
            "ffn_up_exps.weight": (self.n_ff_expert, d),
            "ffn_down_exps.weight": (d, self.n_ff_expert),
        }
        if self.arch.extra_shapes is not None:
            table.update(self.arch.extra_shapes(self))
        return table.get(kind)


def read_config(folder: str | os.PathLike) -> tuple[str, dict[str, Any]]:
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
    return path, config


def make_hparams(arch: Arch, path: str, config: dict[str, Any]) -> HParams:
    def need(*keys: str) -> Any:
        for key in keys:
            if config.get(key) is not None:
                return config[key]
        raise UserError(f"{path}: missing {keys[0]}")

    try:
        n_head = int(need("num_attention_heads", "n_head", "n_heads"))
        n_embd = int(need("hidden_size", "n_embd", "dim"))
        n_ff = int(need("intermediate_size", "n_inner", "hidden_dim"))
        n_expert = int(_find(config, "num_local_experts", "num_experts", "n_routed_experts") or 0)
        return HParams(
            arch=arch, config=config, path=path,
            n_layer=int(need("num_hidden_layers", "n_layer", "n_layers")),
            n_embd=n_embd, n_ff=n_ff, n_head=n_head,
            n_head_kv=int(config.get("num_key_value_heads") or n_head),
            n_vocab=int(need("vocab_size")),
            head_dim=int(config.get("head_dim") or n_embd // n_head),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            rope=rope_parameters(config),
            n_expert=n_expert,
            n_ff_expert=int(config.get("moe_intermediate_size") or n_ff) if n_expert else 0,
        )
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: a hyperparameter is not a number: {e}") from None


# ---------------------------------------------------------------------------------------------
# the keys llama.cpp's TextModel writes for every family that does not write its own

_GATING = {"softmax": 1, "sigmoid": 2, "sqrtsoftplus": 4}


def rope_scaling_keys(hp: HParams, out: dict[str, Value]) -> None:
    k = hp.key
    rope = hp.rope.get("full_attention", hp.rope)
    rope_type, factor = rope.get("rope_type"), rope.get("factor")
    if rope_type == "linear" and factor is not None:
        out[k(Keys.ROPE_SCALING_TYPE)] = Value(STR, "linear")
        out[k(Keys.ROPE_SCALING_FACTOR)] = f32(factor)
    elif rope_type == "yarn" and factor is not None:
        out[k(Keys.ROPE_SCALING_TYPE)] = Value(STR, "yarn")
        out[k(Keys.ROPE_SCALING_FACTOR)] = f32(factor)
        if rope.get("original_max_position_embeddings") is None:
            raise UserError(f"{hp.path}: YaRN rope scaling without "
                            f"original_max_position_embeddings")
        out[k(Keys.ROPE_SCALING_ORIG_CTX_LEN)] = u32(rope["original_max_position_embeddings"])
        attn = rope.get("attention_factor", rope.get("attn_factor"))
        for key, value in ((Keys.ROPE_SCALING_YARN_EXT_FACTOR, rope.get("extrapolation_factor")),
                           (Keys.ROPE_SCALING_YARN_ATTN_FACTOR, attn),
                           (Keys.ROPE_SCALING_YARN_BETA_FAST, rope.get("beta_fast")),
                           (Keys.ROPE_SCALING_YARN_BETA_SLOW, rope.get("beta_slow"))):
            if value is not None:
                out[k(key)] = f32(value)
    elif rope_type in ("su", "longrope"):
        out[k(Keys.ROPE_SCALING_TYPE)] = Value(STR, "longrope")


def text_model_keys(hp: HParams, file_type: int) -> dict[str, Value]:
    """llama.cpp's TextModel.set_gguf_parameters: each key where config.json has its value."""
    k = hp.key
    out: dict[str, Value] = {k(Keys.BLOCK_COUNT): u32(hp.n_layer)}
    for key, names in (
            (Keys.CONTEXT_LENGTH, ("max_position_embeddings", "n_ctx", "n_positions",
                                   "max_length", "max_sequence_length", "model_max_length")),
            (Keys.EMBEDDING_LENGTH, ("hidden_size", "n_embd", "dim")),
            (Keys.FEED_FORWARD_LENGTH, ("prefix_dense_intermediate_size",
                                        "dense_intermediate_size", "intermediate_size",
                                        "n_inner", "hidden_dim")),
            (Keys.HEAD_COUNT, ("num_attention_heads", "n_head", "n_heads")),
            (Keys.HEAD_COUNT_KV, ("num_key_value_heads", "n_kv_heads"))):
        if (v := hp.find(*names)) is not None:
            out[k(key)] = u32(v)
    if hp.config.get("is_causal") is False:
        out[k(Keys.CAUSAL)] = Value(BOOL, False)
    rope_scaling_keys(hp, out)
    if (theta := hp.rope.get("full_attention", hp.rope).get("rope_theta")) is not None:
        out[k(Keys.ROPE_FREQ_BASE)] = f32(theta)
    local = hp.rope.get("sliding_attention")
    if isinstance(local, dict) and local.get("rope_theta") is not None:
        out[k(Keys.ROPE_FREQ_BASE_SWA)] = f32(local["rope_theta"])
    for key, names, make in (
            (Keys.LAYERNORM_RMS_EPS, ("rms_norm_eps", "norm_eps"), f32),
            (Keys.LAYERNORM_EPS, ("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"), f32),
            (Keys.EXPERT_COUNT, ("num_local_experts", "num_experts", "n_routed_experts"), u32),
            (Keys.EXPERT_USED_COUNT, ("num_experts_per_tok", "num_experts_per_token",
                                      "top_k_experts"), u32),
            (Keys.EXPERT_GROUP_COUNT, ("n_group",), u32),
            (Keys.EXPERT_GROUP_USED_COUNT, ("topk_group",), u32)):
        if (v := hp.find(*names)) is not None:
            out[k(key)] = make(v)
    score = hp.find("score_function", "scoring_func", "score_func", "moe_router_activation",
                    "moe_router_activation_func", "expert_selection_fn")
    if score is not None:
        if score not in _GATING:
            raise UserError(f"{hp.path}: expert gating function {score!r} is not one llama.cpp "
                            f"knows ({', '.join(_GATING)})")
        out[k(Keys.EXPERT_GATING_FUNC)] = u32(_GATING[score])
    if (head_dim := hp.config.get("head_dim")) is not None:  # only when config says
        out[k(Keys.KEY_LENGTH)] = u32(head_dim)
        out[k(Keys.VALUE_LENGTH)] = u32(head_dim)
    out[Keys.FILE_TYPE] = u32(file_type)
    return out


def llama3_rope_factors(hp: HParams) -> np.ndarray | None:
    """llama.cpp's `rope_freqs.weight` for LLaMA 3.1-style "llama3" rope scaling."""
    rs = hp.rope.get("full_attention", hp.rope)
    if not rs or str(rs.get("rope_type", "")).lower() != "llama3":
        return None
    base = float(rs.get("rope_theta", 10000.0))
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
