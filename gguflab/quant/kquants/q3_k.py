"""Q3_K: 16 sub-blocks of 16 weights, 3-bit levels, 6-bit sub-block scales, an fp16 d.

Block (110 bytes): hmask[32] (bit 2 of each level), qs[64] (bits 0-1), scales[12] (16
six-bit scales: low nibbles in bytes 0-7, top two bits in bytes 8-11), d (fp16).
Weight w = d * (scale[w // 16] - 32) * (level - 4).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir

from ...gguf import GGMLType
from ...jit.builders import Target, alloca_entry, const, f32, for_range, i8, i16, i32
from ...jit.floats import emit_f16_to_f32, emit_f32_to_f16, hardware_half
from ..base import IntGroup, IntSuperBlock, QuantType, register
from ..floats import f16_from_f32_ref
from ._imatrix import emit_sigma2, emit_vector_of, q3_k_search_ref
from ._qkx2 import Lanes
from ._qx import (
    QK_K,
    V8,
    VF,
    VI,
    emit_clamp,
    emit_lanes,
    emit_make_q3_quants,
    emit_make_qx_quants,
    emit_nearest_int,
    emit_scalar_first_absmax,
    emit_splat,
    emit_transpose_in,
    emit_transpose_out,
    first_absmax,
    fp16_bits_to_f32,
    make_q3_quants,
    nearest_int,
    splat,
)

TYPE_SIZE = 110
HM, QS, SC, D = 0, 32, 96, 108

_o = np.arange(QK_K)
QS_IDX = QS + 32 * (_o // 128) + _o % 32
QS_SHIFT = 2 * ((_o % 128) // 32)
HM_IDX = HM + _o % 32
HM_SHIFT = _o // 32
_j = np.arange(16)
SC_LO_IDX = SC + _j % 8
SC_LO_SHIFT = 4 * (_j // 8)
SC_HI_IDX = SC + 8 + _j % 4
SC_HI_SHIFT = 2 * (_j // 4)


def _pack_scales(l: np.ndarray) -> np.ndarray:
    """Six-bit scales (n, 16) -> the 12 bytes (n, 12)."""
    l = l.astype(np.uint8)
    out = np.empty((l.shape[0], 12), np.uint8)
    out[:, :8] = (l[:, :8] & 0xF) | ((l[:, 8:] & 0xF) << 4)
    for m in range(4):
        out[:, 8 + m] = ((l[:, m] >> 4) | ((l[:, 4 + m] >> 4) << 2) | ((l[:, 8 + m] >> 4) << 4)
                         | ((l[:, 12 + m] >> 4) << 6))
    return out


def _unpack_scales(q: np.ndarray) -> np.ndarray:
    """The six-bit scales (n, 16) in [0, 64) of blocks q (n, 110)."""
    lo = (q[:, SC_LO_IDX] >> SC_LO_SHIFT) & 0xF
    hi = (q[:, SC_HI_IDX] >> SC_HI_SHIFT) & 3
    return (lo | (hi << 4)).astype(np.int32)


@register
class Q3_K(QuantType):
    type = GGMLType.Q3_K
    activation_type = GGMLType.Q8_K
    n_levels = 8
    has_quantize_kernel = has_dequantize_kernel = True

    # -- numpy ----------------------------------------------------------------------------

    def quantize_blocks_ref(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        nb = x.shape[0]
        scales, L = make_q3_quants(x.reshape(nb * 16, 16), 4, True)
        scales = scales.reshape(nb, 16)
        L = L.reshape(nb, QK_K).astype(np.int32)
        _, max_scale = first_absmax(scales)
        nonzero = max_scale != 0
        with np.errstate(all="ignore"):
            iscale = np.float32(-32) / max_scale
            l = nearest_int(iscale[:, None] * scales).astype(np.int8).astype(np.int32)
            l = np.where(nonzero[:, None], np.clip(l, -32, 31) + 32, 0)
            d16 = np.where(nonzero, f16_from_f32_ref(np.float32(1) / iscale), 0).astype(np.uint16)
        return self._finish(x, d16, l, L)

    uses_imatrix = True

    def quantize_rows_ref(self, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        if imatrix is None:
            return super().quantize_rows_ref(x)
        return self._finish(*q3_k_search_ref(x, imatrix)).reshape(x.shape[0], -1)

    @staticmethod
    def _finish(x: np.ndarray, d16: np.ndarray, l: np.ndarray, L: np.ndarray) -> np.ndarray:
        """Blocks from d (fp16 bits), the six-bit scales l in [0, 64) (nb, 16) and the levels
        L (nb, 256) of the search: requantize where d*(l - 32) != 0, then pack."""
        nb = x.shape[0]
        with np.errstate(all="ignore"):
            d = fp16_bits_to_f32(d16)[:, None] * (l - 32).astype(np.float32)
            d = np.repeat(d, 16, axis=1)
            fresh = np.clip(nearest_int(x / d), -4, 3) + 4
        L = np.where(d == 0, L, fresh).astype(np.uint8)
        out = np.zeros((nb, TYPE_SIZE), np.uint8)
        for k in range(8):
            out[:, HM:QS] |= ((L[:, 32 * k: 32 * k + 32] >> 2) & 1) << k
        for h in range(2):
            for k in range(4):
                out[:, QS + 32 * h: QS + 32 * h + 32] |= (
                    L[:, 128 * h + 32 * k: 128 * h + 32 * k + 32] & 3) << (2 * k)
        out[:, SC:D] = _pack_scales(l)
        out[:, D:] = d16.reshape(nb, 1).view(np.uint8)
        return out

    def levels_ref(self, q: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(q, np.uint8)
        low = (q[:, QS_IDX] >> QS_SHIFT) & 3
        high = (q[:, HM_IDX] >> HM_SHIFT) & 1
        return (low | (high << 2)).astype(np.int32)

    def dequantize_blocks_ref(self, q: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(q, np.uint8)
        d = fp16_bits_to_f32(q[:, D:].copy().view(np.uint16))  # (n, 1)
        dl = np.repeat(d * (_unpack_scales(q) - 32).astype(np.float32), 16, axis=1)
        return dl * (self.levels_ref(q) - 4).astype(np.float32)

    # -- IR -------------------------------------------------------------------------------

    def emit_quantize_block(self, b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> None:
        hw = hardware_half(Target.CPU)
        xt = emit_transpose_in(b, x)
        lt = alloca_entry(b, V8, 16, name="lt")
        scales = emit_make_q3_quants(b, xt, 16, 4, lt)
        _, max_scale = emit_scalar_first_absmax(b, scales)
        nonzero = b.fcmp_unordered("!=", max_scale, const(f32, 0.0))
        iscale = b.fdiv(const(f32, -32.0), max_scale)
        l = emit_nearest_int(b, b.fmul(emit_splat(b, iscale), scales))
        l = emit_clamp(b, b.sext(b.trunc(l, V8), VI), -32, 31)
        l = b.select(nonzero, b.add(l, splat(VI, 32)), splat(VI, 0))
        d16 = b.select(nonzero, emit_f32_to_f16(b, b.fdiv(const(f32, 1.0), iscale), hw),
                       const(i16, 0))
        self._emit_finish(b, xt, lt, l, d16, y)

    has_imatrix_kernel = True

    def emit_quantize_block_imatrix(self, b: ir.IRBuilder, x: ir.Value, y: ir.Value,
                                    qw: ir.Value, row: object) -> None:
        hw = hardware_half(Target.CPU)
        c = lambda v: const(i32, v)  # noqa: E731
        xt = emit_transpose_in(b, x)
        qt = emit_transpose_in(b, qw)
        ln = Lanes(b, 16)
        s2 = ln.splat(emit_sigma2(b, x, QK_K, True))
        wt = alloca_entry(b, VF, 16, name="wt")
        sw = splat(VF, 0.0)
        for i in range(16):
            xv = b.load(b.gep(xt, [c(i)]))
            w = b.fmul(b.load(b.gep(qt, [c(i)])), ln.sqrt(b.fadd(s2, b.fmul(xv, xv))))
            b.store(w, b.gep(wt, [c(i)]))
            sw = b.fadd(sw, w)
        lt = alloca_entry(b, V8, 16, name="lt")
        scales = emit_make_qx_quants(b, xt, 16, 4, lt, wt)
        # make_qx_quants(16, 32, scales, Ls, 1, sw): one group, run in every lane alike
        st = alloca_entry(b, VF, 16, name="st")
        swt = alloca_entry(b, VF, 16, name="swt")
        for i, (sv, wv) in enumerate(zip(emit_lanes(b, scales), emit_lanes(b, sw))):
            b.store(emit_splat(b, sv), b.gep(st, [c(i)]))
            b.store(emit_splat(b, wv), b.gep(swt, [c(i)]))
        lst = alloca_entry(b, V8, 16, name="lst")
        d_block = b.extract_element(emit_make_qx_quants(b, st, 16, 32, lst, swt), c(0))
        ls = [b.extract_element(b.load(b.gep(lst, [c(i)])), c(0)) for i in range(16)]
        l = b.zext(emit_vector_of(b, ls), VI)
        self._emit_finish(b, xt, lt, l, emit_f32_to_f16(b, d_block, hw), y)

    def _emit_finish(self, b: ir.IRBuilder, xt: ir.Value, lt: ir.Value, l: ir.Value,
                     d16: ir.Value, y: ir.Value) -> None:
        """Store d (fp16 bits) and the six-bit scales l (i32 lanes in [0, 64)), requantize
        the levels at lt where d*(l - 32) != 0 and pack them."""
        hw = hardware_half(Target.CPU)
        c = lambda v: const(i32, v)  # noqa: E731
        b.store(d16, b.bitcast(b.gep(y, [c(D)]), i16.as_pointer()), align=1)
        ls = [b.trunc(v, i8) for v in emit_lanes(b, l)]
        c8 = lambda v: const(i8, v)  # noqa: E731
        for j in range(8):
            byte = b.or_(b.and_(ls[j], c8(0xF)), b.shl(ls[j + 8], c8(4)))
            b.store(byte, b.gep(y, [c(SC + j)]))
        for m in range(4):
            byte = c8(0)
            for g in range(4):
                byte = b.or_(byte, b.shl(b.lshr(ls[4 * g + m], c8(4)), c8(2 * g)))
            b.store(byte, b.gep(y, [c(SC + 8 + m)]))

        d = b.fmul(emit_splat(b, emit_f16_to_f32(b, d16, hw)),
                   b.sitofp(b.sub(l, splat(VI, 32)), VF))
        keep = b.fcmp_ordered("==", d, splat(VF, 0.0))
        for i in range(16):
            xv = b.load(b.gep(xt, [c(i)]))
            q = emit_clamp(b, emit_nearest_int(b, b.fdiv(xv, d)), -4, 3)
            q = b.trunc(b.add(q, splat(VI, 4)), V8)
            p = b.gep(lt, [c(i)])
            b.store(b.select(keep, b.load(p), q), p)
        L = emit_transpose_out(b, lt)
        with for_range(b, c(0), c(32), name="hm") as m:
            byte = c8(0)
            for k in range(8):
                bit = b.and_(b.lshr(b.load(b.gep(L, [b.add(m, c(32 * k))])), c8(2)), c8(1))
                byte = b.or_(byte, b.shl(bit, c8(k)))
            b.store(byte, b.gep(y, [b.add(m, c(HM))]))
        for h in range(2):
            with for_range(b, c(0), c(32), name="qs") as j:
                byte = c8(0)
                for k in range(4):
                    v = b.load(b.gep(L, [b.add(j, c(128 * h + 32 * k))]))
                    byte = b.or_(byte, b.shl(b.and_(v, c8(3)), c8(2 * k)))
                b.store(byte, b.gep(y, [b.add(j, c(QS + 32 * h))]))

    def emit_dequantize_block(self, b: ir.IRBuilder, y: ir.Value, x: ir.Value) -> None:
        hw = hardware_half(Target.CPU)
        c = lambda v: const(i32, v)  # noqa: E731
        d = emit_f16_to_f32(b, b.load(b.bitcast(b.gep(y, [c(D)]), i16.as_pointer()), align=1), hw)
        byte = lambda k: b.zext(b.load(b.gep(y, [c(k)])), i32)  # noqa: E731
        vbytes = lambda k: b.zext(  # noqa: E731
            b.load(b.bitcast(b.gep(y, [c(k)]), V8.as_pointer()), align=1), VI)
        xv = b.bitcast(x, VF.as_pointer())
        for j in range(16):  # sub-block j: weights 16j .. 16j+15
            lo = b.and_(b.lshr(byte(SC + j % 8), c(4 * (j // 8))), c(0xF))
            hi = b.and_(b.lshr(byte(SC + 8 + j % 4), c(2 * (j // 4))), c(3))
            dl = b.fmul(d, b.sitofp(b.sub(b.or_(lo, b.shl(hi, c(4))), c(32)), f32))
            o = 16 * j
            low = b.and_(b.lshr(vbytes(QS + 32 * (o // 128) + o % 32),
                                splat(VI, 2 * ((o % 128) // 32))), splat(VI, 3))
            high = b.and_(b.lshr(vbytes(HM + o % 32), splat(VI, o // 32)), splat(VI, 1))
            level = b.or_(low, b.shl(high, splat(VI, 2)))
            val = b.fmul(emit_splat(b, dl), b.sitofp(b.sub(level, splat(VI, 4)), VF))
            b.store(val, b.gep(xv, [c(j)]), align=4)

    int_dot = int_superblock = True

    def emit_int_superblock(self, b: ir.IRBuilder, src: ir.Value) -> IntSuperBlock:
        """8 groups of 32 signed levels (level - 4), each 16 with its 6-bit scale less 32
        as the integer factor (the scales unpacked as ggml's `aux` shuffle does)."""
        from ...jit.builders import load_bytes as load_v
        from ...jit.floats import load_f16
        from ._intdot import load_words, mask, per_16, widen, words_to_bytes

        c = lambda v: const(i32, v)  # noqa: E731
        lo4, hi2 = c(0x0F0F0F0F), c(0x03030303)
        a0, a1, a2 = load_words(b, src, SC, 3)

        def word(a, shift_lo, shift_hi):
            low = b.and_(b.lshr(a, c(shift_lo)) if shift_lo else a, lo4)
            high = b.and_(b.lshr(a2, c(shift_hi)) if shift_hi else a2, hi2)
            return b.or_(low, b.shl(high, c(4)))

        raw = words_to_bytes(b, [word(a0, 0, 0), word(a1, 0, 2), word(a0, 4, 4),
                                 word(a1, 4, 6)])
        sc = widen(b, b.sub(raw, mask(16, 32)), True)
        d = load_f16(b, src, D)

        def group(g: int) -> IntGroup:
            low = b.and_(b.lshr(load_v(b, src, QS + 32 * (g // 4), 32), mask(32, 2 * (g % 4))),
                         mask(32, 3))
            high = b.and_(b.lshr(load_v(b, src, HM, 32), mask(32, g)), mask(32, 1))
            q = b.sub(b.or_(low, b.shl(high, mask(32, 2))), mask(32, 4))
            return IntGroup(q, True, None, None, per_16(b, sc, g))

        return IntSuperBlock(group, d)
