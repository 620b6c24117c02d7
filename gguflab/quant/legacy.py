"""The legacy block types Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1: blocks of 32 weights with an
fp16 scale (and an fp16 minimum or sum), bit-exact with llama.cpp's `quantize_row_*_ref`.

Facts the arithmetic has to respect to stay bit-exact:
- every operation is float32, in ggml's order, with no fused multiply-add;
- ggml's float -> integer casts truncate, and on x86 an out-of-range or NaN value turns into
  INT_MIN, whose low byte is 0; only that low byte is kept (`(int8_t)`, `(uint8_t)`);
- the scans for the extreme values are sequential: on ties (+a / -a, or +0 / -0) the first
  element wins, and NaNs are skipped (Q4/Q5) or restart the scan (Q8's `MAX` macro).

The kernels work on one block as 32-lane vectors: the reductions are trees over the lanes
(order does not change a max or a min), and the sign of the winner is then taken from the
first lane that reaches it, so ties resolve as in the sequential scan.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir

from ..gguf import GGMLType
from ..jit.builders import (
    at,
    const,
    f32,
    fabs,
    i1,
    i8,
    i32,
    intrinsic,
    lane_max,
    lane_min,
    lane_tree,
    load_bytes,
    ptr,
    shuffle,
    splat,
    vconst,
    vec,
)
from ..jit.floats import load_f16, store_f16
from .base import IntGroup, QuantType, register
from .floats import f16_from_f32_ref
from .kquants._imatrix import (
    LEGACY_GROUP,
    emit_legacy_affine_imatrix,
    emit_legacy_symmetric_imatrix,
    emit_sigma2,
    legacy_affine_ref,
    legacy_symmetric_ref,
)

QK = 32
F = np.float32
FLT_MAX = float(np.finfo(np.float32).max)
TWO_31 = 2.0**31

# -- numpy reference helpers -------------------------------------------------------------------


def _cast_low_byte(t: np.ndarray) -> np.ndarray:
    """`(uint8_t)(int)t` as compiled for x86: truncate toward zero; out of range or NaN gives
    INT_MIN (low byte 0)."""
    with np.errstate(invalid="ignore"):
        ok = np.abs(t) < F(TWO_31)
        i = np.where(ok, t, F(0)).astype(np.int64)
    return (i & 0xFF).astype(np.uint8)


def _min_int8(byte: np.ndarray, top: int) -> np.ndarray:
    """`MIN(top, (int8_t)v)` stored into a uint8: the comparison is signed."""
    s = byte.view(np.int8)
    return np.where(s > top, np.int8(top), s).astype(np.int8).view(np.uint8)


def _roundf(v: np.ndarray) -> np.ndarray:
    """C's roundf: halves away from zero, in float32."""
    with np.errstate(invalid="ignore"):
        t = np.trunc(v)
        return np.where(np.abs(v - t) >= F(0.5), t + np.copysign(F(1), v), t).astype(F)


def _inverse(d: np.ndarray) -> np.ndarray:
    """`d ? 1.0f/d : 0.0f` (NaN counts as true)."""
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        return np.where(d != 0, F(1) / d, F(0)).astype(F)


def _signed_absmax(x: np.ndarray) -> np.ndarray:
    """The first element of largest magnitude in each block (0.0 if none is > 0)."""
    amax = np.zeros(x.shape[0], F)
    mx = np.zeros(x.shape[0], F)
    for j in range(QK):
        v = x[:, j]
        a = np.abs(v)
        with np.errstate(invalid="ignore"):
            take = amax < a
        amax = np.where(take, a, amax)
        mx = np.where(take, v, mx)
    return mx


def _min_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mn = np.full(x.shape[0], F(FLT_MAX))
    mx = np.full(x.shape[0], F(-FLT_MAX))
    with np.errstate(invalid="ignore"):
        for j in range(QK):
            v = x[:, j]
            mn = np.where(v < mn, v, mn)
            mx = np.where(v > mx, v, mx)
    return mn, mx


def _q8_absmax(x: np.ndarray) -> np.ndarray:
    """`amax = MAX(amax, fabsf(v))` with `MAX(a, b) = a > b ? a : b`, in order."""
    amax = np.zeros(x.shape[0], F)
    with np.errstate(invalid="ignore"):
        for j in range(QK):
            a = np.abs(x[:, j])
            amax = np.where(amax > a, amax, a)
    return amax


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return f16_from_f32_ref(v).view(np.uint8).reshape(-1, 2)


def _f16_field(q: np.ndarray, at: int) -> np.ndarray:
    """The fp16 at byte `at` of each block, as float32 (n_blocks, 1)."""
    return np.ascontiguousarray(q[:, at:at + 2]).view(np.float16).astype(F)


def _pack_nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """`lo | hi << 4`, kept to a byte."""
    return (lo | (hi << np.uint8(4))).astype(np.uint8)


def _pack_qh(xi: np.ndarray) -> np.ndarray:
    """Bit 4 of each of the 32 levels -> a little-endian uint32 (4 bytes)."""
    return np.packbits((xi >> 4) & 1, axis=-1, bitorder="little")


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes of nibbles -> 32 levels: low nibbles first, then high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _qh_bits(q: np.ndarray, at: int) -> np.ndarray:
    """The fifth bit of each of the 32 levels, from the uint32 at byte `at`, as 0 or 16."""
    bits = np.unpackbits(np.ascontiguousarray(q[:, at:at + 4]), axis=-1, bitorder="little")
    return bits.astype(np.uint8) << np.uint8(4)


# -- IR helpers ------------------------------------------------------------------------------

V32F = ir.VectorType(f32, QK)


def _vt(t: ir.Type, n: int = QK) -> ir.VectorType:
    return vec(t, n)


def _splat(b: ir.IRBuilder, v: ir.Value, n: int = QK) -> ir.Value:
    return splat(b, v, n)


def _vconst(t: ir.Type, v, n: int = QK) -> ir.Constant:
    return vconst(t, v, n)


_shuffle, _intrinsic, _fabs, _tree = shuffle, intrinsic, fabs, lane_tree
_vmax, _vmin = lane_max, lane_min


def _mask(b: ir.IRBuilder, bits: ir.Value) -> ir.Value:
    """<32 x i1> -> i32, lane j in bit j."""
    return b.bitcast(bits, i32)


def _sign_mask(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """The sign bits of the lanes of a float vector, as an i32 mask."""
    return _mask(b, b.icmp_signed("<", b.bitcast(v, _vt(i32)), _vconst(i32, 0)))


def _first_is_negative(b: ir.IRBuilder, eq: ir.Value, neg: ir.Value) -> ir.Value:
    """Whether the first lane set in the (non-zero) mask `eq` is set in `neg`."""
    lowest = b.and_(eq, b.sub(const(i32, 0), eq))
    return b.icmp_unsigned("!=", b.and_(lowest, neg), const(i32, 0))


def _first_equal(b: ir.IRBuilder, v: ir.Value, s: ir.Value) -> ir.Value:
    """`s`, one of the lanes of `v`, with the sign of the first lane equal to it: what a
    sequential scan returns when +0 and -0 tie."""
    eq = _mask(b, b.fcmp_ordered("==", v, _splat(b, s)))
    mag = _intrinsic(b, "llvm.fabs.f32", f32, [s])
    return b.select(_first_is_negative(b, eq, _sign_mask(b, v)), b.fneg(mag), mag)


def _load_block(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    return b.load(b.bitcast(x, ptr(V32F)), align=4)


_at, _load_f16, _store_f16 = at, load_f16, store_f16


def _emit_inverse(b: ir.IRBuilder, d: ir.Value) -> ir.Value:
    inv = b.fdiv(const(f32, 1.0), d)
    return b.select(b.fcmp_unordered("!=", d, const(f32, 0.0)), inv, const(f32, 0.0))


def _emit_cast_low_byte(b: ir.IRBuilder, t: ir.Value) -> ir.Value:
    """<32 x float> -> <32 x i8>: x86's truncating cast (out of range / NaN -> 0), low byte."""
    ok = b.fcmp_ordered("<", _fabs(b, t), _vconst(f32, TWO_31))
    byte = b.trunc(b.fptosi(t, _vt(i32)), _vt(i8))
    return b.select(ok, byte, _vconst(i8, 0))


def _emit_min_int8(b: ir.IRBuilder, q: ir.Value, top: int) -> ir.Value:
    return b.select(b.icmp_signed(">", q, _vconst(i8, top)), _vconst(i8, top), q)


def _emit_store_nibbles(b: ir.IRBuilder, lo: ir.Value, hi: ir.Value, y: ir.Value,
                        offset: int) -> None:
    packed = b.or_(lo, b.shl(hi, _vconst(i8, 4, 16)))
    b.store(packed, _at(b, y, offset, _vt(i8, 16)), align=1)


def _emit_store_q5(b: ir.IRBuilder, xi: ir.Value, y: ir.Value, qh_at: int) -> None:
    """Levels (<32 x i8>) -> the uint32 of fifth bits at `qh_at`, then 16 nibble bytes."""
    fifth = b.icmp_unsigned("!=", b.and_(xi, _vconst(i8, 0x10)), _vconst(i8, 0))
    b.store(_mask(b, fifth), _at(b, y, qh_at, i32), align=1)
    low = b.and_(xi, _vconst(i8, 0x0F))
    _emit_store_nibbles(b, _shuffle(b, low, low, range(16)),
                        _shuffle(b, low, low, range(16, 32)), y, qh_at + 4)


def _emit_signed_absmax(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """The first element of largest magnitude (+0.0 if none is > 0, NaNs skipped)."""
    ax = _fabs(b, x)
    zero = _vconst(f32, 0.0)
    a = b.select(b.fcmp_ordered("<", zero, ax), ax, zero)
    amax = _vmax(b, a)
    eq = _mask(b, b.fcmp_ordered("==", a, _splat(b, amax)))
    neg = b.and_(_first_is_negative(b, eq, _sign_mask(b, x)),
                 b.fcmp_ordered(">", amax, const(f32, 0.0)))
    return b.select(neg, b.fneg(amax), amax)


def _emit_min_max(b: ir.IRBuilder, x: ir.Value) -> tuple[ir.Value, ir.Value]:
    """`if (v < min) min = v; if (v > max) max = v;` from FLT_MAX / -FLT_MAX."""
    top, bottom = _vconst(f32, FLT_MAX), _vconst(f32, -FLT_MAX)
    lo = b.select(b.fcmp_ordered("<", x, top), x, top)
    hi = b.select(b.fcmp_ordered(">", x, bottom), x, bottom)
    return _first_equal(b, lo, _vmin(b, lo)), _first_equal(b, hi, _vmax(b, hi))


def _emit_q8_absmax(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """`amax = MAX(amax, fabsf(v))` in order: a NaN makes amax NaN and the next element
    restarts it, so the result is the max of |v| after the last NaN (NaN if that is last)."""
    nan = _mask(b, b.fcmp_unordered("uno", x, x))
    last = b.sub(const(i32, QK - 1), _intrinsic(b, "llvm.ctlz.i32", i32, [nan, const(i1, 0)]))
    after = b.icmp_signed(">", ir.Constant(_vt(i32), list(range(QK))), _splat(b, last))
    a = b.select(after, _fabs(b, x), _vconst(f32, 0.0))
    amax = _vmax(b, a)
    return b.select(b.icmp_signed("==", last, const(i32, QK - 1)),
                    const(f32, float("nan")), amax)


def _emit_roundf(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    return _intrinsic(b, f"llvm.round.v{v.type.count}f32", v.type, [v])


def _emit_levels_f32(b: ir.IRBuilder, q: ir.Value) -> ir.Value:
    """<32 x i8> (as unsigned) -> <32 x float>."""
    return b.sitofp(b.zext(q, _vt(i32)), V32F)


def _emit_load_nibbles(b: ir.IRBuilder, y: ir.Value, offset: int) -> ir.Value:
    qs = b.load(_at(b, y, offset, _vt(i8, 16)), align=1)
    lo = b.and_(qs, _vconst(i8, 0x0F, 16))
    hi = b.lshr(qs, _vconst(i8, 4, 16))
    return _shuffle(b, lo, hi, range(32))


def _emit_load_q5(b: ir.IRBuilder, y: ir.Value, qh_at: int) -> ir.Value:
    qh = b.load(_at(b, y, qh_at, i32), align=1)
    fifth = b.shl(b.zext(b.bitcast(qh, _vt(i1)), _vt(i8)), _vconst(i8, 4))
    return b.or_(_emit_load_nibbles(b, y, qh_at + 4), fifth)


def _store_block(b: ir.IRBuilder, v: ir.Value, x: ir.Value) -> None:
    b.store(v, b.bitcast(x, ptr(V32F)), align=4)


# -- the types -------------------------------------------------------------------------------


class _Legacy(QuantType):
    has_quantize_kernel = has_dequantize_kernel = True
    qs_at = 2  # bytes of scale header before the packed levels
    qh_at: int | None = None  # Q5: where the fifth bits live
    int_dot = True

    def emit_int_groups(self, b: ir.IRBuilder, src: ir.Value) -> list[IntGroup]:
        """One group: the 32 levels, w = d * q + offset (Q8_0: signed levels, no offset)."""
        d = load_f16(b, src, 0)
        if self.n_levels == 256:
            return [IntGroup(load_bytes(b, src, self.qs_at, QK), True, d, None)]
        if self.qh_at is None:
            q = _emit_load_nibbles(b, src, self.qs_at)
        else:
            q = _emit_load_q5(b, src, self.qh_at)
        if 4 in (self.qs_at, self.qh_at):  # affine: d, m
            return [IntGroup(q, False, d, load_f16(b, src, 2))]
        # symmetric: the levels centred in the integers (as ggml's dot products take them),
        # so no offset term has to cancel against the sum of x
        half = ir.Constant(ir.VectorType(ir.IntType(8), QK), [self.n_levels // 2] * QK)
        return [IntGroup(b.sub(q, half), True, d, None)]


    def _store_levels(self, out: np.ndarray, xi: np.ndarray) -> None:
        """4-bit levels as nibbles after the header (Q5: fifth bits first, then nibbles)."""
        if self.qh_at is None:
            out[:, self.qs_at:] = _pack_nibbles(xi[:, :16], xi[:, 16:])
        else:
            out[:, self.qh_at:self.qh_at + 4] = _pack_qh(xi)
            low = xi & 0x0F
            out[:, self.qh_at + 4:] = _pack_nibbles(low[:, :16], low[:, 16:])

    def _emit_store_levels(self, b: ir.IRBuilder, xi: ir.Value, y: ir.Value) -> None:
        """Levels (<32 x i8>) after the block's header at y (Q5: fifth bits, then nibbles)."""
        if self.qh_at is None:
            _emit_store_nibbles(b, _shuffle(b, xi, xi, range(16)),
                                _shuffle(b, xi, xi, range(16, 32)), y, self.qs_at)
        else:
            _emit_store_q5(b, xi, y, self.qh_at)

    def levels_ref(self, q: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(q, np.uint8)
        if self.qh_at is None:
            return _nibbles(q[:, self.qs_at:])
        return _nibbles(q[:, self.qh_at + 4:]) | _qh_bits(q, self.qh_at)


class _Symmetric(_Legacy):
    """Q4_0 / Q5_0: d = max / -(n_levels / 2), the max being the signed element of largest
    magnitude; level = MIN(n_levels - 1, (int8_t)(x / d + n_levels / 2 + 0.5))."""

    activation_type = GGMLType.Q8_0

    def quantize_blocks_ref(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, F)
        half = self.n_levels // 2
        d = _signed_absmax(x) / F(-half)
        id_ = _inverse(d)
        with np.errstate(over="ignore", invalid="ignore"):
            t = x * id_[:, None] + F(half + 0.5)
        xi = _min_int8(_cast_low_byte(t), self.n_levels - 1)
        out = np.empty((x.shape[0], self.info.type_size), np.uint8)
        out[:, 0:2] = _f16_bytes(d)
        self._store_levels(out, xi)
        return out

    uses_imatrix = True

    def quantize_rows_ref(self, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        """With an imatrix: quantize_row_q4_0_impl / q5_0_impl (make_qx_quants, weighted)."""
        if imatrix is None:
            return super().quantize_rows_ref(x)
        d16, L = legacy_symmetric_ref(x, imatrix, self.n_levels // 2)
        out = np.empty((L.shape[0], self.info.type_size), np.uint8)
        out[:, 0:2] = d16.view(np.uint8).reshape(-1, 2)
        self._store_levels(out, L)
        return out.reshape(x.shape[0], -1)

    has_imatrix_kernel = True
    imatrix_group = LEGACY_GROUP  # blocks side by side in the SIMD lanes

    def emit_imatrix_row_setup(self, b: ir.IRBuilder, x: ir.Value, n: ir.Value) -> ir.Value:
        return emit_sigma2(b, x, n, False)

    def emit_quantize_block_imatrix(self, b: ir.IRBuilder, x: ir.Value, y: ir.Value,
                                    qw: ir.Value, row: ir.Value) -> None:
        ts = self.info.type_size
        for s, (d, xi) in enumerate(emit_legacy_symmetric_imatrix(b, x, qw, row,
                                                                  self.n_levels // 2)):
            _store_f16(b, d, y, s * ts)
            self._emit_store_levels(b, xi, b.gep(y, [const(i32, s * ts)]))

    def dequantize_blocks_ref(self, q: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(q, np.uint8)
        d = _f16_field(q, 0)
        levels = self.levels_ref(q).astype(np.int32) - self.n_levels // 2
        with np.errstate(invalid="ignore"):
            return levels.astype(F) * d

    def emit_quantize_block(self, b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> None:
        half = self.n_levels // 2
        v = _load_block(b, x)
        d = b.fdiv(_emit_signed_absmax(b, v), const(f32, -half))
        id_ = _emit_inverse(b, d)
        _store_f16(b, d, y, 0)
        t = b.fadd(b.fmul(v, _splat(b, id_)), _vconst(f32, half + 0.5))
        xi = _emit_min_int8(b, _emit_cast_low_byte(b, t), self.n_levels - 1)
        if self.qh_at is None:
            _emit_store_nibbles(b, _shuffle(b, xi, xi, range(16)),
                                _shuffle(b, xi, xi, range(16, 32)), y, 2)
        else:
            _emit_store_q5(b, xi, y, self.qh_at)

    def emit_dequantize_block(self, b: ir.IRBuilder, y: ir.Value, x: ir.Value) -> None:
        d = _load_f16(b, y, 0)
        if self.qh_at is None:
            q = _emit_load_nibbles(b, y, 2)
        else:
            q = _emit_load_q5(b, y, self.qh_at)
        centred = b.sub(b.zext(q, _vt(i32)), _vconst(i32, self.n_levels // 2))
        _store_block(b, b.fmul(b.sitofp(centred, V32F), _splat(b, d)), x)


class _Affine(_Legacy):
    """Q4_1 / Q5_1: d = (max - min) / (n_levels - 1), m = min; level = (x - min) / d + 0.5
    truncated (capped at 15 for Q4_1; Q5_1 keeps the low byte as it is)."""

    qs_at = 4  # d and m
    activation_type = GGMLType.Q8_1
    cap: int | None = None

    def quantize_blocks_ref(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, F)
        mn, mx = _min_max(x)
        with np.errstate(over="ignore", invalid="ignore"):
            d = (mx - mn) / F(self.n_levels - 1)
            id_ = _inverse(d)
            t = (x - mn[:, None]) * id_[:, None] + F(0.5)
        xi = _cast_low_byte(t)
        if self.cap is not None:
            xi = _min_int8(xi, self.cap)
        out = np.empty((x.shape[0], self.info.type_size), np.uint8)
        out[:, 0:2] = _f16_bytes(d)
        out[:, 2:4] = _f16_bytes(mn)
        self._store_levels(out, xi)
        return out

    uses_imatrix = True

    def quantize_rows_ref(self, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        """With an imatrix: quantize_row_q4_1_impl / q5_1_impl (make_qkx3_quants, weighted)."""
        if imatrix is None:
            return super().quantize_rows_ref(x)
        d16, m16, L = legacy_affine_ref(x, imatrix, self.n_levels - 1)
        out = np.empty((L.shape[0], self.info.type_size), np.uint8)
        out[:, 0:2] = d16.view(np.uint8).reshape(-1, 2)
        out[:, 2:4] = m16.view(np.uint8).reshape(-1, 2)
        self._store_levels(out, L)
        return out.reshape(x.shape[0], -1)

    has_imatrix_kernel = True
    imatrix_group = LEGACY_GROUP  # blocks side by side in the SIMD lanes

    def emit_imatrix_row_setup(self, b: ir.IRBuilder, x: ir.Value, n: ir.Value) -> ir.Value:
        return emit_sigma2(b, x, n, False)

    def emit_quantize_block_imatrix(self, b: ir.IRBuilder, x: ir.Value, y: ir.Value,
                                    qw: ir.Value, row: ir.Value) -> None:
        ts = self.info.type_size
        for s, (d, m, xi) in enumerate(emit_legacy_affine_imatrix(b, x, qw, row,
                                                                  self.n_levels - 1)):
            _store_f16(b, d, y, s * ts)
            _store_f16(b, m, y, s * ts + 2)
            self._emit_store_levels(b, xi, b.gep(y, [const(i32, s * ts)]))

    def dequantize_blocks_ref(self, q: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(q, np.uint8)
        d, m = _f16_field(q, 0), _f16_field(q, 2)
        with np.errstate(over="ignore", invalid="ignore"):
            return self.levels_ref(q).astype(F) * d + m

    def emit_quantize_block(self, b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> None:
        v = _load_block(b, x)
        mn, mx = _emit_min_max(b, v)
        d = b.fdiv(b.fsub(mx, mn), const(f32, self.n_levels - 1))
        id_ = _emit_inverse(b, d)
        _store_f16(b, d, y, 0)
        _store_f16(b, mn, y, 2)
        t = b.fadd(b.fmul(b.fsub(v, _splat(b, mn)), _splat(b, id_)), _vconst(f32, 0.5))
        xi = _emit_cast_low_byte(b, t)
        if self.cap is not None:
            xi = _emit_min_int8(b, xi, self.cap)
        if self.qh_at is None:
            _emit_store_nibbles(b, _shuffle(b, xi, xi, range(16)),
                                _shuffle(b, xi, xi, range(16, 32)), y, 4)
        else:
            _emit_store_q5(b, xi, y, self.qh_at)

    def emit_dequantize_block(self, b: ir.IRBuilder, y: ir.Value, x: ir.Value) -> None:
        d, m = _load_f16(b, y, 0), _load_f16(b, y, 2)
        if self.qh_at is None:
            q = _emit_load_nibbles(b, y, 4)
        else:
            q = _emit_load_q5(b, y, self.qh_at)
        scaled = b.fmul(_emit_levels_f32(b, q), _splat(b, d))
        # x86 returns the first operand's NaN when both are NaN, and LLVM may swap the
        # operands of fadd: keep x*d's NaN explicitly, as ggml's `x*d + m` does.
        out = b.select(b.fcmp_unordered("uno", scaled, scaled), scaled,
                       b.fadd(scaled, _splat(b, m)))
        _store_block(b, out, x)


class _Eight(_Legacy):
    """Q8_0 / Q8_1: d = amax / 127, q = (int8_t)roundf(x / d); Q8_1 also stores
    s = fp16(sum(q) * d)."""

    n_levels = 256

    def quantize_blocks_ref(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, F)
        with np.errstate(over="ignore", invalid="ignore"):
            d = _q8_absmax(x) / F(127)
            qs = _cast_low_byte(_roundf(x * _inverse(d)[:, None]))
        out = np.empty((x.shape[0], self.info.type_size), np.uint8)
        out[:, 0:2] = _f16_bytes(d)
        out[:, self.qs_at:] = qs
        if self.qs_at == 4:  # Q8_1: s = sum(qs) * d (integers: the order is moot)
            total = qs.view(np.int8).astype(np.int32).sum(axis=1)
            with np.errstate(over="ignore", invalid="ignore"):
                out[:, 2:4] = _f16_bytes(total.astype(F) * d)
        return out

    def levels_ref(self, q: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(q, np.uint8)
        return q[:, self.qs_at:].view(np.int8).astype(np.int16) + 128

    def dequantize_blocks_ref(self, q: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(q, np.uint8)
        with np.errstate(invalid="ignore"):
            return q[:, self.qs_at:].view(np.int8).astype(F) * _f16_field(q, 0)

    def _emit_quantize(self, b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> tuple:
        v = _load_block(b, x)
        d = b.fdiv(_emit_q8_absmax(b, v), const(f32, 127.0))
        _store_f16(b, d, y, 0)
        qs = _emit_cast_low_byte(b, _emit_roundf(b, b.fmul(v, _splat(b, _emit_inverse(b, d)))))
        b.store(qs, _at(b, y, self.qs_at, _vt(i8)), align=1)
        return d, qs

    def emit_quantize_block(self, b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> None:
        self._emit_quantize(b, x, y)

    def emit_dequantize_block(self, b: ir.IRBuilder, y: ir.Value, x: ir.Value) -> None:
        d = _load_f16(b, y, 0)
        qs = b.load(_at(b, y, self.qs_at, _vt(i8)), align=1)
        _store_block(b, b.fmul(b.sitofp(qs, V32F), _splat(b, d)), x)


@register
class Q4_0(_Symmetric):
    type = GGMLType.Q4_0
    n_levels = 16


@register
class Q5_0(_Symmetric):
    type = GGMLType.Q5_0
    n_levels = 32
    qh_at = 2


@register
class Q4_1(_Affine):
    type = GGMLType.Q4_1
    n_levels = 16
    cap = 15


@register
class Q5_1(_Affine):
    type = GGMLType.Q5_1
    n_levels = 32
    qh_at = 4


@register
class Q8_0(_Eight):
    type = GGMLType.Q8_0
    activation_type = GGMLType.Q8_0


@register
class Q8_1(_Eight):
    """ggml has no dequantizer for Q8_1; ours is qs * d, like Q8_0's."""

    type = GGMLType.Q8_1
    qs_at = 4
    weight_type = False  # llama.cpp's activation type for the Q4_1/Q5_1 products

    def emit_quantize_block(self, b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> None:
        d, qs = self._emit_quantize(b, x, y)
        wide = b.sext(qs, _vt(i32))
        total = _tree(b, wide, lambda p, q: b.add(p, q))
        _store_f16(b, b.fmul(b.sitofp(total, f32), d), y, 2)
