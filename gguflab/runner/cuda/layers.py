"""The offloaded part of the forward pass: the last N layers (and maybe the output head)
with their weights and KV cache on a device.

`GpuLayers` uploads the weights of its layers once, keeps their F16 KV cache and a table of
RoPE angles on the device, and runs `forward_layers(x, p0)`: the hidden states go to the
device once at the boundary, come back once, and everything in between runs as kernels.
`forward_offloaded` is `Model.forward` with that split.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ...errors import UserError
from ...gguf import GGMLType
from ...quant import get as quant_type
from ..model import KVCache, Model, Weight
from ..offload import HOST_GPU_NAME, MAX_BATCH
from . import kernels as K
from .device import Device

__all__ = ["MAX_BATCH", "GpuLayers", "forward_offloaded", "load_offload", "round_code"]

# an input already rounded by the kernel that wrote it: (rounding code, where), or None
Rounded = tuple[int, int] | None


def round_code(t: GGMLType) -> int | None:
    """How products over weights of type t round their input (a `K.round_code`), None
    where they read it as it is."""
    return K.round_code(quant_type(t).activation_type)


@dataclass(frozen=True)
class DeviceWeight:
    """A weight's raw rows on the device, and what the product kernels need to walk them."""

    ptr: int
    type: GGMLType
    n_out: int
    n_in: int
    row_bytes: int

    @property
    def n_blocks(self) -> int:
        return self.n_in // K.virtual_block(self.type)


@dataclass(frozen=True)
class DeviceExperts:
    """A stacked 3-D expert weight on the device: `weight` walks one expert (its n_out rows),
    the kernels step `expert_bytes` to the one the router picked."""

    weight: DeviceWeight
    expert_bytes: int


@dataclass(frozen=True)
class DeviceMoE:
    router: DeviceWeight  # ffn_gate_inp (n_expert, n_embd)
    gate: DeviceExperts
    up: DeviceExperts
    down: DeviceExperts
    n_expert: int
    used: int


@dataclass(frozen=True)
class Run:
    """Weights of one type that read the same input, uploaded as one matrix (their rows one
    after another): a one-token product over them is one launch whose outputs come out one
    after another, as the activation buffers lay them out."""

    fused: DeviceWeight
    parts: tuple[DeviceWeight, ...]


@dataclass(frozen=True)
class DeviceLayer:
    attn_norm: int
    qkv: tuple[Run, ...]  # Q, K, V in runs of one type
    wo: DeviceWeight
    bias: int | None  # bq, bk, bv one after another (qwen2)
    qk_norm: tuple[int, int] | None  # q's and k's per-head norm weights (qwen3)
    post_norms: tuple[int, int] | None  # the attention's and the FFN's output norms (Gemma)
    local: bool  # a sliding-window layer (Gemma): its own window and rotary table
    moe: DeviceMoE | None  # a mixture-of-experts FFN
    ffn_norm: int
    gate_up: tuple[Run, ...]  # the dense FFN, or () with `moe`
    w_down: DeviceWeight | None
    k_cache: int  # (n_ctx, n_head_kv, head_dim) f16
    v_cache: int


def graphs_enabled() -> bool:
    """Decode steps are recorded once and replayed (a CUDA graph) unless
    GGUFLAB_CUDA_GRAPHS=0, as llama.cpp's GGML_CUDA_DISABLE_GRAPHS turns them off."""
    return os.environ.get("GGUFLAB_CUDA_GRAPHS", "1").strip() not in ("0", "off", "no", "")


class GpuLayers:
    """Layers `layers` of `model` (and the output head when `output`) resident on `device`
    for a context of `n_ctx` positions.

    A pass launches, per layer: RMSNorm (fused with the residual add before it), the Q/K/V
    products (one launch per run of one weight type when decoding), RoPE, the f16 KV store,
    attention, the output product, the FFN's norm, gate/up, SwiGLU and down. Every product
    reads its input rounded as the CPU's product over that weight type rounds it (the
    type's `activation_type`: Q8_0/Q8_1, Q8_K, F16 or BF16; F32 reads x as it is), for any
    number of tokens, so the device computes what the CPU computes: the norms and SwiGLU
    write that rounded copy beside their output, other inputs are rounded by a launch. The
    position lives in device memory, so a decode step's launches are the same for every
    token: after one direct step they are recorded once and replayed as one graph per
    token."""

    def __init__(self, model: Model, layers: Sequence[int], n_ctx: int, device: Device,
                 output: bool = False):
        hp = model.hp
        self.model, self.device, self.hp, self.n_ctx = model, device, hp, n_ctx
        self.layers = sorted(layers)
        if self.layers and self.layers != list(range(self.layers[0], hp.n_layer)):
            raise UserError(f"offloaded layers must be the last ones, got {self.layers}")
        self.output = output
        self.bytes_uploaded = 0
        self._codes: set[int] = set()  # the roundings the uploaded weights' products need
        kv_bytes = n_ctx * hp.n_head_kv * hp.head_dim * 2
        self.dev_layers: dict[int, DeviceLayer] = {}
        for il in self.layers:
            L = model.layers[il]
            biases = (L.bq, L.bk, L.bv)
            self.dev_layers[il] = DeviceLayer(
                attn_norm=self._vector(L.attn_norm), qkv=self._runs([L.wq, L.wk, L.wv]),
                wo=self._weight(L.wo),
                bias=None if any(v is None for v in biases) else self._vector(
                    np.concatenate(biases)),
                qk_norm=None if L.q_norm is None else (self._vector(L.q_norm),
                                                       self._vector(L.k_norm)),
                post_norms=None if L.attn_post_norm is None else (
                    self._vector(L.attn_post_norm), self._vector(L.ffn_post_norm)),
                local=bool(hp.swa_layers) and hp.swa_layers[il],
                moe=None if L.experts is None else DeviceMoE(
                    self._weight(L.experts.router), self._experts(L.experts.gate),
                    self._experts(L.experts.up), self._experts(L.experts.down),
                    hp.n_expert, L.experts.used),
                ffn_norm=self._vector(L.ffn_norm),
                gate_up=() if L.experts is not None else self._runs([L.w_gate, L.w_up]),
                w_down=None if L.experts is not None else self._weight(L.w_down),
                k_cache=device.alloc(kv_bytes), v_cache=device.alloc(kv_bytes))
        if output:
            self.out_norm = self._vector(model.output_norm)
            self.out_weight = self._weight(model.output)
        # (cos, sin) of every position and rotary pair, from the CPU path's frequencies
        self.rope_table = self._upload(self._rotary_table(model, n_ctx, False))
        self.rope_table_local = self.rope_table
        if any(d.local for d in self.dev_layers.values()):
            self.rope_table_local = self._upload(self._rotary_table(model, n_ctx, True))
        self.pos = device.alloc(8)  # the position of the pass's first token (an i64)
        self.cap = min(n_ctx, MAX_BATCH)  # tokens per pass: the plan's scratch
        q, kv = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
        sizes = {"x": hp.n_embd, "h": hp.n_embd, "o": hp.n_embd, "qkv": q + 2 * kv,
                 "att": q, "gu": 2 * hp.n_ff}
        if output:
            sizes["logits"] = self.out_weight.n_out
        moes = [d.moe for d in self.dev_layers.values() if d.moe is not None]
        if moes:  # router logits, picked ids (i64) and weights, an expert's gate/up and output
            ff = max(m.gate.weight.n_out for m in moes)
            sizes |= {"moe_logits": hp.n_expert, "moe_ids": 2 * moes[0].used,
                      "moe_w": moes[0].used, "moe_gu": 2 * ff, "moe_y": hp.n_embd}
        self.buf = {k: device.alloc(4 * self.cap * v) for k, v in sizes.items()}
        # the rounded inputs of the products: one buffer per rounding the weights need
        self._xq_floats = self.cap * max(hp.n_embd, q, hp.n_ff,
                                         *(m.gate.weight.n_out for m in moes))
        self.xq: dict[int, int] = {}
        for code in sorted(self._codes):
            self._xq(code)
        self.graphs = graphs_enabled()
        self.graph_error = ""  # why recording failed, when it did (then steps run directly)
        self._graphs: dict[bool, object] = {}  # decode step recordings: with the head or not
        self._warm: set[bool] = set()  # which have run directly once (their kernels loaded)
        self.launches = 0  # kernels launched (a replayed graph counts as one)

    # -- setup -------------------------------------------------------------------------

    @staticmethod
    def _rotary_table(model: Model, n_ctx: int, local: bool) -> np.ndarray:
        inv_freq, scale, mscale = model.rotary(n_ctx, local)
        ang = (np.arange(n_ctx)[:, None] * scale) * inv_freq[None, :]
        table = np.stack([np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)], -1)
        return table * np.float32(mscale) if mscale != 1.0 else table

    def _upload(self, arr: np.ndarray) -> int:
        self.bytes_uploaded += arr.nbytes
        return self.device.upload(arr)

    def _vector(self, v: np.ndarray | None) -> int | None:
        return None if v is None else self._upload(np.ascontiguousarray(v, np.float32))

    def _raw(self, w: Weight) -> tuple[np.ndarray, int]:
        """w's rows as bytes, checked for the kernels, and its row length in weights."""
        if w.type not in K.WEIGHT_TYPES:
            raise UserError(f"the GPU backend has no kernels for {w.type.name} weights")
        raw = np.ascontiguousarray(w.data)
        raw = raw.view(np.uint8).reshape(raw.shape[0], -1)
        info = quant_type(w.type).info
        n_in = raw.shape[1] // info.type_size * info.block_size
        if n_in % K.virtual_block(w.type):
            raise UserError(f"the GPU backend needs rows of a multiple of "
                            f"{K.virtual_block(w.type)} weights, got {n_in}")
        code = round_code(w.type)
        if code is not None:
            if n_in % K.round_group(code):
                raise UserError(f"{w.type.name} products round rows of a multiple of "
                                f"{K.round_group(code)} inputs, got {n_in}")
            self._codes.add(code)
        return raw, n_in

    def _weight(self, w: Weight) -> DeviceWeight:
        raw, n_in = self._raw(w)
        return DeviceWeight(self._upload(raw), w.type, raw.shape[0], n_in, raw.shape[1])

    def _experts(self, w: Weight) -> DeviceExperts:
        """All experts of a 3-D weight, one after another, as one upload."""
        raw, n_in = self._raw(Weight(w.data[0], w.type))  # each expert's rows, checked
        ptr = self._upload(np.ascontiguousarray(w.data).view(np.uint8))
        return DeviceExperts(DeviceWeight(ptr, w.type, raw.shape[0], n_in, raw.shape[1]),
                             raw.nbytes)

    def _runs(self, weights: list[Weight]) -> tuple[Run, ...]:
        """`weights` (same input) in runs of consecutive ones of one type, each uploaded as
        one matrix."""
        out = []
        for t, group in itertools.groupby(weights, key=lambda w: w.type):
            raws = [self._raw(w) for w in group]
            n_in = raws[0][1]
            row_bytes = raws[0][0].shape[1]
            base = at = self.device.alloc(sum(raw.nbytes for raw, _ in raws))
            parts = []
            for raw, _ in raws:
                self.device.write(at, raw)
                self.bytes_uploaded += raw.nbytes
                parts.append(DeviceWeight(at, t, raw.shape[0], n_in, row_bytes))
                at += raw.nbytes
            rows = sum(w.n_out for w in parts)
            out.append(Run(DeviceWeight(base, t, rows, n_in, row_bytes), tuple(parts)))
        return tuple(out)

    # -- the pass ----------------------------------------------------------------------

    def _launch(self, kernel: str, n_items: int, *args) -> None:
        self.launches += 1
        self.device.launch(kernel, n_items, *args)

    def _xq(self, code: int) -> int:
        """The buffer of inputs rounded by `code` (allocated with the layers for the codes
        of their weights; here for a weight given later, as tests do)."""
        if code not in self.xq:
            self.xq[code] = self.device.alloc(4 * self._xq_floats)
        return self.xq[code]

    def _round(self, x: int, n: int, n_in: int, code: int) -> int:
        """x (n rows of n_in) rounded by `code` into that rounding's buffer: where."""
        out = self._xq(code)
        self._launch("round_act", n * n_in // K.round_group(code), x, out, code)
        return out

    def _products(self, jobs: list[tuple[DeviceWeight, int]], x: int, n: int,
                  rounded: Rounded = None) -> None:
        """y (n, n_out) = x (n, n_in) @ W.T for each (W, y) of `jobs`, all reading x rounded
        as the CPU's product over W's type rounds it: `rounded` (code, where) when the
        kernel that wrote x also wrote it rounded that way, else rounded here, once per
        rounding for all of them."""
        have = dict([rounded]) if rounded is not None else {}
        for w, y in jobs:
            src = x
            code = round_code(w.type)
            if code is not None:
                if code not in have:
                    have[code] = self._round(x, n, w.n_in, code)
                src = have[code]
            name = w.type.name.lower()
            if n == 1:
                kernel, items = f"matvec_{name}", w.n_out
            else:
                kernel, items = f"matmul_{name}", K.matmul_items(n, w.n_out)
            self._launch(kernel, items, w.ptr, w.row_bytes, src, w.n_in, y, w.n_out, w.n_out,
                         w.n_blocks, n, K.lanes_per_row(w.n_blocks))

    def _matmul(self, w: DeviceWeight, x: int, y: int, n: int,
                rounded: Rounded = None) -> None:
        self._products([(w, y)], x, n, rounded)

    def _run_products(self, runs: tuple[Run, ...], x: int, y: int, n: int,
                      rounded: Rounded = None) -> None:
        """Every weight of `runs` over x, outputs one after another from y (each (n, n_out)):
        one launch per run for one token, whose rows then land where the parts' would."""
        jobs = []
        for run in runs:
            for w in (run.fused,) if n == 1 else run.parts:
                jobs.append((w, y))
                y += 4 * n * w.n_out
        self._products(jobs, x, n, rounded)

    def _norm(self, weight: int, n: int, add: int | None, readers) -> Rounded:
        """h = RMSNorm(x) * weight, after x += add when a residual is pending; when the
        products over `readers` read h rounded, the same kernel writes it rounded as the
        first of them reads it: returns (code, where) (else None)."""
        hp, b = self.hp, self.buf
        eps = float(hp.rms_eps)
        code = self._reads(readers)
        kernel = "rms_norm" if add is None else "add_rms_norm"
        args = [b["x"], weight, b["h"]] if add is None else [b["x"], add, weight, b["h"]]
        if code is not None:
            kernel, args = kernel + "_round", [*args, self._xq(code), code]
        self._launch(kernel, n, *args, hp.n_embd, eps)
        return None if code is None else (code, self._xq(code))

    @staticmethod
    def _reads(weights) -> int | None:
        """The rounding of the first of `weights` whose products round their input."""
        return next((c for c in map(round_code, (w.type for w in weights)) if c is not None),
                    None)

    def _launch_layers(self, n: int) -> None:
        """Every kernel of a pass of n tokens over the offloaded layers, from buf["x"] (the
        position is read from self.pos)."""
        hp, b = self.hp, self.buf
        hd, E = hp.head_dim, hp.n_embd
        Q, KV = hp.n_head * hd, hp.n_head_kv * hd
        scale, eps = float(np.float32(hp.q_scale)), float(hp.rms_eps)
        rope = "rope_neox" if hp.rope_neox else "rope_normal"
        half = hp.rope_dim // 2
        q, k = b["qkv"], b["qkv"] + 4 * n * Q
        v = k + 4 * n * KV
        g, u = b["gu"], b["gu"] + 4 * n * hp.n_ff
        pending = None  # the residual not yet added into x
        for il in self.layers:
            L = self.dev_layers[il]
            hq = self._norm(L.attn_norm, n, pending, [r.fused for r in L.qkv])
            self._run_products(L.qkv, b["h"], q, n, hq)
            if L.bias is not None:
                if n == 1:  # q, k, v are one row, as the biases are
                    self._launch("add_bias", Q + 2 * KV, q, L.bias, Q + 2 * KV)
                else:
                    for out, at, cols in ((q, 0, Q), (k, Q, KV), (v, Q + KV, KV)):
                        self._launch("add_bias", n * cols, out, L.bias + 4 * at, cols)
            if L.qk_norm is not None:  # each head of q and of k normalised, in place
                for x, w, heads in ((q, L.qk_norm[0], hp.n_head), (k, L.qk_norm[1], hp.n_head_kv)):
                    self._launch("rms_norm", n * heads, x, w, x, hd, float(hp.rms_eps))
            table = self.rope_table_local if L.local else self.rope_table
            if n == 1:  # q and k are one row of n_head + n_head_kv heads
                self._launch(rope, (hp.n_head + hp.n_head_kv) * half, q, table,
                             self.pos, hp.n_head + hp.n_head_kv, hd, half)
            else:
                self._launch(rope, n * hp.n_head * half, q, table, self.pos,
                             hp.n_head, hd, half)
                self._launch(rope, n * hp.n_head_kv * half, k, table, self.pos,
                             hp.n_head_kv, hd, half)
            self._launch("kv_store", n * KV, k, L.k_cache, self.pos, KV)
            self._launch("kv_store", n * KV, v, L.v_cache, self.pos, KV)
            self._launch("attention", n * hp.n_head, q, L.k_cache, L.v_cache, b["att"],
                         hp.n_head, hp.n_head_kv, hd, self.pos, scale,
                         hp.n_swa if L.local else 0, float(hp.attn_softcap))
            self._matmul(L.wo, b["att"], b["o"], n)
            if L.post_norms is not None:
                self._launch("rms_norm", n, b["o"], L.post_norms[0], b["o"], E, eps)
            if L.moe is not None:  # the experts write this layer's FFN output into o
                self._norm(L.ffn_norm, n, b["o"], [])
                self._moe(L.moe, n)
                pending = b["o"]
                continue
            hq = self._norm(L.ffn_norm, n, b["o"], [r.fused for r in L.gate_up])
            self._run_products(L.gate_up, b["h"], g, n, hq)
            code = None if hp.family.gelu else self._reads([L.w_down])
            gq = None if code is None else (code, self._xq(code))
            if hp.family.gelu:  # GeGLU; a rounded input for the down product comes after
                self._launch("gelu_mul", n * hp.n_ff, g, u, g)
            elif gq is None:
                self._launch("silu_mul", n * hp.n_ff, g, u, g)
            else:  # SwiGLU and the down product's rounded input in one kernel
                self._launch("silu_mul_round", n * hp.n_ff // K.round_group(code), g, u, g,
                             gq[1], code)
            self._matmul(L.w_down, g, b["o"], n, gq)
            if L.post_norms is not None:
                self._launch("rms_norm", n, b["o"], L.post_norms[1], b["o"], E, eps)
            pending = b["o"]
        if pending is not None:
            self._launch("add", n * E, b["x"], pending, b["x"])

    def _moe(self, moe: DeviceMoE, n: int) -> None:
        """o = the experts' SwiGLUs of h, weighted (the CPU's moe_ffn): the router's logits
        and its picks are computed on the device and read from there by the products, so a
        decode step replays whatever the router picks; each token's experts one by one."""
        b, E = self.buf, self.hp.n_embd
        self._matmul(moe.router, b["h"], b["moe_logits"], n)
        self._launch("moe_route", n, b["moe_logits"], b["moe_ids"], b["moe_w"], moe.n_expert,
                     moe.used)
        ff = moe.gate.weight.n_out
        g, u = b["moe_gu"], b["moe_gu"] + 4 * ff
        for t in range(n):
            x = b["h"] + 4 * t * E
            for s in range(moe.used):
                which = t * moe.used + s
                self._expert(moe.gate, self._rounded(x, moe.gate.weight), g, which)
                self._expert(moe.up, self._rounded(x, moe.up.weight, moe.gate.weight), u,
                             which)
                self._launch("silu_mul", ff, g, u, g)
                self._expert(moe.down, self._rounded(g, moe.down.weight), b["moe_y"], which)
                self._launch("moe_add", E, b["o"] + 4 * t * E, b["moe_y"], b["moe_w"], which,
                             int(s == 0))

    def _rounded(self, x: int, w: DeviceWeight, before: DeviceWeight | None = None) -> int:
        """One token's x as the product over w reads it: rounded (into that rounding's
        buffer) where its type's products round their input, else x itself; not rounded
        again when `before`, whose product read it just before, rounds it the same way."""
        code = round_code(w.type)
        if code is None:
            return x
        if before is not None and round_code(before.type) == code:
            return self._xq(code)
        return self._round(x, 1, w.n_in, code)

    def _expert(self, ex: DeviceExperts, x: int, y: int, which: int) -> None:
        w = ex.weight
        self._launch(f"matvec_sel_{w.type.name.lower()}", w.n_out, w.ptr, w.row_bytes, x,
                     w.n_in, y, w.n_out, w.n_out, w.n_blocks, 1, self.buf["moe_ids"], which,
                     ex.expert_bytes, K.lanes_per_row(w.n_blocks))

    def forward_layers(self, x: np.ndarray, p0: int, head: bool = False) -> np.ndarray:
        """Hidden states (n, n_embd) at positions p0.. through every offloaded layer; with
        `head`, the logits (n, n_vocab) of the output layer after them, in the same pass (a
        decode step is then one recording: hidden states never cross to the host)."""
        dev = self.device
        n = x.shape[0]
        if p0 + n > self.n_ctx:
            raise UserError(f"context full: {p0 + n} tokens do not fit in the GPU's "
                            f"{self.n_ctx} positions")
        if n > self.cap:
            raise UserError(f"{n} tokens in one GPU pass: at most {self.cap}")
        if head and not self.output:
            raise UserError("the output layer is not on the GPU")
        dev.write(self.pos, np.array([p0], np.int64))
        dev.write(self.buf["x"], np.ascontiguousarray(x, np.float32))
        if n == 1 and self.graphs and not getattr(dev, "profile", False):
            self._decode_step(head)
        else:
            self._pass(n, head)
        if head:
            return dev.read(self.buf["logits"], np.empty((n, self.out_weight.n_out), np.float32))
        return dev.read(self.buf["x"], np.empty((n, self.hp.n_embd), np.float32))

    def _pass(self, n: int, head: bool) -> None:
        self._launch_layers(n)
        if head:
            self._head(n)

    def _head(self, n: int) -> None:
        """logits = output @ RMSNorm(x) for the n hidden states in buf["x"]."""
        hq = self._norm(self.out_norm, n, None, [self.out_weight])
        self._matmul(self.out_weight, self.buf["h"], self.buf["logits"], n, hq)

    def _decode_step(self, head: bool) -> None:
        """One token through its recorded graph (one with the head, one without); the
        first step of each runs directly (it loads every kernel, which a recording may not
        do) and the second records it. If the device cannot record, steps run directly from
        then on (`graph_error` says why)."""
        dev = self.device
        graph = self._graphs.get(head)
        if graph is None:
            if head not in self._warm:
                self._warm.add(head)
                self._pass(1, head)
                return
            try:
                dev.begin_capture()
            except UserError as e:
                self.graphs, self.graph_error = False, str(e)
                self._pass(1, head)
                return
            launches = self.launches
            try:
                self._pass(1, head)
            except BaseException:
                with contextlib.suppress(Exception):
                    dev.release(dev.end_capture())
                raise
            self.launches = launches  # recorded, not run
            graph = self._graphs[head] = dev.end_capture()
        self.launches += 1
        dev.replay(graph)

    def run(self, x: np.ndarray, p0: int) -> np.ndarray:
        """`forward_layers` in batches of at most `cap` tokens (the scratch's size)."""
        return np.concatenate([self.forward_layers(x[a:a + self.cap], p0 + a)
                               for a in range(0, len(x), self.cap)])

    def logits(self, x: np.ndarray) -> np.ndarray:
        """`output_logits` in batches of at most `cap` tokens."""
        return np.concatenate([self.output_logits(x[a:a + self.cap])
                               for a in range(0, len(x), self.cap)])

    def output_logits(self, x: np.ndarray) -> np.ndarray:
        """Logits (n, n_vocab) of hidden states x (n, n_embd) through the device's head."""
        if not self.output:
            raise UserError("the output layer is not on the GPU")
        n, b = x.shape[0], self.buf
        self.device.write(b["x"], np.ascontiguousarray(x, np.float32))
        self._head(n)
        return self.device.read(b["logits"], np.empty((n, self.out_weight.n_out), np.float32))

    def close(self) -> None:
        """Drop the recorded graphs (the device's memory goes with the device)."""
        for graph in self._graphs.values():
            self.device.release(graph)
        self._graphs.clear()


def forward_offloaded(model: Model, gpu: GpuLayers | None, tokens: list[int] | np.ndarray,
                      cache: KVCache, all_logits: bool = False) -> np.ndarray:
    """`Model.forward` with the layers in `gpu` (the last ones) and maybe the output head on
    its device; the CPU layers use `cache`, the device layers their own device cache, and
    `cache.n` counts positions for both."""
    saved, model.gpu = model.gpu, gpu
    try:
        return model.forward(tokens, cache, all_logits)
    finally:
        model.gpu = saved


def load_offload(model: Model, plan, n_ctx: int, device: Device | None = None
                 ) -> GpuLayers | None:
    """The device part of an `OffloadPlan` (None when the plan keeps everything on the
    CPU): a CudaDevice on the plan's GPU unless `device` is given."""
    if not plan.on_gpu:
        return None
    if device is None and plan.gpu_name == HOST_GPU_NAME:
        from .device import HostDevice  # noqa: PLC0415

        device = HostDevice()
    elif device is None:
        from .device import CudaDevice  # noqa: PLC0415  (cuda-bindings only when used)

        device = CudaDevice(plan.main_gpu)
    return GpuLayers(model, plan.gpu_layers, n_ctx, device, output=plan.output_on_gpu)
