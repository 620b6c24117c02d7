"""The offloaded part of the forward pass: the last N layers (and maybe the output head)
with their weights and KV cache on a device.

`GpuLayers` uploads the weights of its layers once, keeps their F16 KV cache and a table of
RoPE angles on the device, and runs `forward_layers(x, p0)`: the hidden states go to the
device once at the boundary, come back once, and everything in between runs as kernels.
`forward_offloaded` is `Model.forward` with that split.
"""

from __future__ import annotations

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

__all__ = ["MAX_BATCH", "GpuLayers", "forward_offloaded", "load_offload"]


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
class DeviceLayer:
    attn_norm: int
    wq: DeviceWeight
    wk: DeviceWeight
    wv: DeviceWeight
    wo: DeviceWeight
    bq: int | None
    bk: int | None
    bv: int | None
    ffn_norm: int
    w_gate: DeviceWeight
    w_up: DeviceWeight
    w_down: DeviceWeight
    k_cache: int  # (n_ctx, n_head_kv, head_dim) f16
    v_cache: int


class GpuLayers:
    """Layers `layers` of `model` (and the output head when `output`) resident on `device`
    for a context of `n_ctx` positions."""

    def __init__(self, model: Model, layers: Sequence[int], n_ctx: int, device: Device,
                 output: bool = False):
        hp = model.hp
        self.model, self.device, self.hp, self.n_ctx = model, device, hp, n_ctx
        self.layers = sorted(layers)
        if self.layers and self.layers != list(range(self.layers[0], hp.n_layer)):
            raise UserError(f"offloaded layers must be the last ones, got {self.layers}")
        self.output = output
        self.bytes_uploaded = 0
        kv_bytes = n_ctx * hp.n_head_kv * hp.head_dim * 2
        self.dev_layers: dict[int, DeviceLayer] = {}
        for il in self.layers:
            L = model.layers[il]
            self.dev_layers[il] = DeviceLayer(
                attn_norm=self._vector(L.attn_norm), wq=self._weight(L.wq),
                wk=self._weight(L.wk), wv=self._weight(L.wv), wo=self._weight(L.wo),
                bq=self._vector(L.bq), bk=self._vector(L.bk), bv=self._vector(L.bv),
                ffn_norm=self._vector(L.ffn_norm), w_gate=self._weight(L.w_gate),
                w_up=self._weight(L.w_up), w_down=self._weight(L.w_down),
                k_cache=device.alloc(kv_bytes), v_cache=device.alloc(kv_bytes))
        if output:
            self.out_norm = self._vector(model.output_norm)
            self.out_weight = self._weight(model.output)
        # (cos, sin) of every position and rotary pair, computed as the CPU path does
        d = hp.rope_dim
        inv_freq = hp.rope_base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
        ang = (np.arange(n_ctx)[:, None] * hp.rope_scale) * inv_freq[None, :]
        table = np.stack([np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)], -1)
        self.rope_table = self._upload(table)
        self._cap = 0
        self._buf: dict[str, int] = {}

    # -- setup -------------------------------------------------------------------------

    def _upload(self, arr: np.ndarray) -> int:
        self.bytes_uploaded += arr.nbytes
        return self.device.upload(arr)

    def _vector(self, v: np.ndarray | None) -> int | None:
        return None if v is None else self._upload(np.ascontiguousarray(v, np.float32))

    def _weight(self, w: Weight) -> DeviceWeight:
        if w.type not in K.WEIGHT_TYPES:
            raise UserError(f"the GPU backend has no kernels for {w.type.name} weights")
        raw = np.ascontiguousarray(w.data)
        raw = raw.view(np.uint8).reshape(raw.shape[0], -1)
        info = quant_type(w.type).info
        n_in = raw.shape[1] // info.type_size * info.block_size
        if n_in % K.virtual_block(w.type):
            raise UserError(f"the GPU backend needs rows of a multiple of "
                            f"{K.virtual_block(w.type)} weights, got {n_in}")
        return DeviceWeight(self._upload(raw), w.type, raw.shape[0], n_in, raw.shape[1])

    def _buffers(self, n: int) -> dict[str, int]:
        """Activation buffers for n tokens, grown when a longer batch comes."""
        if n > self._cap:
            hp = self.hp
            q, kv = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
            sizes = {"x": hp.n_embd, "h": hp.n_embd, "o": hp.n_embd, "q": q, "k": kv,
                     "v": kv, "att": q, "g": hp.n_ff, "u": hp.n_ff}
            if self.output:
                sizes["logits"] = self.out_weight.n_out
            self._buf = {k: self.device.alloc(4 * n * s) for k, s in sizes.items()}
            self._cap = n
        return self._buf

    # -- the pass ----------------------------------------------------------------------

    def _matmul(self, w: DeviceWeight, x: int, y: int, n: int) -> None:
        """y (n, n_out) = x (n, n_in) @ W.T on the device."""
        name = w.type.name.lower()
        if n == 1:
            kernel, items = f"matvec_{name}", w.n_out
        else:
            kernel, items = f"matmul_{name}", -(-n // K.MATMUL_TOKENS) * w.n_out
        self.device.launch(kernel, items, w.ptr, w.row_bytes, x, w.n_in, y, w.n_out, w.n_out,
                           w.n_blocks, n, K.lanes_per_row(w.n_blocks))

    def forward_layers(self, x: np.ndarray, p0: int) -> np.ndarray:
        """Hidden states (n, n_embd) at positions p0.. through every offloaded layer."""
        hp, dev = self.hp, self.device
        n = x.shape[0]
        if p0 + n > self.n_ctx:
            raise UserError(f"context full: {p0 + n} tokens do not fit in the GPU's "
                            f"{self.n_ctx} positions")
        b = self._buffers(n)
        dev.write(b["x"], np.ascontiguousarray(x, np.float32))
        hd, E = hp.head_dim, hp.n_embd
        eps, scale = float(hp.rms_eps), float(np.float32(1 / np.sqrt(hd)))
        rope = "rope_neox" if hp.rope_neox else "rope_normal"
        half = hp.rope_dim // 2
        kv_row = hp.n_head_kv * hd
        for il in self.layers:
            L = self.dev_layers[il]
            dev.launch("rms_norm", n, b["x"], L.attn_norm, b["h"], E, eps)
            for w, bias, out in ((L.wq, L.bq, "q"), (L.wk, L.bk, "k"), (L.wv, L.bv, "v")):
                self._matmul(w, b["h"], b[out], n)
                if bias is not None:
                    dev.launch("add_bias", n * w.n_out, b[out], bias, w.n_out)
            dev.launch(rope, n * hp.n_head * half, b["q"], self.rope_table, p0, hp.n_head,
                       hd, half)
            dev.launch(rope, n * hp.n_head_kv * half, b["k"], self.rope_table, p0,
                       hp.n_head_kv, hd, half)
            at = 2 * p0 * kv_row  # byte offset of position p0 in the f16 cache
            dev.launch("f32_to_f16", n * kv_row, b["k"], L.k_cache + at)
            dev.launch("f32_to_f16", n * kv_row, b["v"], L.v_cache + at)
            dev.launch("attention", n * hp.n_head, b["q"], L.k_cache, L.v_cache, b["att"],
                       hp.n_head, hp.n_head_kv, hd, p0, scale)
            self._matmul(L.wo, b["att"], b["o"], n)
            dev.launch("add", n * E, b["x"], b["o"], b["x"])
            dev.launch("rms_norm", n, b["x"], L.ffn_norm, b["h"], E, eps)
            self._matmul(L.w_gate, b["h"], b["g"], n)
            self._matmul(L.w_up, b["h"], b["u"], n)
            dev.launch("silu_mul", n * hp.n_ff, b["g"], b["u"], b["g"])
            self._matmul(L.w_down, b["g"], b["o"], n)
            dev.launch("add", n * E, b["x"], b["o"], b["x"])
        return dev.read(b["x"], np.empty((n, E), np.float32))

    def run(self, x: np.ndarray, p0: int) -> np.ndarray:
        """`forward_layers` in batches of at most MAX_BATCH tokens (the scratch's size)."""
        return np.concatenate([self.forward_layers(x[a:a + MAX_BATCH], p0 + a)
                               for a in range(0, len(x), MAX_BATCH)])

    def logits(self, x: np.ndarray) -> np.ndarray:
        """`output_logits` in batches of at most MAX_BATCH tokens."""
        return np.concatenate([self.output_logits(x[a:a + MAX_BATCH])
                               for a in range(0, len(x), MAX_BATCH)])

    def output_logits(self, x: np.ndarray) -> np.ndarray:
        """Logits (n, n_vocab) of hidden states x (n, n_embd) through the device's head."""
        if not self.output:
            raise UserError("the output layer is not on the GPU")
        n = x.shape[0]
        b = self._buffers(n)
        self.device.write(b["x"], np.ascontiguousarray(x, np.float32))
        self.device.launch("rms_norm", n, b["x"], self.out_norm, b["h"], self.hp.n_embd,
                           float(self.hp.rms_eps))
        self._matmul(self.out_weight, b["h"], b["logits"], n)
        return self.device.read(b["logits"], np.empty((n, self.out_weight.n_out), np.float32))


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
