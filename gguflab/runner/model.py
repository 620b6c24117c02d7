"""The llama-family forward pass, top to bottom: embeddings, then per layer RMSNorm ->
attention (RoPE, GQA, KV cache) -> RMSNorm -> SwiGLU, then the output head.

Weights stay memory-mapped in their quantized GGUF form; `matmul` dequantizes them on the
fly. Hyperparameters and conventions follow llama.cpp (normal RoPE for llama, NEOX for
qwen2; F16 KV cache)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from ..gguf import GGMLType, GGUFReader, Keys, ReaderTensor
from .kernels import get_rows, matmul

SUPPORTED_ARCHS = {"llama": False, "qwen2": True}  # arch -> NEOX-style RoPE


@dataclass(frozen=True)
class HParams:
    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    head_dim: int
    rope_dim: int
    rope_base: float
    rope_scale: float  # position multiplier (1 / linear scaling factor)
    rope_neox: bool
    rms_eps: float
    n_ctx_train: int

    @classmethod
    def from_gguf(cls, r: GGUFReader) -> HParams:
        arch = r.architecture
        if arch not in SUPPORTED_ARCHS:
            raise UserError(f"{r.path}: architecture {arch!r} is not supported by the runner "
                            f"(supported: {', '.join(SUPPORTED_ARCHS)})")

        def hp(key, default=None):
            v = r.arch_get(key, default)
            if v is None:
                raise UserError(f"{r.path}: missing {Keys.arch(key, arch)}")
            return v

        n_embd, n_head = int(hp(Keys.EMBEDDING_LENGTH)), int(hp(Keys.HEAD_COUNT))
        head_dim = int(r.arch_get(Keys.KEY_LENGTH, n_embd // n_head))
        tokens = r.get(Keys.TOKENS)
        scaling = r.arch_get(Keys.ROPE_SCALING_TYPE)
        factor = float(r.arch_get(Keys.ROPE_SCALING_FACTOR, 1.0) or 1.0)
        return cls(
            arch=arch,
            n_vocab=int(r.arch_get(Keys.VOCAB_SIZE, len(tokens) if tokens is not None else 0)),
            n_embd=n_embd, n_layer=int(hp(Keys.BLOCK_COUNT)), n_head=n_head,
            n_head_kv=int(r.arch_get(Keys.HEAD_COUNT_KV, n_head)),
            n_ff=int(hp(Keys.FEED_FORWARD_LENGTH)), head_dim=head_dim,
            rope_dim=int(r.arch_get(Keys.ROPE_DIMENSION_COUNT, head_dim)),
            rope_base=float(r.arch_get(Keys.ROPE_FREQ_BASE, 10000.0)),
            rope_scale=1.0 / factor if scaling == "linear" else 1.0,
            rope_neox=SUPPORTED_ARCHS[arch],
            rms_eps=float(hp(Keys.LAYERNORM_RMS_EPS)),
            n_ctx_train=int(r.arch_get(Keys.CONTEXT_LENGTH, 2048)),
        )


@dataclass
class Weight:
    """A weight as stored: raw rows (quantized) or floats, and its ggml type."""

    data: np.ndarray
    type: GGMLType

    @classmethod
    def of(cls, t: ReaderTensor) -> Weight:
        return cls(t.data if t.data.ndim > 1 else t.data.reshape(1, -1), t.type)

    def __matmul__(self, x: np.ndarray) -> np.ndarray:  # W @ x  ==  x @ W.T
        return matmul(self.data, self.type, x)

    def vector(self) -> np.ndarray:
        return get_rows(self.data, self.type, np.array([0]))[0]


@dataclass
class Layer:
    attn_norm: np.ndarray
    wq: Weight
    wk: Weight
    wv: Weight
    wo: Weight
    bq: np.ndarray | None
    bk: np.ndarray | None
    bv: np.ndarray | None
    ffn_norm: np.ndarray
    w_gate: Weight
    w_up: Weight
    w_down: Weight


class KVCache:
    """Keys and values of every layer for up to `n_ctx` positions, in F16 as llama.cpp keeps
    them by default."""

    def __init__(self, hp: HParams, n_ctx: int):
        shape = (hp.n_layer, n_ctx, hp.n_head_kv, hp.head_dim)
        self.k = np.zeros(shape, np.float16)
        self.v = np.zeros(shape, np.float16)
        self.n_ctx = n_ctx
        self.n = 0  # positions filled

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class Model:
    def __init__(self, path: str | os.PathLike):
        self.reader = r = GGUFReader(path)
        self.path = r.path
        self.hp = hp = HParams.from_gguf(r)
        names = {t.name for t in r.tensors}

        def w(name: str) -> Weight:
            if name not in names:
                raise UserError(f"{r.path}: missing tensor {name}")
            return Weight.of(r.tensor(name))

        def vec(name: str) -> np.ndarray | None:
            return w(name).vector() if name in names else None

        self.tok_embd = w("token_embd.weight")
        self.output = w("output.weight") if "output.weight" in names else self.tok_embd
        self.output_norm = vec("output_norm.weight")
        self.layers = []
        for i in range(hp.n_layer):
            p = f"blk.{i}."
            self.layers.append(Layer(
                attn_norm=vec(p + "attn_norm.weight"), wq=w(p + "attn_q.weight"),
                wk=w(p + "attn_k.weight"), wv=w(p + "attn_v.weight"),
                wo=w(p + "attn_output.weight"), bq=vec(p + "attn_q.bias"),
                bk=vec(p + "attn_k.bias"), bv=vec(p + "attn_v.bias"),
                ffn_norm=vec(p + "ffn_norm.weight"), w_gate=w(p + "ffn_gate.weight"),
                w_up=w(p + "ffn_up.weight"), w_down=w(p + "ffn_down.weight")))
        # rotary frequencies, as llama.cpp computes them (theta_i = base^(-2i/d))
        d = hp.rope_dim
        self.inv_freq = hp.rope_base ** (-np.arange(0, d, 2, dtype=np.float64) / d)

    def new_cache(self, n_ctx: int) -> KVCache:
        return KVCache(self.hp, n_ctx)

    # -- the forward pass ----------------------------------------------------------------

    def forward(self, tokens: list[int] | np.ndarray, cache: KVCache,
                all_logits: bool = False) -> np.ndarray:
        """Run `tokens` at the next positions of `cache`; returns the logits of every token
        (n_tok, n_vocab) when `all_logits`, else of the last one (n_vocab,)."""
        hp = self.hp
        tokens = np.asarray(tokens, np.int64)
        n, p0 = len(tokens), cache.n
        if p0 + n > cache.n_ctx:
            raise UserError(f"context full: {p0 + n} tokens do not fit in --ctx-size "
                            f"{cache.n_ctx}")
        if n == 0:
            raise UserError("nothing to evaluate: no tokens")
        if tokens.min() < 0 or tokens.max() >= hp.n_vocab:
            raise UserError(f"token id out of range [0, {hp.n_vocab})")
        pos = np.arange(p0, p0 + n)
        x = get_rows(self.tok_embd.data, self.tok_embd.type, tokens)
        for il, L in enumerate(self.layers):
            h = rms_norm(x, L.attn_norm, hp.rms_eps)
            x = x + self.attention(il, L, h, pos, cache)
            h = rms_norm(x, L.ffn_norm, hp.rms_eps)
            x = x + L.w_down @ (silu(L.w_gate @ h) * (L.w_up @ h))
        cache.n = p0 + n
        if not all_logits:
            x = x[-1:]
        logits = self.output @ rms_norm(x, self.output_norm, hp.rms_eps)
        return logits if all_logits else logits[0]

    def attention(self, il: int, L: Layer, h: np.ndarray, pos: np.ndarray,
                  cache: KVCache) -> np.ndarray:
        hp = self.hp
        n, hd = len(pos), hp.head_dim
        q = (L.wq @ h + (L.bq if L.bq is not None else 0)).reshape(n, hp.n_head, hd)
        k = (L.wk @ h + (L.bk if L.bk is not None else 0)).reshape(n, hp.n_head_kv, hd)
        v = (L.wv @ h + (L.bv if L.bv is not None else 0)).reshape(n, hp.n_head_kv, hd)
        q, k = self.rope(q, pos), self.rope(k, pos)
        p0 = pos[0]
        cache.k[il, p0:p0 + n] = k
        cache.v[il, p0:p0 + n] = v
        keys = cache.k[il, : p0 + n].astype(np.float32)  # (T, n_kv, hd)
        vals = cache.v[il, : p0 + n].astype(np.float32)
        group = hp.n_head // hp.n_head_kv
        qg = q.reshape(n, hp.n_head_kv, group, hd)
        scores = np.einsum("nkgd,tkd->kgnt", qg, keys) * np.float32(1 / np.sqrt(hd))
        causal = pos[:, None] < np.arange(p0 + n)[None, :]  # future positions
        scores = np.where(causal, -np.inf, scores)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        out = np.einsum("kgnt,tkd->nkgd", scores, vals).reshape(n, hp.n_head * hd)
        return L.wo @ np.ascontiguousarray(out, np.float32)

    def rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Rotate pairs of the first rope_dim dims by pos * theta_i: adjacent pairs for
        llama (llama.cpp's "normal" mode), halves for qwen2 (NEOX)."""
        hp = self.hp
        d = hp.rope_dim
        ang = (pos[:, None] * hp.rope_scale) * self.inv_freq[None, :]  # (n, d/2)
        cos = np.cos(ang).astype(np.float32)[:, None, :]
        sin = np.sin(ang).astype(np.float32)[:, None, :]
        out = x.copy()
        if hp.rope_neox:
            a, b = x[..., : d // 2], x[..., d // 2: d]
            out[..., : d // 2] = a * cos - b * sin
            out[..., d // 2: d] = a * sin + b * cos
        else:
            a, b = x[..., 0:d:2], x[..., 1:d:2]
            out[..., 0:d:2] = a * cos - b * sin
            out[..., 1:d:2] = a * sin + b * cos
        return out


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    ms = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
    return (x / np.sqrt(ms + np.float32(eps))) * w


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1) + np.exp(-x))
