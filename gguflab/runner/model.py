"""The forward pass, top to bottom: embeddings, then per layer RMSNorm -> attention (RoPE,
GQA, KV cache) -> RMSNorm -> SwiGLU, then the output head. What a family changes (NEOX RoPE,
q/k norms ...) is declared in `runner/families/` and read here as a few switches.

Weights stay memory-mapped in their quantized GGUF form; `matmul` dequantizes them on the
fly. Hyperparameters and conventions follow llama.cpp (F16 KV cache)."""

from __future__ import annotations

import ctypes
import os
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from ..gguf import GGMLType, GGUFReader, Keys, ReaderTensor
from ..jit.parallel import JOB_WORDS, default_threads, team
from .attention import SPLIT, TILE, TILED, OneQuery, flash_attn, key_ranges
from .attention import _kernels as attn_kernels
from .families import FAMILIES, Family, supported
from .kernels import _HALF_KINDS, Products, _act_kernels, get_rows, matmul, matmuls
from .ops import rms_norm, soft_max, swiglu
from .ops import tanh as ops_tanh
from .program import Program, f32_bits, store_f16
from .program import kernels as program_kernels
from .rope import RopeParams, rope_rotate, rope_table, yarn_attn_factor
from .rope import _kernels as rope_kernels
from .ubatch import UBatch


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
    family: Family
    n_expert: int = 0  # > 0: every layer's FFN is a mixture of experts
    n_expert_used: int = 0  # experts per token
    q_scale: float = 0.0  # attention scores are q.k times this
    n_swa: int = 0  # the sliding window of the local layers
    swa_layers: tuple[bool, ...] = ()  # which layers are local (sliding window)
    rope_base_swa: float = 0.0  # RoPE of the local layers
    rope_scale_swa: float = 1.0
    attn_softcap: float = 0.0  # 0: none
    final_softcap: float = 0.0
    rope_attn_factor: float = 1.0  # cos and sin times this (LongRoPE's attention factor)
    yarn_ext: float = 0.0  # YaRN: > 0 mixes in unscaled (extrapolated) rotation per pair
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    n_ctx_orig: int = 0  # the context the rope was trained for (LongRoPE picks its factors)

    @classmethod
    def from_gguf(cls, r: GGUFReader) -> HParams:
        arch = r.architecture
        if arch not in FAMILIES:
            raise UserError(f"{r.path}: architecture {arch!r} is not supported by the runner "
                            f"(supported: {supported()})")

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
        f, n_layer = FAMILIES[arch], int(hp(Keys.BLOCK_COUNT))
        rope_base = float(r.arch_get(Keys.ROPE_FREQ_BASE, 10000.0))
        rope_scale = 1.0 / factor if scaling in ("linear", "yarn") else 1.0
        n_swa, swa = 0, (False,) * n_layer
        if f.swa_pattern:  # as llama.cpp's load_swa_pattern
            n_swa = int(r.arch_get(Keys.SLIDING_WINDOW, f.swa_default) or 0)
            pattern = r.arch_get(Keys.SLIDING_WINDOW_PATTERN, f.swa_pattern)
            if isinstance(pattern, list):
                swa = tuple(bool(v) for v in pattern[:n_layer])
            elif n_swa > 0:
                pattern = int(pattern)
                swa = tuple(pattern == 0 or il % pattern < pattern - 1 for il in range(n_layer))
        q_dim = n_embd // n_head if f.big_model_layers == n_layer else head_dim
        return cls(
            arch=arch,
            n_vocab=int(r.arch_get(Keys.VOCAB_SIZE, len(tokens) if tokens is not None else 0)),
            n_embd=n_embd, n_layer=n_layer, n_head=n_head,
            n_head_kv=int(r.arch_get(Keys.HEAD_COUNT_KV, n_head)),
            n_ff=int(hp(Keys.FEED_FORWARD_LENGTH)), head_dim=head_dim,
            rope_dim=int(r.arch_get(Keys.ROPE_DIMENSION_COUNT, head_dim)),
            rope_base=rope_base, rope_scale=rope_scale,
            rope_neox=f.rope_neox,
            rms_eps=float(hp(Keys.LAYERNORM_RMS_EPS)),
            n_ctx_train=int(r.arch_get(Keys.CONTEXT_LENGTH, 2048)),
            family=FAMILIES[arch],
            n_expert=int(r.arch_get(Keys.EXPERT_COUNT, 0) or 0),
            n_expert_used=int(r.arch_get(Keys.EXPERT_USED_COUNT, 0) or 0),
            q_scale=float(np.float32(1.0) / np.sqrt(np.float32(q_dim))),
            n_swa=n_swa, swa_layers=swa,
            rope_base_swa=float(r.arch_get(Keys.ROPE_FREQ_BASE_SWA, 10000.0))
            if f.swa_own_rope else rope_base,
            rope_scale_swa=1.0 if f.swa_own_rope else rope_scale,
            attn_softcap=float(r.arch_get(Keys.ATTN_LOGIT_SOFTCAPPING, f.attn_softcap) or 0.0)
            if f.attn_softcap else 0.0,
            final_softcap=float(r.arch_get(Keys.FINAL_LOGIT_SOFTCAPPING, f.final_softcap)
                                or 0.0) if f.post_norms else 0.0,
            rope_attn_factor=float(r.arch_get(Keys.ROPE_SCALING_ATTN_FACTOR, 1.0) or 1.0),
            yarn_ext=float(r.arch_get(Keys.ROPE_SCALING_YARN_EXT_FACTOR, 1.0))
            if scaling == "yarn" else 0.0,
            yarn_beta_fast=float(r.arch_get(Keys.ROPE_SCALING_YARN_BETA_FAST, 32.0)),
            yarn_beta_slow=float(r.arch_get(Keys.ROPE_SCALING_YARN_BETA_SLOW, 1.0)),
            n_ctx_orig=int(r.arch_get(Keys.ROPE_SCALING_ORIG_CTX_LEN,
                                      r.arch_get(Keys.CONTEXT_LENGTH, 2048))),
        )


@dataclass
class Weight:
    """A weight as stored: raw rows (quantized) or floats, and its ggml type."""

    data: np.ndarray
    type: GGMLType
    name: str = ""  # the GGUF tensor it is (or is a row block of)

    @classmethod
    def of(cls, t: ReaderTensor) -> Weight:
        return cls(t.data if t.data.ndim > 1 else t.data.reshape(1, -1), t.type, t.name)

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
    q_norm: np.ndarray | None  # (head_dim,): qk_norm families
    k_norm: np.ndarray | None
    attn_post_norm: np.ndarray | None  # post_norms families (Gemma)
    ffn_post_norm: np.ndarray | None
    ffn_norm: np.ndarray
    w_gate: Weight | None  # the dense FFN, or
    w_up: Weight | None
    w_down: Weight | None
    experts: Experts | None = None  # a mixture of experts


@dataclass
class Experts:
    """A mixture-of-experts FFN: a softmax router over `n` experts picks `used` per token
    (their weights renormalised to sum to one), each a SwiGLU whose gate, up and down
    weights are stacked in 3-D tensors: `gate.data[e]` is expert e's matrix."""

    router: Weight  # ffn_gate_inp (n_expert, n_embd)
    gate: Weight
    up: Weight
    down: Weight
    used: int


class KVCache:
    """Keys and values of every layer for up to `n_ctx` positions, rounded to F16 as
    llama.cpp keeps them by default, but held as float32: numpy converts F16 one element at
    a time, which re-reading the whole context every token would pay. Laid out
    (layer, kv head, position, dim) so that each head's keys are one matrix. `n_layer`, when
    given, holds only the first layers: the others' cache is on the GPU that runs them."""

    def __init__(self, hp: HParams, n_ctx: int, n_layer: int | None = None):
        shape = (hp.n_layer if n_layer is None else n_layer, hp.n_head_kv, n_ctx, hp.head_dim)
        self.k = np.zeros(shape, np.float32)
        self.v = np.zeros(shape, np.float32)
        self.n_ctx = n_ctx
        self.n = 0  # positions filled

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


FLASH_ATTN = ("auto", "on", "off")  # llama.cpp's -fa; auto: on, as its CPU backend resolves it


def flash_attn_mode(value: str) -> str:
    """`value` checked as a -fa setting."""
    if value not in FLASH_ATTN:
        raise UserError(f"--flash-attn must be on, off or auto, got {value!r}")
    return value


class Model:
    # one of FLASH_ATTN; or "f32": ggml's f32 route (no fp16 V sums) for every batch, the
    # offloaded layers' arithmetic, for comparing the CPU with them
    flash_attn = "auto"

    def __init__(self, source: str | os.PathLike | GGUFReader, offload=None, n_ctx: int = 0):
        """The model in `source` (a path or an open reader). `offload`, an OffloadPlan
        (runner.offload), puts its last layers on a GPU with a KV cache of `n_ctx`."""
        self.reader = r = source if isinstance(source, GGUFReader) else GGUFReader(source)
        self.path = r.path
        self.gpu = None  # GpuLayers (runner/cuda) running the last layers
        self.hp = hp = HParams.from_gguf(r)
        names = {t.name for t in r.tensors}

        def w(name: str) -> Weight:
            if name not in names:
                raise UserError(f"{r.path}: missing tensor {name}")
            return Weight.of(r.tensor(name))

        def fused(name: str, *widths: int) -> list[Weight]:  # row blocks of one tensor
            whole, at, out = w(name), 0, []
            if whole.data.shape[0] != sum(widths):
                raise UserError(f"{r.path}: {name} has {whole.data.shape[0]} rows, "
                                f"expected {' + '.join(map(str, widths))}")
            for n in widths:
                out.append(Weight(whole.data[at:at + n], whole.type, whole.name))
                at += n
            return out

        def vec(name: str) -> np.ndarray | None:
            return w(name).vector() if name in names else None

        def norm(name: str, needed: bool) -> np.ndarray | None:  # a family's norm, else None
            return w(name).vector() if needed else None

        self.tok_embd = w("token_embd.weight")
        self.output = w("output.weight") if "output.weight" in names else self.tok_embd
        self.output_norm = vec("output_norm.weight")
        self.layers = []
        q_rows, kv_rows = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
        for i in range(hp.n_layer):
            p = f"blk.{i}."
            # Q, K, V (and gate, up) as llama.cpp takes them: separate, or row blocks of one
            # fused tensor (Phi-3's attn_qkv, and its ffn_up holding gate then up)
            wq, wk, wv = (fused(p + "attn_qkv.weight", q_rows, kv_rows, kv_rows)
                          if p + "attn_qkv.weight" in names else
                          (w(p + "attn_q.weight"), w(p + "attn_k.weight"), w(p + "attn_v.weight")))
            self.layers.append(Layer(
                attn_norm=vec(p + "attn_norm.weight"), wq=wq, wk=wk, wv=wv,
                wo=w(p + "attn_output.weight"), bq=vec(p + "attn_q.bias"),
                bk=vec(p + "attn_k.bias"), bv=vec(p + "attn_v.bias"),
                q_norm=norm(p + "attn_q_norm.weight", hp.family.qk_norm),
                k_norm=norm(p + "attn_k_norm.weight", hp.family.qk_norm),
                attn_post_norm=norm(p + "post_attention_norm.weight", hp.family.post_norms),
                ffn_post_norm=norm(p + "post_ffw_norm.weight", hp.family.post_norms),
                ffn_norm=vec(p + "ffn_norm.weight"),
                **self._ffn(p, w, fused, names, hp)))
        # rotary frequencies, as llama.cpp computes them (theta_i = base^(-2i/d)), divided by
        # the file's per-pair factors where it has them (LLaMA 3.1-style rope scaling)
        d = hp.rope_dim
        self.inv_freq = hp.rope_base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
        factors = self.rope_freqs = vec("rope_freqs.weight")
        if factors is not None:
            if factors.size != d // 2:
                raise UserError(f"{r.path}: rope_freqs.weight has {factors.size} factors, "
                                f"the rotary dimension {d} needs {d // 2}")
            self.inv_freq = self.inv_freq / factors.astype(np.float64)
        # the local (sliding window) layers' own RoPE (Gemma 3), else the same
        self.inv_freq_swa = hp.rope_base_swa ** (-np.arange(0, d, 2, dtype=np.float64) / d)
        # LongRoPE (Phi-3 128K): per-pair factors for contexts past the trained one, or not
        self.rope_long = vec("rope_factors_long.weight")
        self.rope_short = vec("rope_factors_short.weight")
        for f in (self.rope_long, self.rope_short):
            if f is not None and f.size != d // 2:
                raise UserError(f"{r.path}: rope factors for {f.size} pairs, need {d // 2}")
        if offload is not None and offload.on_gpu:
            from .cuda.layers import load_offload  # the device code only when it is used

            self.gpu = load_offload(self, offload, n_ctx)

    @staticmethod
    def _ffn(p: str, w, fused, names: set, hp: HParams) -> dict:
        """A layer's FFN weights: dense, or the experts' (stacked, with their router)."""
        if not hp.n_expert:
            if p + "ffn_gate.weight" not in names:  # gate and up fused in ffn_up (Phi-3)
                gate, up = fused(p + "ffn_up.weight", hp.n_ff, hp.n_ff)
                return dict(w_gate=gate, w_up=up, w_down=w(p + "ffn_down.weight"))
            return dict(w_gate=w(p + "ffn_gate.weight"), w_up=w(p + "ffn_up.weight"),
                        w_down=w(p + "ffn_down.weight"))
        if not 0 < hp.n_expert_used <= hp.n_expert:
            raise UserError(f"{hp.n_expert_used} experts used per token out of {hp.n_expert}")
        ex = Experts(w(p + "ffn_gate_inp.weight"), w(p + "ffn_gate_exps.weight"),
                     w(p + "ffn_up_exps.weight"), w(p + "ffn_down_exps.weight"),
                     hp.n_expert_used)
        for t in (ex.gate, ex.up, ex.down):
            if t.data.ndim != 3 or t.data.shape[0] != hp.n_expert:
                raise UserError(f"{p}ffn_*_exps: expected {hp.n_expert} stacked experts")
        return dict(w_gate=None, w_up=None, w_down=None, experts=ex)

    def new_cache(self, n_ctx: int) -> KVCache:
        """A KV cache for the layers the CPU runs (the offloaded ones keep theirs on the
        device)."""
        return KVCache(self.hp, n_ctx, self.hp.n_layer - self._n_gpu_layers())

    def rotary(self, n_ctx: int, local: bool = False) -> tuple[np.ndarray, float, float]:
        """(frequency per pair, position multiplier, cos/sin multiplier) of RoPE for a
        context of n_ctx, in float64 (the GPU path's table; the CPU takes `rope_params`)."""
        hp = self.hp
        if local:
            return self.inv_freq_swa, hp.rope_scale_swa, hp.rope_attn_factor
        inv = self.inv_freq
        if (f := self._longrope_factors(n_ctx)) is not None:
            inv = inv / f.astype(np.float64)
        if hp.yarn_ext:  # YaRN as ggml's rope_yarn: per pair, interpolated to extrapolated
            mix = yarn_ramp(hp) * hp.yarn_ext
            fs = hp.rope_scale
            return (inv * (fs * (1 - mix) + mix), 1.0,
                    hp.rope_attn_factor * (1 + 0.1 * np.log(1 / fs)))
        return inv, hp.rope_scale, hp.rope_attn_factor

    def _longrope_factors(self, n_ctx: int) -> np.ndarray | None:
        """LongRoPE's per-pair factors: the long ones when llama.cpp's context (padded to
        256) exceeds the trained one, else the short ones; None without them."""
        if self.rope_long is None or self.rope_short is None:
            return None
        return self.rope_long if -(-n_ctx // 256) * 256 > self.hp.n_ctx_orig else self.rope_short

    def rope_params(self, n_ctx: int, local: bool = False) -> RopeParams:
        """The arguments llama.cpp's graph gives ggml_rope_ext for a context of n_ctx, as
        float32 values computed the way llama.cpp computes them."""
        hp = self.hp
        scale = hp.rope_scale_swa if local else hp.rope_scale
        # llama.cpp stores 1.0f / factor (the file's float), not the double quotient
        fs = 1.0 if scale == 1.0 else float(np.float32(1) / np.float32(1.0 / scale))
        factors = None if local else (self.rope_freqs if self.rope_freqs is not None
                                      else self._longrope_factors(n_ctx))
        attn = (yarn_attn_factor(fs, hp.rope_attn_factor) if hp.yarn_ext
                else hp.rope_attn_factor)
        return RopeParams(
            n_dims=hp.rope_dim, neox=hp.rope_neox,
            freq_base=hp.rope_base_swa if local else hp.rope_base, freq_scale=fs,
            ext_factor=hp.yarn_ext, attn_factor=attn, beta_fast=hp.yarn_beta_fast,
            beta_slow=hp.yarn_beta_slow, n_ctx_orig=hp.n_ctx_orig,
            factors=None if factors is None else tuple(np.asarray(factors, np.float32)))

    def _n_gpu_layers(self) -> int:
        return len(self.gpu.layers) if self.gpu is not None else 0

    # -- the forward pass ----------------------------------------------------------------

    def forward(self, tokens: list[int] | np.ndarray, cache: KVCache,
                all_logits: bool = False, first: int = 0,
                out: np.ndarray | None = None) -> np.ndarray:
        """Run `tokens` at the next positions of `cache`; returns the logits of every token
        from `first` on (n_tok - first, n_vocab) when `all_logits`, else of the last one
        (n_vocab,). As llama.cpp does with the tokens whose logits it is not asked for, the
        rows before `first` leave the last layer after its attention (the KV cache still
        holds every token). `out` (float32, the logits' shape, contiguous rows): where to
        put them (a long run reuses one buffer rather than fault in fresh pages each call)."""
        hp = self.hp
        tokens = np.asarray(tokens, np.int64)
        n, p0 = len(tokens), cache.n
        if not 0 <= first < max(n, 1):
            raise UserError(f"first output row {first} out of range for {n} tokens")
        if p0 + n > cache.n_ctx:
            raise UserError(f"context full: {p0 + n} tokens do not fit in --ctx-size "
                            f"{cache.n_ctx}")
        if n == 0:
            raise UserError("nothing to evaluate: no tokens")
        if tokens.min() < 0 or tokens.max() >= hp.n_vocab:
            raise UserError(f"token id out of range [0, {hp.n_vocab})")
        pos = np.arange(p0, p0 + n)
        x = get_rows(self.tok_embd.data, self.tok_embd.type, tokens)
        if hp.family.embed_scale:
            x = x * np.sqrt(np.float32(hp.n_embd))
        gpu = self.gpu  # the last layers (and maybe the output) when offloaded
        n_cpu = hp.n_layer - self._n_gpu_layers()
        if cache.k.shape[0] < n_cpu:
            raise UserError(f"this KV cache holds {cache.k.shape[0]} layers but the CPU runs "
                            f"{n_cpu}: make it with new_cache after setting the offload")
        skip = first if all_logits else n - 1  # rows whose logits nobody asked for
        batch = self._ubatch(n, skip, cache) if n_cpu == hp.n_layer and n > 1 else None
        if n == 1 and self._decoder_fits(n_cpu):  # one token: the layers' steps prepared
            x = self._decoder(n_cpu).run(self, x[0], int(p0), cache)[None]
        elif batch is not None:  # a prompt's batch: the layers as one compiled program
            x = batch.run(self, x, int(p0), cache)
            skip = 0
        else:
            for il, L in enumerate(self.layers[:n_cpu]):
                h = rms_norm(x, L.attn_norm, hp.rms_eps)
                a = self.attention(il, L, h, pos, cache)
                if il == hp.n_layer - 1 and skip:
                    x, a = x[skip:], a[skip:]
                if L.attn_post_norm is not None:
                    a = rms_norm(a, L.attn_post_norm, hp.rms_eps)
                x = x + a
                h = rms_norm(x, L.ffn_norm, hp.rms_eps)
                f = moe_ffn(L.experts, h) if L.experts is not None else ffn(L, h, hp.family.gelu)
                if L.ffn_post_norm is not None:
                    f = rms_norm(f, L.ffn_post_norm, hp.rms_eps)
                x = x + f
        logits = None
        if n_cpu < hp.n_layer and n == 1 and gpu.output:  # layers and head in one device pass
            logits = gpu.forward_layers(x, p0, head=True)
        elif n_cpu < hp.n_layer:
            x = gpu.run(x, p0)
        cache.n = p0 + n
        if logits is None:
            x = x[-(n - skip):]
            if gpu is not None and gpu.output:
                logits = gpu.logits(x)
            else:
                h = rms_norm(x, self.output_norm, hp.rms_eps)
                if _observer is not None:
                    _observe((self.output,), h)
                if out is not None and all_logits and gpu is None:
                    logits = matmul(self.output.data, self.output.type, h, out=out)
                else:
                    logits = self.output @ h
        if hp.final_softcap:
            logits = softcap(logits, hp.final_softcap)
        if out is not None and logits is not out:
            out[...] = logits if all_logits else logits[0]
            return out
        return logits if all_logits else logits[0]

    def _decoder_fits(self, n_cpu: int) -> bool:
        """Whether one token's CPU layers can take the prepared steps of `_Decoder` (not
        while the products' inputs are watched, nor for experts or attention without flash
        attention, which take the general route)."""
        return (_observer is None and self.flash_attn != "off"
                and all(L.experts is None for L in self.layers[:n_cpu]))

    _decoders: dict | None = None
    _ubatches: dict | None = None
    use_ubatch = True  # (False: prompts take the general route; for tests)

    def _ubatch(self, n: int, skip: int, cache: KVCache) -> UBatch | None:
        """The compiled program of a batch of `n` tokens over a cache like `cache` (None
        where the general route must take it). The last two shapes are kept."""
        if (not self.use_ubatch or _observer is not None or n < TILE
                or cache.k.dtype != np.float32 or self.flash_attn == "off"):
            return None
        key = (n, skip, default_threads(), cache.k.shape, self.flash_attn)
        if self._ubatches is None:
            self._ubatches = {}
        found = self._ubatches.get(key)
        if found is None:
            found = UBatch(self, cache, n, skip, key[2])
            for old in list(self._ubatches)[:-1]:
                del self._ubatches[old]
            self._ubatches[key] = found
        return found if found.program is not None else None

    def _decoder(self, n_cpu: int) -> _Decoder:
        key = (default_threads(), n_cpu)
        if self._decoders is None:
            self._decoders = {}
        d = self._decoders.get(key)
        if d is None:
            d = self._decoders[key] = _Decoder(self, n_cpu, key[0])
        return d

    def attention(self, il: int, L: Layer, h: np.ndarray, pos: np.ndarray,
                  cache: KVCache) -> np.ndarray:
        hp = self.hp
        n, hd, n_kv = len(pos), hp.head_dim, hp.n_head_kv
        if _observer is not None:
            _observe((L.wq, L.wk, L.wv), h)
        q, k, v = matmuls([(L.wq.data, L.wq.type), (L.wk.data, L.wk.type),
                           (L.wv.data, L.wv.type)], h)
        if L.bq is not None:
            q, k, v = q + L.bq, k + L.bk, v + L.bv
        q, k = q.reshape(n, hp.n_head, hd), k.reshape(n, n_kv, hd)
        if L.q_norm is not None:  # each head normalised on its own
            q, k = rms_norm(q, L.q_norm, hp.rms_eps), rms_norm(k, L.k_norm, hp.rms_eps)
        local = bool(hp.swa_layers) and hp.swa_layers[il]
        q, k = self.rope(q, pos, local, cache.n_ctx), self.rope(k, pos, local, cache.n_ctx)
        p0 = int(pos[0])
        keys, vals = cache.k[il], cache.v[il]  # (n_kv, n_ctx, hd)
        store_f16(k, keys, p0)
        store_f16(v.reshape(n, n_kv, hd), vals, p0)
        if self.flash_attn != "off":  # llama.cpp's CPU flash attention
            route = TILED if self.flash_attn == "f32" else None  # None: ggml's choice
            out = flash_attn(q, keys, vals, int(p0), hp.q_scale, hp.attn_softcap,
                             hp.n_swa if local else 0, route)
        else:
            out = self._attention_no_fa(q, pos, keys, vals, local)
        if _observer is not None:
            _observe((L.wo,), out)
        return L.wo @ out

    def _attention_no_fa(self, q: np.ndarray, pos: np.ndarray, keys: np.ndarray,
                         vals: np.ndarray, local: bool) -> np.ndarray:
        """Attention as llama.cpp's graph computes it without flash attention, over `keys`
        and `vals` (n_kv, n_ctx, head_dim: the layer's whole cache), per query head: KQ, the
        F16 product of the head's keys with q (rounded to fp16, as an F16 weight's products
        take it); a soft cap as scale by 1/cap, tanhf, scale by cap; ggml's softmax of
        KQ * scale + mask; then the F16 product of V transposed with the probabilities.
        The products run over llama.cpp's view of the cache, padded to 256 cells (at most
        the cache): their sums' blocking depends on the length, the extra cells are
        masked."""
        hp = self.hp
        n, hd, n_kv = len(pos), hp.head_dim, hp.n_head_kv
        group = hp.n_head // n_kv
        t = int(pos[-1]) + 1
        view = min(keys.shape[1], max(256, -(-t // 256) * 256))
        seen = np.arange(view)[None, :]
        masked = pos[:, None] < seen
        if local:
            masked |= pos[:, None] - seen >= hp.n_swa
        cap = np.float32(hp.attn_softcap)
        out = np.empty((n, hp.n_head, hd), np.float32)
        for g in range(n_kv):
            kf = keys[g, :view].astype(np.float16)
            vt = np.ascontiguousarray(vals[g, :view].T, np.float16)
            for h in range(g * group, (g + 1) * group):
                kq = matmul(kf, GGMLType.F16, q[:, h])
                if cap:
                    kq = softcap(kq, cap)
                w = np.where(masked, np.float32(-np.inf), kq * np.float32(hp.q_scale))
                out[:, h] = matmul(vt, GGMLType.F16, soft_max(w))
        return out.reshape(n, hp.n_head * hd)

    def rope(self, x: np.ndarray, pos: np.ndarray, local: bool = False,
             n_ctx: int = 0) -> np.ndarray:
        """Rotate pairs of the first rope_dim dims by pos * theta_i: adjacent pairs for
        llama (llama.cpp's "normal" mode), halves for qwen2 (NEOX); `local`: with the
        sliding-window layers' own frequencies. ggml's rope op, bit for bit (runner/rope)."""
        return rope_rotate(x, self._rope_tables(pos, local, n_ctx), self.hp.rope_dim,
                           self.hp.rope_neox)

    _rope_memo: dict | None = None

    def _rope_tables(self, pos: np.ndarray, local: bool = False, n_ctx: int = 0
                     ) -> np.ndarray:
        """cos and sin of every rotary pair at `pos` (n, rope_dim), as ggml's rope caches
        them. Every layer rotates the same positions: the last are kept."""
        if self._rope_memo is None:
            self._rope_memo = {}
        key, memo = (int(pos[0]), len(pos), n_ctx), self._rope_memo.get(local, (None,))
        if memo[0] != key:
            memo = self._rope_memo[local] = (key, rope_table(self.rope_params(n_ctx, local),
                                                             pos))
        return memo[1]


def _addr(fn) -> int:
    """The address of a compiled function loaded as a ctypes function."""
    return ctypes.cast(fn, ctypes.c_void_p).value


class _Decoder:
    """One token through the CPU layers, with every buffer and product posted once: the same
    steps and kernels as `Model.forward`'s general route (the same bits, tested), without
    the per-call work of forty numpy steps and seven product set-ups a layer, which cost
    more than the arithmetic on a small model. The whole step runs as one compiled
    `Program` on the thread team (`run`); attention forced to f32 takes the steps one by
    one from Python (`_run_steps`)."""

    def __init__(self, m: Model, n_cpu: int, threads: int):
        hp = m.hp
        hd = hp.head_dim
        f32 = np.float32
        self.threads = threads
        self.x, self.h, self.a = (np.empty(hp.n_embd, f32) for _ in range(3))
        # q and k side by side, so that one call rotates both (RoPE takes each head alone)
        nq, nk = hp.n_head * hd, hp.n_head_kv * hd
        self.qk = np.empty(nq + nk, f32)
        self.qkr = np.empty((1, hp.n_head + hp.n_head_kv, hd), f32)
        self.q, self.k, self.v = self.qk[:nq], self.qk[nq:], np.empty(nk, f32)
        self.qr, self.kr = self.qkr[:, :hp.n_head], self.qkr[:, hp.n_head:]
        self.att = np.empty((1, nq), f32)
        self.attend = OneQuery(self.qr, self.att, hp.n_head_kv, hp.q_scale, hp.attn_softcap,
                               threads)
        self.steps = []
        self.rope_rows: dict[bool, np.ndarray] = {}  # the token's RoPE row, global and local
        ffn: dict[int, tuple[np.ndarray, ...]] = {}  # gate, up, act by FFN width
        for L in m.layers[:n_cpu]:
            n_ff = L.w_gate.data.shape[0]
            gate, up, act = ffn.setdefault(n_ff, tuple(np.empty(n_ff, f32) for _ in range(3)))
            self.steps.append((
                Products([(L.wq.data, L.wq.type), (L.wk.data, L.wk.type),
                          (L.wv.data, L.wv.type)], self.h, [self.q, self.k, self.v], threads),
                Products([(L.wo.data, L.wo.type)], self.att[0], [self.a], threads),
                Products([(L.w_gate.data, L.w_gate.type), (L.w_up.data, L.w_up.type)],
                         self.h, [gate, up], threads),
                Products([(L.w_down.data, L.w_down.type)], act, [self.a], threads),
                (gate, up, act)))

    def run(self, m: Model, x: np.ndarray, p0: int, cache: KVCache) -> np.ndarray:
        """x (n_embd,) at position p0 through the CPU layers; a new array."""
        if self.use_program:
            ranges = key_ranges(1, p0, cache.n_ctx, self.threads)
            prog = self._program(m, cache, bool(ranges))
            if prog is not None:
                self.x[...] = x
                pos = np.array([p0])
                for local, row in self.rope_rows.items():
                    row[...] = m._rope_tables(pos, local, cache.n_ctx)
                prog.run(team(self.threads), p0=p0, tpad=-(-(p0 + 1) // TILE) * TILE,
                         size=ranges)
                return self.x.copy()
        return self._run_steps(m, x, p0, cache)

    use_program = True  # (False: the steps one by one from Python, as before; for tests)

    def _program(self, m: Model, cache: KVCache, split: bool) -> Program | None:
        """This decoder's step as one `Program` over `cache` (None where the model needs a
        step the program does not take: a float-rounded x, attention forced to f32)."""
        if self._programs_for is None or self._programs_for() is not cache:
            self._programs_for, self._programs = weakref.ref(cache), {}
        if split not in self._programs:
            self._programs[split] = self._build_program(m, cache, split)
        return self._programs[split]

    _programs_for: weakref.ref | None = None

    def _build_program(self, m: Model, cache: KVCache, split: bool) -> Program | None:
        hp = m.hp
        if (not self.steps or m.flash_attn == "f32" or cache.k.dtype != np.float32
                or cache.k.shape[0] < len(self.steps)):
            return None
        hd, n_kv, n_head, n_ctx = hp.head_dim, hp.n_head_kv, hp.n_head, cache.n_ctx
        k = program_kernels()
        prog = Program()
        keep = prog.keep
        eps = f32_bits(hp.rms_eps)

        def arr(a):  # a float32 array the steps read by address
            a = np.ascontiguousarray(a, np.float32)
            keep.append(a)
            return a.ctypes.data

        def rounds(P) -> bool:  # x rounded as the products `P` read it
            for act, int_path, buf in P.rounds:
                if int_path or act in _HALF_KINDS:
                    prog.step(_addr(_act_kernels()[act]), id(P.x), 1, P.x.shape[0], id(buf))
                elif buf is not P.x:
                    return False
            return True

        def products(P):
            prog.parallel(np.frombuffer(P.table.buf, np.int64, P.n_jobs * JOB_WORDS)
                          .reshape(-1, JOB_WORDS))

        def residual(L):
            if L.ffn_post_norm is not None:
                prog.step(k["rms_norm_step"], self.a.ctypes.data, arr(L.ffn_post_norm),
                          self.a.ctypes.data, 1, hp.n_embd, eps)
            prog.step(k["add_step"], self.x.ctypes.data, self.a.ctypes.data,
                      self.x.ctypes.data, hp.n_embd)

        X, h, a = self.x.ctypes.data, self.h.ctypes.data, self.a.ctypes.data
        att = self.att.ctypes.data
        rope_fn = _addr(rope_kernels()["rope_rotate"])
        attn = attn_kernels()
        reduce_fn = _addr(attn["reduce"])
        q_args = self.attend.args
        rows = n_head
        parts = min(rows, 4 * self.threads) if self.threads > 1 else 1
        n_ranges = self.threads
        partials = np.empty(n_head * n_ranges * (hd + 2), np.float32)
        keep.append(partials)
        for il, (L, step) in enumerate(zip(m.layers, self.steps)):
            qkv, wo, gate_up, down, (g, u, act) = step
            if il:
                residual(m.layers[il - 1])
            prog.step(k["rms_norm_step"], X, arr(L.attn_norm), h, 1, hp.n_embd, eps)
            if not rounds(qkv):
                return None
            products(qkv)
            if L.bq is not None:
                for vec, bias in ((self.q, L.bq), (self.k, L.bk), (self.v, L.bv)):
                    prog.step(k["add_step"], vec.ctypes.data, arr(bias), vec.ctypes.data,
                              vec.size)
            if L.q_norm is not None:
                prog.step(k["rms_norm_step"], self.q.ctypes.data, arr(L.q_norm),
                          self.q.ctypes.data, n_head, hd, eps)
                prog.step(k["rms_norm_step"], self.k.ctypes.data, arr(L.k_norm),
                          self.k.ctypes.data, n_kv, hd, eps)
            local = bool(hp.swa_layers) and hp.swa_layers[il]
            table = self.rope_rows.setdefault(local, np.empty((1, hp.rope_dim), np.float32))
            prog.step(rope_fn, self.qk.ctypes.data, self.qkr.ctypes.data, table.ctypes.data,
                      1, n_head + n_kv, hd, hp.rope_dim, int(hp.rope_neox))
            keys, vals = cache.k[il], cache.v[il]
            for src, dst in ((self.kr.ctypes.data, keys), (self.v.ctypes.data, vals)):
                w = prog.step(k["store_f16_step"], src, 0, n_kv, hd, n_ctx * hd, hd)
                prog.vary("p0", w, 2, dst.ctypes.data, 4 * hd)
            args = list(q_args)
            args[1], args[2], args[9] = keys.ctypes.data, vals.ctypes.data, n_ctx * hd
            args[12] = hp.n_swa if local else 0
            part = attn["attn_f32"]
            if split:
                args[4], args[5] = partials.ctypes.data, n_ranges | SPLIT << 32
                w = prog.job(part, min(n_ranges * n_head, 4 * self.threads), *args)
                prog.vary("size", w, 2 + 10)
                prog.vary("p0", w, 2 + 11)
                prog.step(reduce_fn, partials.ctypes.data, att, n_head, n_ranges, hd)
            else:
                w = prog.job(part, parts, *args)
                prog.vary("tpad", w, 2 + 10)
                prog.vary("p0", w, 2 + 11)
            if not rounds(wo):
                return None
            products(wo)
            if L.attn_post_norm is not None:
                prog.step(k["rms_norm_step"], a, arr(L.attn_post_norm), a, 1, hp.n_embd, eps)
            prog.step(k["add_step"], X, a, X, hp.n_embd)
            prog.step(k["rms_norm_step"], X, arr(L.ffn_norm), h, 1, hp.n_embd, eps)
            if not rounds(gate_up):
                return None
            products(gate_up)
            if hp.family.gelu:
                prog.step(k["geglu_step"], g.ctypes.data, u.ctypes.data, act.ctypes.data,
                          g.size, gelu_table().ctypes.data)
            else:
                prog.step(k["swiglu_step"], g.ctypes.data, u.ctypes.data, act.ctypes.data,
                          g.size)
            if not rounds(down):
                return None
            products(down)
        residual(m.layers[len(self.steps) - 1])
        keep.append(cache)  # (the program is dropped with the cache: see `_program`)
        return prog.build()

    def _run_steps(self, m: Model, x: np.ndarray, p0: int, cache: KVCache) -> np.ndarray:
        hp, eps = m.hp, m.hp.rms_eps
        n_kv, hd = hp.n_head_kv, hp.head_dim
        pos = np.array([p0])
        X, h, a, q, k, v = self.x, self.h, self.a, self.q, self.k, self.v
        X[...] = x
        q3, k3 = q.reshape(1, hp.n_head, hd), k.reshape(1, n_kv, hd)
        qk3 = self.qk.reshape(1, hp.n_head + n_kv, hd)
        for il, (L, step) in enumerate(zip(m.layers, self.steps)):
            qkv, wo, gate_up, down, (g, u, act) = step
            rms_norm(X, L.attn_norm, eps, out=h)
            qkv.run()
            if L.bq is not None:
                q += L.bq
                k += L.bk
                v += L.bv
            if L.q_norm is not None:
                rms_norm(q3, L.q_norm, eps, out=q3)
                rms_norm(k3, L.k_norm, eps, out=k3)
            local = bool(hp.swa_layers) and hp.swa_layers[il]
            table = m._rope_tables(pos, local, cache.n_ctx)
            rope_rotate(qk3, table, hp.rope_dim, hp.rope_neox, out=self.qkr)
            keys, vals = cache.k[il], cache.v[il]
            keys[:, p0] = self.kr[0].astype(np.float16)
            vals[:, p0] = v.reshape(n_kv, hd).astype(np.float16)
            if m.flash_attn == "f32":  # (forced onto the tiled route)
                flash_attn(self.qr, keys, vals, p0, hp.q_scale, hp.attn_softcap,
                           hp.n_swa if local else 0, TILED, self.threads, out=self.att)
            else:
                self.attend.run(keys, vals, p0, hp.n_swa if local else 0)
            wo.run()
            if L.attn_post_norm is not None:
                rms_norm(a, L.attn_post_norm, eps, out=a)
            X += a
            rms_norm(X, L.ffn_norm, eps, out=h)
            gate_up.run()
            if hp.family.gelu:
                act[...] = gelu_ggml(g) * u
            else:
                swiglu(g, u, out=act)
            down.run()
            if L.ffn_post_norm is not None:
                rms_norm(a, L.ffn_post_norm, eps, out=a)
            X += a
        return X.copy()


# -- watching the products' inputs (llama-imatrix's callback) ---------------------------------

# fn(weight name, input rows (n_tok, n_in) float32, expert index or None): None costs nothing
_observer: Callable[[str, np.ndarray, int | None], None] | None = None


@contextmanager
def observe_inputs(fn: Callable[[str, np.ndarray, int | None], None]) -> Iterator[None]:
    """While active, `fn(name, x, expert)` sees the input rows of every product the CPU
    forward pass makes with a named weight, once per weight per pass (Q, K and V fused in
    one tensor: once); for stacked experts `expert` is the index and `x` the rows routed to
    it, ordered by routing slot then token as llama.cpp's MUL_MAT_ID walks them."""
    global _observer
    prev, _observer = _observer, fn
    try:
        yield
    finally:
        _observer = prev


def _observe(weights: tuple[Weight, ...], x: np.ndarray, expert: int | None = None) -> None:
    seen = set()
    for w in weights:
        if w.name and w.name not in seen:
            seen.add(w.name)
            _observer(w.name, x, expert)


def yarn_ramp(hp: HParams) -> np.ndarray:
    """YaRN's per-pair ramp (1: extrapolate, 0: interpolate) between the correction dims
    of beta_fast and beta_slow rotations over the original context (ggml's corr_dims)."""
    d = hp.rope_dim

    def corr(n_rot: float) -> float:
        return d * np.log(hp.n_ctx_orig / (n_rot * 2 * np.pi)) / (2 * np.log(hp.rope_base))

    low = max(0.0, float(np.floor(corr(hp.yarn_beta_fast))))
    high = min(d - 1.0, float(np.ceil(corr(hp.yarn_beta_slow))))
    y = (np.arange(d // 2) - low) / max(0.001, high - low)
    return 1 - np.clip(y, 0, 1)


def ffn(L: Layer, h: np.ndarray, gelu: bool = False) -> np.ndarray:
    """SwiGLU: down(silu(gate(h)) * up(h)); or GeGLU, with GELU for SiLU."""
    if _observer is not None:
        _observe((L.w_gate, L.w_up), h)
    gate, up = matmuls([(L.w_gate.data, L.w_gate.type), (L.w_up.data, L.w_up.type)], h)
    act = gelu_ggml(gate) * up if gelu else swiglu(gate, up)
    if _observer is not None:
        _observe((L.w_down,), act)
    return L.w_down @ act


def softcap(x: np.ndarray, cap: float) -> np.ndarray:
    """cap * tanh(x / cap), as llama.cpp applies it: scale by the float 1 / cap, libm's
    tanhf, scale by cap."""
    c = np.float32(cap)
    return ops_tanh(x * (np.float32(1) / c)) * c


_GELU: np.ndarray | None = None


def gelu_ggml(x: np.ndarray) -> np.ndarray:
    """GELU (tanh form) as ggml's CPU computes it: looked up by x rounded to fp16 in a table
    of fp16 results, 0 below -10 and x above 10."""
    y = gelu_table()[x.astype(np.float16).view(np.uint16)]
    return np.where(x <= -10, np.float32(0), np.where(x >= 10, x, y))


def gelu_table() -> np.ndarray:
    """ggml's GELU table: float32 (65536,), the result for each fp16 bit pattern."""
    global _GELU
    if _GELU is None:
        f = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
        f = f.astype(np.float32)
        with np.errstate(all="ignore"):
            inner = np.float32(0.7978845608028654) * f * (
                np.float32(1) + np.float32(0.044715) * f * f)
            # tanhf's float, near -1 all that is left of GELU for negative x: numpy's float32
            # tanh is off by an ulp there, so round the double one
            t = np.tanh(inner.astype(np.float64)).astype(np.float32)
            g = np.float32(0.5) * f * (np.float32(1) + t)
        _GELU = g.astype(np.float16).astype(np.float32)
    return _GELU


def moe_ffn(ex: Experts, h: np.ndarray) -> np.ndarray:
    """The experts' SwiGLUs, weighted: each token's `used` most probable experts under the
    router's softmax, their probabilities renormalised (llama.cpp's build_moe_ffn with
    softmax gating and norm_w). Each expert runs once over the tokens routed to it."""
    if _observer is not None:
        _observe((ex.router,), h)
    logits = ex.router @ h  # (n_tok, n_expert)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = np.argsort(-p, axis=-1, kind="stable")[:, :ex.used]
    w = np.take_along_axis(p, top, -1)
    w /= w.sum(-1, keepdims=True)
    out = np.zeros_like(h)
    for e in np.unique(top):
        rows, slot = np.nonzero(top == e)
        x = np.ascontiguousarray(h[rows])
        gate, up = matmuls([(ex.gate.data[e], ex.gate.type), (ex.up.data[e], ex.up.type)], x)
        act = swiglu(gate, up)
        if _observer is not None:  # in llama.cpp's order: by expert slot, then token
            order = np.lexsort((rows, slot))
            _observe((ex.gate, ex.up), x[order], int(e))
            _observe((ex.down,), act[order], int(e))
        y = matmul(ex.down.data[e], ex.down.type, act)
        out[rows] += w[rows, slot, None] * y
    return out
