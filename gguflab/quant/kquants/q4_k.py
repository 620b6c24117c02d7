"""Q4_K: 8 sub-blocks of 32 weights, x = d*sc*q - dmin*m with 4-bit q and 6-bit sc, m.

Block layout (144 bytes): fp16 d, fp16 dmin, 12 bytes of packed scales/mins, 128 bytes of
nibbles (byte l of group j holds sub-block 2j in its low nibble and 2j+1 in its high one).
The search and the scale packing are shared with Q5_K.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir

from ...gguf import GGMLType
from ...jit.builders import Target, const, f32, i8, i16, i32
from ...jit.floats import emit_f16_to_f32, emit_f32_to_f16, hardware_half
from ..base import IntGroup, IntSuperBlock, QuantType, register
from ..floats import f16_from_f32_ref
from ._imatrix import emit_search_q45_imatrix, q45_k_search_ref
from ._qkx2 import (
    F32,
    Lanes,
    emit_get_scale_min_k4,
    emit_load_transposed,
    emit_make_qkx2,
    emit_pack_scale_min_k4,
    emit_quant_scale,
    emit_requantize,
    emit_seq_max,
    get_scale_min_k4_ref,
    half_bytes,
    half_ref,
    make_qkx2_ref,
    nearest_int_ref,
    pack_scale_min_k4_ref,
    requantize_ref,
    seq_max_ref,
    seq_sum_ref,
)

# -- shared with Q5_K -------------------------------------------------------------------------


def search_q45_ref(x: np.ndarray, nmax: int, rmin: float, nstep: int):
    """The common part of quantize_row_q4_K_ref / q5_K_ref on (nb, 256) float32.

    Returns (d fp16 bits (nb,), dmin fp16 bits (nb,), packed scales (nb, 12), levels (nb, 256))."""
    nb = x.shape[0]
    xs = np.asarray(x, F32).reshape(nb * 8, 32)
    with np.errstate(all="ignore"):
        av_x = np.sqrt(seq_sum_ref((xs * xs).T) / F32(32))
        w = av_x[:, None] + np.abs(xs)
        L, sc, mi = make_qkx2_ref(xs, w, nmax, rmin, 0.1, nstep, False)
        sc, mi = sc.reshape(nb, 8), mi.reshape(nb, 8)
        max_scale, max_min = seq_max_ref(sc), seq_max_ref(mi)
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
        ls = np.minimum(63, nearest_int_ref(inv_scale[:, None] * sc) & 0xFF)
        lm = np.minimum(63, nearest_int_ref(inv_min[:, None] * mi) & 0xFF)
        scales = pack_scale_min_k4_ref(ls, lm)
        dh = f16_from_f32_ref(max_scale / F32(63))
        dmh = f16_from_f32_ref(max_min / F32(63))
        s6, m6 = get_scale_min_k4_ref(scales)
        d = dh.view(np.float16).astype(F32)[:, None] * s6.astype(F32)
        dm = dmh.view(np.float16).astype(F32)[:, None] * m6.astype(F32)
    L = requantize_ref(xs.reshape(nb, 8, 32), L.reshape(nb, 8, 32), d, dm, nmax)
    return dh, dmh, scales, L.reshape(nb, 256)


def dequantize_q45_ref(q: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """d*sc*level - dmin*m for Q4_K/Q5_K blocks q (nb, type_size), levels (nb, 256)."""
    nb = q.shape[0]
    d, dmin = half_ref(q[:, 0:2]), half_ref(q[:, 2:4])
    sc, m = get_scale_min_k4_ref(q[:, 4:16])
    with np.errstate(all="ignore"):
        d1 = d[:, None] * sc.astype(F32)
        m1 = dmin[:, None] * m.astype(F32)
        y = d1[:, :, None] * levels.reshape(nb, 8, 32).astype(F32) - m1[:, :, None]
    return y.reshape(nb, 256)


def emit_search_q45(b: ir.IRBuilder, x: ir.Value, y: ir.Value, nmax: int, rmin: float,
                    nstep: int) -> list[ir.Value]:
    """The common part of the Q4_K/Q5_K quantizers for the block at x: stores d, dmin and the
    scales into y[0:16]; returns the levels as 32 vectors of 8 i32 lanes (lane s, vector i
    = weight 32*s + i)."""
    hw = hardware_half(Target.CPU)
    ln = Lanes(b, 8)
    xT = emit_load_transposed(b, ln, x, 32)
    sum_x2 = ln.fc(0.0)
    for xi in xT:
        sum_x2 = b.fadd(sum_x2, b.fmul(xi, xi))
    av_x = ln.sqrt(b.fdiv(sum_x2, ln.fc(32)))
    wT = [b.fadd(av_x, ln.fabs(xi)) for xi in xT]
    L, sc, mi = emit_make_qkx2(ln, xT, wT, nmax, rmin, 0.1, nstep, False)

    zero, c63 = const(f32, 0.0), const(f32, 63.0)
    max_scale, max_min = emit_seq_max(b, ln, sc), emit_seq_max(b, ln, mi)
    inv_scale = b.select(b.fcmp_ordered(">", max_scale, zero), b.fdiv(c63, max_scale), zero)
    inv_min = b.select(b.fcmp_ordered(">", max_min, zero), b.fdiv(c63, max_min), zero)

    def six_bits(v):
        return b.select(b.icmp_unsigned("<", ln.ic(63), v), ln.ic(63), v)

    ls = six_bits(emit_quant_scale(ln, inv_scale, sc))
    lm = six_bits(emit_quant_scale(ln, inv_min, mi))
    dh = emit_f32_to_f16(b, b.fdiv(max_scale, c63), hw)
    dmh = emit_f32_to_f16(b, b.fdiv(max_min, c63), hw)
    hp = b.bitcast(y, i16.as_pointer())
    b.store(dh, hp, align=1)
    b.store(dmh, b.gep(hp, [const(i32, 1)]), align=1)
    emit_pack_scale_min_k4(b, ls, lm, b.gep(y, [const(i32, 4)]))

    # get_scale_min_k4 of the packed bytes gives back ls, lm exactly (both are <= 63)
    d = b.fmul(ln.splat(emit_f16_to_f32(b, dh, hw)), ln.to_f(ls))
    dm = b.fmul(ln.splat(emit_f16_to_f32(b, dmh, hw)), ln.to_f(lm))
    return emit_requantize(ln, xT, L, d, dm, nmax)


def emit_dequantize_q45(b: ir.IRBuilder, y: ir.Value, x: ir.Value, level) -> None:
    """x[64j + 32h + l] = d*sc*q - dmin*m, with `level(j, h)` giving the 32 levels (i32
    lanes) of sub-block 2j + h."""
    hw = hardware_half(Target.CPU)
    ln = Lanes(b, 32)
    hp = b.bitcast(y, i16.as_pointer())
    d = emit_f16_to_f32(b, b.load(hp, align=1), hw)
    dmin = emit_f16_to_f32(b, b.load(b.gep(hp, [const(i32, 1)]), align=1), hw)
    scales = b.gep(y, [const(i32, 4)])
    xv = b.bitcast(x, ln.f.as_pointer())
    for j in range(4):
        for h in range(2):
            sc, m = emit_get_scale_min_k4(b, scales, 2 * j + h)
            d1 = ln.splat(b.fmul(d, b.uitofp(sc, f32)))
            m1 = ln.splat(b.fmul(dmin, b.uitofp(m, f32)))
            v = b.fsub(b.fmul(d1, b.uitofp(level(j, h), ln.f)), m1)
            b.store(v, b.gep(xv, [const(i32, 2 * j + h)]), align=4)


def load_bytes(b: ir.IRBuilder, y: ir.Value, offset: int, n: int) -> ir.Value:
    """n bytes at y + offset as n i32 lanes."""
    vt = ir.VectorType(i8, n)
    v = b.load(b.bitcast(b.gep(y, [const(i32, offset)]), vt.as_pointer()), align=1)
    return b.zext(v, ir.VectorType(i32, n))


def store_bytes(b: ir.IRBuilder, v: ir.Value, y: ir.Value, offset: int) -> None:
    """i32 lanes truncated to bytes, stored at y + offset."""
    vt = ir.VectorType(i8, v.type.count)
    b.store(b.trunc(v, vt), b.bitcast(b.gep(y, [const(i32, offset)]), vt.as_pointer()), align=1)


def gather_lanes(b: ir.IRBuilder, vecs: list[ir.Value], lane: int) -> ir.Value:
    """Lane `lane` of each vector in vecs, as one vector."""
    vt = ir.VectorType(vecs[0].type.element, len(vecs))
    out = ir.Constant(vt, ir.Undefined)
    for i, v in enumerate(vecs):
        out = b.insert_element(out, b.extract_element(v, const(i32, lane)), const(i32, i))
    return out


# -- Q4_K -------------------------------------------------------------------------------------


@register
class Q4_K(QuantType):
    type = GGMLType.Q4_K
    activation_type = GGMLType.Q8_K
    n_levels = 16
    has_quantize_kernel = has_dequantize_kernel = True

    uses_imatrix = True

    def quantize_blocks_ref(self, x: np.ndarray) -> np.ndarray:
        return self._assemble(*search_q45_ref(x, 15, -1.0, 20))

    def quantize_rows_ref(self, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        if imatrix is None:
            return super().quantize_rows_ref(x)
        out = self._assemble(*q45_k_search_ref(x, imatrix, 15, cap=False))
        return out.reshape(x.shape[0], -1)

    @staticmethod
    def _assemble(dh, dmh, scales, L) -> np.ndarray:
        nb = L.shape[0]
        L = L.reshape(nb, 4, 2, 32)
        qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(nb, 128)
        return np.concatenate([half_bytes(dh), half_bytes(dmh), scales, qs], axis=1)

    def levels_ref(self, q: np.ndarray) -> np.ndarray:
        qs = q[:, 16:144].reshape(-1, 4, 1, 32)
        return np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(-1, 256)

    def dequantize_blocks_ref(self, q: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(q, np.uint8)
        return dequantize_q45_ref(q, self.levels_ref(q))

    def emit_quantize_block(self, b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> None:
        self._emit_store_levels(b, emit_search_q45(b, x, y, 15, -1.0, 20), y)

    has_imatrix_kernel = True

    def emit_quantize_block_imatrix(self, b: ir.IRBuilder, x: ir.Value, y: ir.Value,
                                    qw: ir.Value, row: object) -> None:
        self._emit_store_levels(b, emit_search_q45_imatrix(b, x, y, qw, 15, False), y)

    @staticmethod
    def _emit_store_levels(b: ir.IRBuilder, L: list[ir.Value], y: ir.Value) -> None:
        for j in range(4):
            lo, hi = gather_lanes(b, L, 2 * j), gather_lanes(b, L, 2 * j + 1)
            store_bytes(b, b.or_(lo, b.shl(hi, splat_i32(32, 4))), y, 16 + 32 * j)

    def emit_dequantize_block(self, b: ir.IRBuilder, y: ir.Value, x: ir.Value) -> None:
        c = lambda v: splat_i32(32, v)  # noqa: E731

        def level(j, h):
            q = load_bytes(b, y, 16 + 32 * j, 32)
            return b.lshr(q, c(4)) if h else b.and_(q, c(0xF))

        emit_dequantize_q45(b, y, x, level)

    int_dot = int_superblock = True

    def emit_int_superblock(self, b: ir.IRBuilder, src: ir.Value) -> IntSuperBlock:
        return emit_int_superblock_q45(b, src, 16, None)


def emit_int_superblock_q45(b: ir.IRBuilder, src: ir.Value, qs_at: int,
                            qh_at: int | None) -> IntSuperBlock:
    """Q4_K / Q5_K (`qh_at`: where the fifth bits are) as ggml's AVX2 dot reads them: 8
    groups of 32 unsigned levels, each with its 6-bit scale as the integer factor, and the
    6-bit mins (8 lanes: one a group) dotted with x's sums of 32 (Q4_K into 4 float lanes,
    Q5_K into a scalar)."""
    from ...jit.builders import load_bytes as load_v
    from ...jit.floats import load_f16
    from ._intdot import load_words, mask, per_32, widen, words_to_bytes

    d, dmin = load_f16(b, src, 0), load_f16(b, src, 2)
    u0, u1, u2 = load_words(b, src, 4, 3)
    c = lambda v: const(i32, v)  # noqa: E731
    # the 12 packed bytes as 8 scales then 8 mins, one byte each (ggml's `utmp` shuffle)
    low6 = c(0x3F3F3F3F)
    w3 = b.or_(b.and_(b.lshr(u2, c(4)), c(0x0F0F0F0F)),
               b.shl(b.and_(b.lshr(u1, c(6)), c(0x03030303)), c(4)))
    w1 = b.or_(b.and_(u2, c(0x0F0F0F0F)), b.shl(b.and_(b.lshr(u0, c(6)), c(0x03030303)), c(4)))
    sm = widen(b, words_to_bytes(b, [b.and_(u0, low6), w1, b.and_(u1, low6), w3]), False)
    mins = b.shuffle_vector(sm, sm, ir.Constant(ir.VectorType(i32, 8), list(range(8, 16))))

    def group(g: int) -> IntGroup:
        qs = load_v(b, src, qs_at + 32 * (g // 2), 32)
        q = b.lshr(qs, mask(32, 4)) if g % 2 else b.and_(qs, mask(32, 0xF))
        if qh_at is not None:
            hi = b.and_(b.lshr(load_v(b, src, qh_at, 32), mask(32, g)), mask(32, 1))
            q = b.or_(q, b.shl(hi, mask(32, 4)))
        return IntGroup(q, False, None, None, per_32(b, sm, g))

    return IntSuperBlock(group, d, mins, dmin, "acc4" if qh_at is None else "scalar")


def splat_i32(n: int, v: int) -> ir.Constant:
    return ir.Constant(ir.VectorType(i32, n), [v] * n)
