"""Q6_K: 16 sub-blocks of 16 weights, 6-bit levels, 8-bit sub-block scales, an fp16 d.

Block (210 bytes): ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] (int8), d (fp16).
Weight w = d * scale[w // 16] * (level - 32).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir

from ...gguf import GGMLType
from ...jit.builders import Target, alloca_entry, const, f32, for_range, i8, i16, i32
from ...jit.floats import emit_f16_to_f32, emit_f32_to_f16, hardware_half
from ..base import IntGroup, IntSuperBlock, QuantType, register
from ..floats import f16_from_f32_ref
from ._imatrix import q6_k_weights
from ._qx import (
    GROUP_MAX_EPS,
    QK_K,
    V8,
    VF,
    VI,
    emit_clamp,
    emit_make_qx_quants,
    emit_nearest_int,
    emit_scalar_first_absmax,
    emit_splat,
    emit_transpose_in,
    emit_transpose_out,
    first_absmax,
    fp16_bits_to_f32,
    make_qx_quants,
    nearest_int,
    splat,
)

TYPE_SIZE = 210
QL, QH, SC, D = 0, 128, 192, 208

# where each weight's bits live: ql byte, its shift, qh byte, its shift
_o = np.arange(QK_K)
_h, _k, _l = _o // 128, (_o % 128) // 32, _o % 32
QL_IDX = QL + 64 * _h + 32 * (_k % 2) + _l
QL_SHIFT = 4 * (_k // 2)
QH_IDX = QH + 32 * _h + _l
QH_SHIFT = 2 * _k


def _pack(L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Levels (n, 256) in [0, 64) -> (ql (n, 128), qh (n, 64))."""
    L = L.astype(np.uint8)
    ql = np.empty((L.shape[0], 128), np.uint8)
    qh = np.empty((L.shape[0], 64), np.uint8)
    for h in range(2):
        q1, q2, q3, q4 = (L[:, 128 * h + 32 * k: 128 * h + 32 * k + 32] for k in range(4))
        ql[:, 64 * h: 64 * h + 32] = (q1 & 0xF) | ((q3 & 0xF) << 4)
        ql[:, 64 * h + 32: 64 * h + 64] = (q2 & 0xF) | ((q4 & 0xF) << 4)
        qh[:, 32 * h: 32 * h + 32] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | (
            (q4 >> 4) << 6)
    return ql, qh


@register
class Q6_K(QuantType):
    type = GGMLType.Q6_K
    activation_type = GGMLType.Q8_K
    n_levels = 64
    has_quantize_kernel = has_dequantize_kernel = True

    # -- numpy ----------------------------------------------------------------------------

    uses_imatrix = True

    def quantize_blocks_ref(self, x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
        """`qw`: importance weights (nb * 16, 16), as quantize_row_q6_K_impl passes them to
        make_qx_quants; None for quantize_row_q6_K_ref."""
        x = np.ascontiguousarray(x, np.float32)
        nb = x.shape[0]
        scales, L = make_qx_quants(x.reshape(nb * 16, 16), 32, 1, qw)
        scales = scales.reshape(nb, 16)
        L = L.reshape(nb, QK_K).astype(np.int32)
        max_abs, max_scale = first_absmax(scales)
        zero = max_abs < GROUP_MAX_EPS
        with np.errstate(all="ignore"):
            iscale = np.float32(-128) / max_scale
            d16 = f16_from_f32_ref(np.float32(1) / iscale)
            sc = np.minimum(127, nearest_int(iscale[:, None] * scales)).astype(np.int8)
            d = fp16_bits_to_f32(d16)[:, None] * sc.astype(np.float32)
            d = np.repeat(d, 16, axis=1)
            fresh = np.clip(nearest_int(x / d), -32, 31) + 32
        L = np.where(d == 0, L, fresh)
        out = np.zeros((nb, TYPE_SIZE), np.uint8)
        out[:, QL:QH], out[:, QH:SC] = _pack(L)
        out[:, SC:D] = sc.view(np.uint8)
        out[:, D:] = d16.reshape(nb, 1).view(np.uint8)
        out[zero] = 0
        return out

    def quantize_rows_ref(self, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        if imatrix is None:
            return super().quantize_rows_ref(x)
        out = self.quantize_blocks_ref(x.reshape(-1, QK_K), q6_k_weights(x, imatrix))
        return out.reshape(x.shape[0], -1)

    def levels_ref(self, q: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(q, np.uint8)
        low = (q[:, QL_IDX] >> QL_SHIFT) & 0xF
        high = (q[:, QH_IDX] >> QH_SHIFT) & 3
        return (low | (high << 4)).astype(np.int32)

    def dequantize_blocks_ref(self, q: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(q, np.uint8)
        d = fp16_bits_to_f32(q[:, D:].copy().view(np.uint16))  # (n, 1)
        sc = q[:, SC:D].view(np.int8).astype(np.float32)
        ds = np.repeat(d * sc, 16, axis=1)
        return ds * (self.levels_ref(q) - 32).astype(np.float32)

    # -- IR -------------------------------------------------------------------------------

    def emit_quantize_block(self, b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> None:
        self._emit_quantize(b, x, y, None)

    has_imatrix_kernel = True

    def emit_quantize_block_imatrix(self, b: ir.IRBuilder, x: ir.Value, y: ir.Value,
                                    qw: ir.Value, row: object) -> None:
        self._emit_quantize(b, x, y, qw)

    def _emit_quantize(self, b: ir.IRBuilder, x: ir.Value, y: ir.Value,
                       qw: ir.Value | None) -> None:
        """quantize_row_q6_K_ref (qw None) or quantize_row_q6_K_impl with weights at qw."""
        hw = hardware_half(Target.CPU)
        xt = emit_transpose_in(b, x)
        wt = None if qw is None else emit_transpose_in(b, qw)
        lt = alloca_entry(b, V8, 16, name="lt")
        scales = emit_make_qx_quants(b, xt, 16, 32, lt, wt)
        amax, max_scale = emit_scalar_first_absmax(b, scales)
        is_zero = b.fcmp_ordered("<", amax, const(f32, float(GROUP_MAX_EPS)))
        with b.if_else(is_zero) as (zero, normal):
            with zero:
                with for_range(b, const(i32, 0), const(i32, TYPE_SIZE), name="z") as j:
                    b.store(const(i8, 0), b.gep(y, [j]))
            with normal:
                iscale = b.fdiv(const(f32, -128.0), max_scale)
                d16 = emit_f32_to_f16(b, b.fdiv(const(f32, 1.0), iscale), hw)
                b.store(d16, b.bitcast(b.gep(y, [const(i32, D)]), i16.as_pointer()), align=1)
                l = emit_nearest_int(b, b.fmul(emit_splat(b, iscale), scales))
                l = b.select(b.icmp_signed(">", l, splat(VI, 127)), splat(VI, 127), l)
                sc = b.trunc(l, V8)
                b.store(sc, b.bitcast(b.gep(y, [const(i32, SC)]), V8.as_pointer()), align=1)
                d = b.fmul(emit_splat(b, emit_f16_to_f32(b, d16, hw)), b.sitofp(sc, VF))
                keep = b.fcmp_ordered("==", d, splat(VF, 0.0))
                for i in range(16):
                    xv = b.load(b.gep(xt, [const(i32, i)]))
                    q = emit_clamp(b, emit_nearest_int(b, b.fdiv(xv, d)), -32, 31)
                    q = b.trunc(b.add(q, splat(VI, 32)), V8)
                    p = b.gep(lt, [const(i32, i)])
                    b.store(b.select(keep, b.load(p), q), p)
                L = emit_transpose_out(b, lt)
                self._emit_pack(b, L, y)

    @staticmethod
    def _emit_pack(b: ir.IRBuilder, L: ir.Value, y: ir.Value) -> None:
        c8 = lambda v: const(i8, v)  # noqa: E731
        for h in range(2):
            with for_range(b, const(i32, 0), const(i32, 32), name="pk") as l:
                q = [b.load(b.gep(L, [b.add(l, const(i32, 128 * h + 32 * k))])) for k in range(4)]
                lo = [b.and_(v, c8(0xF)) for v in q]
                hi = [b.lshr(v, c8(4)) for v in q]
                b.store(b.or_(lo[0], b.shl(lo[2], c8(4))),
                        b.gep(y, [b.add(l, const(i32, QL + 64 * h))]))
                b.store(b.or_(lo[1], b.shl(lo[3], c8(4))),
                        b.gep(y, [b.add(l, const(i32, QL + 64 * h + 32))]))
                qh = b.or_(b.or_(hi[0], b.shl(hi[1], c8(2))),
                           b.or_(b.shl(hi[2], c8(4)), b.shl(hi[3], c8(6))))
                b.store(qh, b.gep(y, [b.add(l, const(i32, QH + 32 * h))]))

    def emit_dequantize_block(self, b: ir.IRBuilder, y: ir.Value, x: ir.Value) -> None:
        hw = hardware_half(Target.CPU)
        c = lambda v: const(i32, v)  # noqa: E731
        d = emit_f16_to_f32(b, b.load(b.bitcast(b.gep(y, [c(D)]), i16.as_pointer()), align=1), hw)
        vbytes = lambda k: b.zext(  # noqa: E731
            b.load(b.bitcast(b.gep(y, [c(k)]), V8.as_pointer()), align=1), VI)
        xv = b.bitcast(x, VF.as_pointer())
        for j in range(16):  # sub-block j: weights 16j .. 16j+15
            o = 16 * j
            sc = b.load(b.gep(y, [c(SC + j)]))
            ds = b.fmul(d, b.sitofp(sc, f32))
            low = b.and_(b.lshr(vbytes(int(QL_IDX[o])), splat(VI, int(QL_SHIFT[o]))),
                         splat(VI, 0xF))
            high = b.and_(b.lshr(vbytes(int(QH_IDX[o])), splat(VI, int(QH_SHIFT[o]))),
                          splat(VI, 3))
            level = b.or_(low, b.shl(high, splat(VI, 4)))
            val = b.fmul(emit_splat(b, ds), b.sitofp(b.sub(level, splat(VI, 32)), VF))
            b.store(val, b.gep(xv, [c(j)]), align=4)

    int_dot = int_superblock = True

    def emit_int_superblock(self, b: ir.IRBuilder, src: ir.Value) -> IntSuperBlock:
        """8 groups of 32 unsigned 6-bit levels with the int8 scale of each 16 as the factor;
        the -32 comes off the integer sums as 32 * scale * (x's sum of 16), as ggml does."""
        from ...jit.builders import load_bytes as load_v
        from ...jit.floats import load_f16
        from ._intdot import mask, per_16, widen

        d = load_f16(b, src, D)
        sc = widen(b, load_v(b, src, SC, 16), True)

        def group(g: int) -> IntGroup:
            o = 32 * g
            ql = load_v(b, src, int(QL_IDX[o]), 32)
            qh = load_v(b, src, int(QH_IDX[o]), 32)
            low = b.and_(b.lshr(ql, mask(32, int(QL_SHIFT[o]))), mask(32, 0xF))
            high = b.and_(b.lshr(qh, mask(32, int(QH_SHIFT[o]))), mask(32, 3))
            return IntGroup(b.or_(low, b.shl(high, mask(32, 4))), False, None, None,
                            per_16(b, sc, g))

        mins = b.shl(sc, ir.Constant(sc.type, [5] * 16))
        return IntSuperBlock(group, d, mins, None, "sub")
