"""Synthetic llama-architecture GGUF models with random weights from a fixed seed: test
data for every K-quant path (widths that are multiples of 256, GQA, several layers), and
models of any size for benchmarks, written one tensor at a time."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .gguf import GGMLType, Keys, LlamaFileType, TensorSpec, Value, ValueType, write_gguf
from .quant import get

U32, F32V = ValueType.UINT32, ValueType.FLOAT32


@dataclass(frozen=True)
class SynthConfig:
    n_layer: int = 4
    n_embd: int = 512
    n_ff: int = 1536
    n_head: int = 8
    n_head_kv: int = 2
    n_vocab: int = 1024
    n_ctx: int = 2048
    tied: bool = False
    dtype: GGMLType = GGMLType.F16
    seed: int = 0
    name: str = "synthetic-llama"
    tokenizer_from: str | None = None  # a GGUF whose tokenizer.* keys (and vocab) to copy
    arch: str = "llama"  # or "qwen3", "qwen3moe" (q/k norms), "gemma2", "gemma3"
    sliding_window: int = 0  # gemma2/gemma3: the local layers' window
    longrope_ctx: int = 0  # phi3: > 0 writes LongRoPE factors for this original context
    yarn: tuple[float, int] | None = None  # (factor, original context): YaRN rope scaling
    n_expert: int = 0  # > 0: a mixture of experts FFN (n_ff wide each), as Mixtral/Qwen3-MoE
    n_expert_used: int = 2


def tensor_shapes(c: SynthConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, numpy shape) in the order llama.cpp's converter writes them."""
    head_dim = c.n_embd // c.n_head
    out = [("token_embd.weight", (c.n_vocab, c.n_embd))]
    if c.longrope_ctx:
        out += [("rope_factors_long.weight", (head_dim // 2,)),
                ("rope_factors_short.weight", (head_dim // 2,))]
    for i in range(c.n_layer):
        p = f"blk.{i}."
        kv = c.n_head_kv * head_dim
        out.append((p + "attn_norm.weight", (c.n_embd,)))
        if c.arch == "phi3":  # Q, K, V in one tensor
            out.append((p + "attn_qkv.weight", (c.n_embd + 2 * kv, c.n_embd)))
        else:
            out += [(p + "attn_q.weight", (c.n_embd, c.n_embd)),
                    (p + "attn_k.weight", (kv, c.n_embd)),
                    (p + "attn_v.weight", (kv, c.n_embd))]
        out.append((p + "attn_output.weight", (c.n_embd, c.n_embd)))
        if c.arch in ("qwen3", "qwen3moe", "gemma3"):
            out += [(p + "attn_q_norm.weight", (head_dim,)), (p + "attn_k_norm.weight", (head_dim,))]
        if c.arch.startswith("gemma"):
            out.append((p + "post_attention_norm.weight", (c.n_embd,)))
        out.append((p + "ffn_norm.weight", (c.n_embd,)))
        if c.n_expert:
            e = c.n_expert
            out += [(p + "ffn_gate_inp.weight", (e, c.n_embd)),
                    (p + "ffn_gate_exps.weight", (e, c.n_ff, c.n_embd)),
                    (p + "ffn_up_exps.weight", (e, c.n_ff, c.n_embd)),
                    (p + "ffn_down_exps.weight", (e, c.n_embd, c.n_ff))]
        elif c.arch == "phi3":  # gate and up in one tensor, gate first
            out += [(p + "ffn_up.weight", (2 * c.n_ff, c.n_embd)),
                    (p + "ffn_down.weight", (c.n_embd, c.n_ff))]
        else:
            out += [(p + "ffn_gate.weight", (c.n_ff, c.n_embd)),
                    (p + "ffn_up.weight", (c.n_ff, c.n_embd)),
                    (p + "ffn_down.weight", (c.n_embd, c.n_ff))]
        if c.arch.startswith("gemma"):
            out.append((p + "post_ffw_norm.weight", (c.n_embd,)))
    out.append(("output_norm.weight", (c.n_embd,)))
    if not c.tied and not c.arch.startswith("gemma"):  # Gemma's head is the embedding
        out.append(("output.weight", (c.n_vocab, c.n_embd)))
    return out


def _weights(c: SynthConfig, index: int, name: str, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng([c.seed, index])
    if len(shape) == 1:  # norms: around 1, as trained models have them
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    x = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    # a few outlier columns and a heavier tail, like real weights
    cols = rng.choice(shape[-1], size=max(1, shape[-1] // 64), replace=False)
    x[..., cols] *= 8
    return x


def metadata(c: SynthConfig) -> dict[str, Value]:
    a = c.arch
    ftype = {GGMLType.F32: LlamaFileType.ALL_F32, GGMLType.F16: LlamaFileType.MOSTLY_F16,
             GGMLType.BF16: LlamaFileType.MOSTLY_BF16}[c.dtype]
    return {
        Keys.ARCHITECTURE: Value(ValueType.STRING, a),
        Keys.NAME: Value(ValueType.STRING, c.name),
        Keys.arch(Keys.CONTEXT_LENGTH, a): Value(U32, c.n_ctx),
        Keys.arch(Keys.EMBEDDING_LENGTH, a): Value(U32, c.n_embd),
        Keys.arch(Keys.BLOCK_COUNT, a): Value(U32, c.n_layer),
        Keys.arch(Keys.FEED_FORWARD_LENGTH, a): Value(U32, c.n_ff),
        Keys.arch(Keys.HEAD_COUNT, a): Value(U32, c.n_head),
        Keys.arch(Keys.HEAD_COUNT_KV, a): Value(U32, c.n_head_kv),
        Keys.arch(Keys.ROPE_FREQ_BASE, a): Value(F32V, 10000.0),
        Keys.arch(Keys.LAYERNORM_RMS_EPS, a): Value(F32V, 1e-5),
        Keys.arch(Keys.ROPE_DIMENSION_COUNT, a): Value(U32, c.n_embd // c.n_head),
        Keys.arch(Keys.VOCAB_SIZE, a): Value(U32, c.n_vocab),
        Keys.FILE_TYPE: Value(U32, int(ftype)),
    } | ({
        Keys.arch(Keys.EXPERT_COUNT, a): Value(U32, c.n_expert),
        Keys.arch(Keys.EXPERT_USED_COUNT, a): Value(U32, c.n_expert_used),
    } if c.n_expert else {}) | ({  # Qwen3-MoE states the experts' width on its own
        Keys.arch(Keys.EXPERT_FEED_FORWARD_LENGTH, a): Value(U32, c.n_ff),
    } if c.arch == "qwen3moe" else {}) | ({
        Keys.arch(Keys.KEY_LENGTH, a): Value(U32, c.n_embd // c.n_head),
        Keys.arch(Keys.VALUE_LENGTH, a): Value(U32, c.n_embd // c.n_head),
        Keys.arch(Keys.SLIDING_WINDOW, a): Value(U32, c.sliding_window),
    } if c.arch.startswith("gemma") else {}) | ({
        Keys.arch(Keys.ATTN_LOGIT_SOFTCAPPING, a): Value(F32V, 50.0),
        Keys.arch(Keys.FINAL_LOGIT_SOFTCAPPING, a): Value(F32V, 30.0),
    } if c.arch == "gemma2" else {}) | ({
        Keys.arch(Keys.ROPE_SCALING_ORIG_CTX_LEN, a): Value(U32, c.longrope_ctx),
        Keys.arch(Keys.ROPE_SCALING_ATTN_FACTOR, a): Value(F32V, 1.19),
    } if c.longrope_ctx else {}) | ({
        Keys.arch(Keys.ROPE_SCALING_TYPE, a): Value(ValueType.STRING, "yarn"),
        Keys.arch(Keys.ROPE_SCALING_FACTOR, a): Value(F32V, c.yarn[0]),
        Keys.arch(Keys.ROPE_SCALING_ORIG_CTX_LEN, a): Value(U32, c.yarn[1]),
    } if c.yarn else {})


def write_synthetic_llama(path: str | os.PathLike, config: SynthConfig | None = None,
                          overwrite: bool = False) -> str:
    """Write a random llama model; 2-D weights in `config.dtype`, norms in F32. With
    `tokenizer_from`, the vocab of that model makes it loadable by llama.cpp and runnable."""
    c = config or SynthConfig()
    meta = metadata(c)
    if c.tokenizer_from:
        from dataclasses import replace

        from .gguf import GGUFReader

        src = GGUFReader(c.tokenizer_from)
        tok = {k: v for k, v in src.metadata.items() if k.startswith("tokenizer.")}
        c = replace(c, n_vocab=len(src.get(Keys.TOKENS)))
        meta = metadata(c) | tok
    tensors = []
    for i, (name, shape) in enumerate(tensor_shapes(c)):
        # norms and the expert router stay F32, as llama.cpp's converter keeps them
        t = GGMLType.F32 if len(shape) == 1 or "gate_inp" in name else c.dtype
        qt = get(t)
        tensors.append((TensorSpec(name, shape, t),
                        lambda i=i, name=name, shape=shape, qt=qt:
                        qt.quantize(_weights(c, i, name, shape))))
    write_gguf(path, meta, tensors, overwrite=overwrite)
    return os.fspath(path)
