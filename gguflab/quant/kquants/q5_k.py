"""Q5_K: Q4_K's search with 5-bit levels; the fifth bits go into 32 bytes of `qh`.

Block layout (176 bytes): fp16 d, fp16 dmin, 12 bytes of packed scales/mins, qh[32] (bit s of
qh[l] is the high bit of weight 32*s + l), then 128 bytes of low nibbles arranged as in Q4_K.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir

from ...gguf import GGMLType
from ..base import IntSuperBlock, QuantType, register
from ._imatrix import emit_search_q45_imatrix, q45_k_search_ref
from ._qkx2 import half_bytes
from .q4_k import (
    dequantize_q45_ref,
    emit_dequantize_q45,
    emit_int_superblock_q45,
    emit_search_q45,
    gather_lanes,
    load_bytes,
    search_q45_ref,
    splat_i32,
    store_bytes,
)


@register
class Q5_K(QuantType):
    type = GGMLType.Q5_K
    activation_type = GGMLType.Q8_K
    n_levels = 32
    has_quantize_kernel = has_dequantize_kernel = True

    uses_imatrix = True

    def quantize_blocks_ref(self, x: np.ndarray) -> np.ndarray:
        return self._assemble(*search_q45_ref(x, 31, -0.5, 15))

    def quantize_rows_ref(self, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        if imatrix is None:
            return super().quantize_rows_ref(x)
        out = self._assemble(*q45_k_search_ref(x, imatrix, 31, cap=True))
        return out.reshape(x.shape[0], -1)

    @staticmethod
    def _assemble(dh, dmh, scales, L) -> np.ndarray:
        nb = L.shape[0]
        Ls = L.reshape(nb, 8, 32)
        qh = np.zeros((nb, 32), np.uint8)
        for s in range(8):
            qh |= (Ls[:, s] >> 4) << s
        L4 = (L & 0xF).reshape(nb, 4, 2, 32)
        ql = (L4[:, :, 0] | (L4[:, :, 1] << 4)).reshape(nb, 128)
        return np.concatenate([half_bytes(dh), half_bytes(dmh), scales, qh, ql], axis=1)

    def levels_ref(self, q: np.ndarray) -> np.ndarray:
        nb = q.shape[0]
        ql = q[:, 48:176].reshape(nb, 4, 1, 32)
        low = np.concatenate([ql & 0xF, ql >> 4], axis=2).reshape(nb, 8, 32)
        high = (q[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
        return (low | (high << 4)).reshape(nb, 256)

    def dequantize_blocks_ref(self, q: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(q, np.uint8)
        return dequantize_q45_ref(q, self.levels_ref(q))

    def emit_quantize_block(self, b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> None:
        self._emit_store_levels(b, emit_search_q45(b, x, y, 31, -0.5, 15), y)

    has_imatrix_kernel = True

    def emit_quantize_block_imatrix(self, b: ir.IRBuilder, x: ir.Value, y: ir.Value,
                                    qw: ir.Value, row: object) -> None:
        self._emit_store_levels(b, emit_search_q45_imatrix(b, x, y, qw, 31, True), y)

    @staticmethod
    def _emit_store_levels(b: ir.IRBuilder, L: list[ir.Value], y: ir.Value) -> None:
        c = lambda v: splat_i32(32, v)  # noqa: E731
        qh = c(0)
        for s in range(8):
            lane = gather_lanes(b, L, s)
            qh = b.or_(qh, b.shl(b.lshr(lane, c(4)), c(s)))
            if s % 2:
                lo = b.and_(gather_lanes(b, L, s - 1), c(0xF))
                hi = b.and_(lane, c(0xF))
                store_bytes(b, b.or_(lo, b.shl(hi, c(4))), y, 48 + 16 * (s - 1))
        store_bytes(b, qh, y, 16)

    def emit_dequantize_block(self, b: ir.IRBuilder, y: ir.Value, x: ir.Value) -> None:
        c = lambda v: splat_i32(32, v)  # noqa: E731

        def level(j, h):
            q = load_bytes(b, y, 48 + 32 * j, 32)
            low = b.lshr(q, c(4)) if h else b.and_(q, c(0xF))
            high = b.and_(b.lshr(load_bytes(b, y, 16, 32), c(2 * j + h)), c(1))
            return b.or_(low, b.shl(high, c(4)))

        emit_dequantize_q45(b, y, x, level)

    int_dot = int_superblock = True

    def emit_int_superblock(self, b: ir.IRBuilder, src: ir.Value) -> IntSuperBlock:
        return emit_int_superblock_q45(b, src, 48, 16)


