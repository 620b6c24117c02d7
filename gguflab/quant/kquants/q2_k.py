"""Q2_K: 16 sub-blocks of 16 weights, x = d*sc*q - dmin*m with 2-bit q and 4-bit sc, m.

Block layout (84 bytes): scales[16] (low nibble: scale, high nibble: min), qs[64], fp16 d,
fp16 dmin. Byte l of qs half h holds, in bits 2k..2k+1, weight 128*h + 32*k + l.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir

from ...gguf import GGMLType
from ...jit.builders import Target, const, f32, i16, i32
from ...jit.floats import emit_f16_to_f32, emit_f32_to_f16, hardware_half
from ..base import IntGroup, IntSuperBlock, QuantType, register
from ..floats import f16_from_f32_ref
from ._imatrix import (
    emit_lanes_of,
    emit_make_qp_quants,
    emit_sigma2,
    emit_vector_of,
    emit_weights,
    q2_k_ref,
)
from ._qkx2 import (
    F32,
    Lanes,
    emit_load_transposed,
    emit_make_qkx2,
    emit_quant_scale,
    emit_requantize,
    emit_seq_max,
    half_bytes,
    half_ref,
    make_qkx2_ref,
    nearest_int_ref,
    requantize_ref,
    seq_max_ref,
)
from .q4_k import gather_lanes, load_bytes, store_bytes

_Q4SCALE = F32(15)


@register
class Q2_K(QuantType):
    type = GGMLType.Q2_K
    activation_type = GGMLType.Q8_K
    n_levels = 4
    has_quantize_kernel = has_dequantize_kernel = True

    def quantize_blocks_ref(self, x: np.ndarray) -> np.ndarray:
        nb = x.shape[0]
        xs = np.asarray(x, F32).reshape(nb * 16, 16)
        L, sc, mi = make_qkx2_ref(xs, np.abs(xs), 3, -0.5, 0.1, 15, True)
        sc, mi = sc.reshape(nb, 16), mi.reshape(nb, 16)
        max_scale, max_min = seq_max_ref(sc), seq_max_ref(mi)
        with np.errstate(all="ignore"):
            has_s, has_m = max_scale > 0, max_min > 0
            ls = nearest_int_ref((_Q4SCALE / max_scale)[:, None] * sc) & 0xFF
            lm = nearest_int_ref((_Q4SCALE / max_min)[:, None] * mi)
            scales = np.where(has_s[:, None], ls, 0)
            scales = np.where(has_m[:, None], scales | (lm << 4), scales).astype(np.uint8)
            dh = np.where(has_s, f16_from_f32_ref(max_scale / _Q4SCALE), np.uint16(0))
            dmh = np.where(has_m, f16_from_f32_ref(max_min / _Q4SCALE), np.uint16(0))
            d = dh.astype(np.uint16).view(np.float16).astype(F32)[:, None]
            dmin = dmh.astype(np.uint16).view(np.float16).astype(F32)[:, None]
            d = d * (scales & 0xF).astype(F32)
            dm = dmin * (scales >> 4).astype(F32)
        L = requantize_ref(xs.reshape(nb, 16, 16), L.reshape(nb, 16, 16), d, dm, 3)
        L = L.reshape(nb, 2, 4, 32)
        qs = L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)
        return np.concatenate([scales, qs.reshape(nb, 64), half_bytes(dh), half_bytes(dmh)], 1)

    uses_imatrix = True

    def quantize_rows_ref(self, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        if imatrix is None:
            return super().quantize_rows_ref(x)
        return q2_k_ref(x, imatrix).reshape(x.shape[0], -1)

    def levels_ref(self, q: np.ndarray) -> np.ndarray:
        qs = q[:, 16:80].reshape(-1, 2, 1, 32)
        shifts = np.array([0, 2, 4, 6], np.uint8)[None, None, :, None]
        return ((qs >> shifts) & 3).reshape(-1, 256)

    def dequantize_blocks_ref(self, q: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(q, np.uint8)
        nb = q.shape[0]
        d, dmin = half_ref(q[:, 80:82]), half_ref(q[:, 82:84])
        sc = q[:, 0:16]
        with np.errstate(all="ignore"):
            dl = d[:, None] * (sc & 0xF).astype(F32)
            ml = dmin[:, None] * (sc >> 4).astype(F32)
            y = dl[:, :, None] * self.levels_ref(q).reshape(nb, 16, 16).astype(F32)
            y = y - ml[:, :, None]
        return y.reshape(nb, 256)

    def emit_quantize_block(self, b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> None:
        hw = hardware_half(Target.CPU)
        ln = Lanes(b, 16)
        xT = emit_load_transposed(b, ln, x, 16)
        L, sc, mi = emit_make_qkx2(ln, xT, [ln.fabs(xi) for xi in xT], 3, -0.5, 0.1, 15, True)
        zero, q4 = const(f32, 0.0), const(f32, 15.0)
        max_scale, max_min = emit_seq_max(b, ln, sc), emit_seq_max(b, ln, mi)
        has_s = b.fcmp_ordered(">", max_scale, zero)
        has_m = b.fcmp_ordered(">", max_min, zero)
        ls = emit_quant_scale(ln, b.fdiv(q4, max_scale), sc)
        lm = emit_quant_scale(ln, b.fdiv(q4, max_min), mi)
        scales = b.select(has_s, ls, ln.ic(0))
        scales = b.select(has_m, b.and_(b.or_(scales, b.shl(lm, ln.ic(4))), ln.ic(0xFF)), scales)
        h0 = const(i16, 0)
        dh = b.select(has_s, emit_f32_to_f16(b, b.fdiv(max_scale, q4), hw), h0)
        dmh = b.select(has_m, emit_f32_to_f16(b, b.fdiv(max_min, q4), hw), h0)
        self._emit_finish(ln, xT, L, scales, dh, dmh, y)

    has_imatrix_kernel = True

    def emit_quantize_block_imatrix(self, b: ir.IRBuilder, x: ir.Value, y: ir.Value,
                                    qw: ir.Value, row: object) -> None:
        hw = hardware_half(Target.CPU)
        ln = Lanes(b, 16)
        xT = emit_load_transposed(b, ln, x, 16)
        qT = emit_load_transposed(b, ln, qw, 16)
        wT = emit_weights(ln, xT, qT, emit_sigma2(b, x, 256, False))
        sw = ln.fc(0.0)
        for w in wT:
            sw = b.fadd(sw, w)
        L, sc, mi = emit_make_qkx2(ln, xT, wT, 3, -0.9, 0.05, 36, False)
        sws = emit_lanes_of(b, sw)
        dm, ls = emit_make_qp_quants(b, emit_lanes_of(b, sc), sws, 15)
        mm, lm = emit_make_qp_quants(b, emit_lanes_of(b, mi), sws, 15)
        scales = b.and_(b.or_(emit_vector_of(b, ls), b.shl(emit_vector_of(b, lm), ln.ic(4))),
                        ln.ic(0xFF))
        self._emit_finish(ln, xT, L, scales, emit_f32_to_f16(b, dm, hw),
                          emit_f32_to_f16(b, mm, hw), y)

    @staticmethod
    def _emit_finish(ln: Lanes, xT, L, scales, dh, dmh, y) -> None:
        """Store the scale bytes (i32 lanes) and d, dmin (fp16 bits); requantize the levels
        L with them and pack."""
        b = ln.b
        hw = hardware_half(Target.CPU)
        store_bytes(b, scales, y, 0)
        hp = b.bitcast(b.gep(y, [const(i32, 80)]), i16.as_pointer())
        b.store(dh, hp, align=1)
        b.store(dmh, b.gep(hp, [const(i32, 1)]), align=1)

        d = b.fmul(ln.splat(emit_f16_to_f32(b, dh, hw)), ln.to_f(b.and_(scales, ln.ic(0xF))))
        dm = b.fmul(ln.splat(emit_f16_to_f32(b, dmh, hw)), ln.to_f(b.lshr(scales, ln.ic(4))))
        L = emit_requantize(ln, xT, L, d, dm, 3)
        # sub-block s = 8h + 2k + p holds weights 128h + 32k + 16p + i, for qs[32h + 16p + i]
        for h in range(2):
            for p in range(2):
                packed = ln.ic(0)
                for k in range(4):
                    lane = gather_lanes(b, L, 8 * h + 2 * k + p)
                    packed = b.or_(packed, b.shl(lane, ln.ic(2 * k)))
                store_bytes(b, packed, y, 16 + 32 * h + 16 * p)

    def emit_dequantize_block(self, b: ir.IRBuilder, y: ir.Value, x: ir.Value) -> None:
        hw = hardware_half(Target.CPU)
        ln = Lanes(b, 16)
        hp = b.bitcast(b.gep(y, [const(i32, 80)]), i16.as_pointer())
        d = emit_f16_to_f32(b, b.load(hp, align=1), hw)
        dmin = emit_f16_to_f32(b, b.load(b.gep(hp, [const(i32, 1)]), align=1), hw)
        xv = b.bitcast(x, ln.f.as_pointer())
        for h in range(2):
            for p in range(2):
                q = load_bytes(b, y, 16 + 32 * h + 16 * p, 16)
                for k in range(4):
                    s = 8 * h + 2 * k + p
                    sc = b.zext(b.load(b.gep(y, [const(i32, s)])), i32)
                    dl = ln.splat(b.fmul(d, b.uitofp(b.and_(sc, const(i32, 0xF)), f32)))
                    ml = ln.splat(b.fmul(dmin, b.uitofp(b.lshr(sc, const(i32, 4)), f32)))
                    lv = b.and_(b.lshr(q, ln.ic(2 * k)), ln.ic(3))
                    v = b.fsub(b.fmul(dl, b.uitofp(lv, ln.f)), ml)
                    b.store(v, b.gep(xv, [const(i32, s)]), align=4)

    int_dot = int_superblock = True

    def emit_int_superblock(self, b: ir.IRBuilder, src: ir.Value) -> IntSuperBlock:
        """8 groups of 32 2-bit levels, each 16 with its 4-bit scale as the integer factor;
        the 4-bit mins dot x's sums of 16 into the float lanes first, as ggml does."""
        from ...jit.builders import load_bytes as load_v
        from ...jit.floats import load_f16
        from ._intdot import mask, per_16, widen

        ms = load_v(b, src, 0, 16)
        sc = widen(b, b.and_(ms, mask(16, 0xF)), False)
        mins = widen(b, b.lshr(ms, mask(16, 4)), False)
        d, dmin = load_f16(b, src, 80), load_f16(b, src, 82)

        def group(g: int) -> IntGroup:
            q = b.and_(b.lshr(load_v(b, src, 16 + 32 * (g // 4), 32), mask(32, 2 * (g % 4))),
                       mask(32, 3))
            return IntGroup(q, False, None, None, per_16(b, sc, g))

        return IntSuperBlock(group, d, mins, dmin, "acc")
