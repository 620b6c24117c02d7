"""MXFP4 (OCP microscaling FP4): blocks of 32 weights as E2M1 codes with one shared E8M0
scale, bit-exact with llama.cpp's `quantize_row_mxfp4_ref` and `dequantize_row_mxfp4`.

Block layout (17 bytes): the scale exponent e, then 16 bytes of nibbles (weight j low,
j + 16 high). ggml keeps the E2M1 values doubled as small integers (0, 1, 2, 3, 4, 6, 8, 12
and their negatives, the sign in bit 3), so the scale it multiplies them by is half of
2^(e - 127).

The quantizer picks e = floor(log2(max |x|)) - 2 + 127 with the C library's `log2f` (the
kernel calls the same `log2f` ggml does; the reference calls it through ctypes where the
floor could depend on its last bit), then the code nearest each weight, the first on ties.
llama.cpp's quantizer takes no importance weights for this type.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache

import numpy as np
from llvmlite import ir

from ...gguf import GGMLType
from ...jit.builders import const, f32, fabs, i8, i32, lane_max, ptr, splat, vconst, vec
from ..base import QuantType, register
from ..kquants._qkx2 import F32
from ..legacy import _cast_low_byte
from .iq4 import emit_lookup16, pack_nibbles_ref, unpack_nibbles_ref

QK = 32
# E2M1 values times two, by code (llama.cpp's `kvalues_mxfp4`)
KVALUES_MXFP4 = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.int8)
_KV = KVALUES_MXFP4.astype(F32)


@cache
def _libm_log2f():
    lib = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    fn = lib.log2f
    fn.restype, fn.argtypes = ctypes.c_float, [ctypes.c_float]
    return fn


def floor_log2_ref(a: np.ndarray) -> np.ndarray:
    """floorf(log2f(a)) for a > 0 (float32): the binary exponent, except just below a power
    of two, where log2f may round up to the next integer: those few ask the C library."""
    a = np.asarray(a, F32)
    mant, ex = np.frexp(a)
    out = (ex - 1).astype(F32)
    close = np.flatnonzero((mant > F32(0.999)) | ~np.isfinite(a))
    log2f = _libm_log2f()
    for k in close:
        out.flat[k] = np.floor(F32(log2f(float(a.flat[k]))))
    return out


def e8m0_half_ref(e: np.ndarray) -> np.ndarray:
    """`ggml_e8m0_to_fp32_half`: 2^(e - 128) as float32, denormal for e < 2."""
    e = np.asarray(e, np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << 23).astype(np.uint32)
    return bits.view(F32)


@register
class MXFP4(QuantType):
    type = GGMLType.MXFP4
    activation_type = GGMLType.Q8_0
    n_levels = 16
    has_quantize_kernel = has_dequantize_kernel = True

    def quantize_blocks_ref(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, F32)
        nb = x.shape[0]
        amax = np.zeros(nb, F32)
        with np.errstate(all="ignore"):
            for j in range(QK):
                a = np.abs(x[:, j])
                amax = np.where(amax < a, a, amax)
            pos = amax > 0
            fl = floor_log2_ref(np.where(pos, amax, F32(1)))
            e = np.where(pos, _cast_low_byte(fl - F32(2) + F32(127)), 0).astype(np.uint8)
            d = e8m0_half_ref(e)
            best = np.abs(_KV[0] * d[:, None] - x)
            idx = np.zeros(x.shape, np.uint8)
            for i in range(1, 16):
                err = np.abs(_KV[i] * d[:, None] - x)
                take = err < best
                best = np.where(take, err, best)
                idx = np.where(take, np.uint8(i), idx)
        return np.concatenate([e[:, None], pack_nibbles_ref(idx)], axis=1)

    def levels_ref(self, q: np.ndarray) -> np.ndarray:
        return unpack_nibbles_ref(np.ascontiguousarray(q, np.uint8)[:, 1:])

    def dequantize_blocks_ref(self, q: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(q, np.uint8)
        with np.errstate(all="ignore"):
            return _KV[self.levels_ref(q)] * e8m0_half_ref(q[:, 0])[:, None]

    @staticmethod
    def _emit_scale(b: ir.IRBuilder, e: ir.Value) -> ir.Value:
        """e (i32, 0..255) -> ggml_e8m0_to_fp32_half(e)."""
        small = b.icmp_unsigned("<", e, const(i32, 2))
        bits = b.select(small, b.shl(const(i32, 0x00200000), e),
                        b.shl(b.sub(e, const(i32, 1)), const(i32, 23)))
        return b.bitcast(bits, f32)

    def emit_quantize_block(self, b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> None:
        vf = vec(f32, QK)
        v = b.load(b.bitcast(x, ptr(vf)), align=4)
        a = fabs(b, v)
        zero = vconst(f32, 0.0, QK)
        amax = lane_max(b, b.select(b.fcmp_ordered(">", a, zero), a, zero))  # NaNs skipped
        m = b.module
        log2f = m.globals.get("log2f") or ir.Function(m, ir.FunctionType(f32, [f32]), "log2f")
        floor = (m.globals.get("llvm.floor.f32")
                 or ir.Function(m, ir.FunctionType(f32, [f32]), "llvm.floor.f32"))
        pos = b.fcmp_ordered(">", amax, const(f32, 0.0))
        safe = b.select(pos, amax, const(f32, 1.0))
        t = b.fadd(b.fsub(b.call(floor, [b.call(log2f, [safe])]), const(f32, 2.0)),
                   const(f32, 127.0))
        in_range = b.fcmp_ordered("<", fabs(b, t), const(f32, 2.0**31))
        e = b.and_(b.select(in_range, b.fptosi(t, i32), const(i32, 0)), const(i32, 0xFF))
        e = b.select(pos, e, const(i32, 0))
        b.store(b.trunc(e, i8), y)
        d = self._emit_scale(b, e)
        best = idx = None
        for i in range(16):
            err = fabs(b, b.fsub(splat(b, b.fmul(const(f32, float(_KV[i])), d), QK), v))
            if i == 0:
                best, idx = err, vconst(i8, 0, QK)
                continue
            take = b.fcmp_ordered("<", err, best)
            best = b.select(take, err, best)
            idx = b.select(take, vconst(i8, i, QK), idx)
        lo = b.shuffle_vector(idx, idx, ir.Constant(vec(i32, 16), list(range(16))))
        hi = b.shuffle_vector(idx, idx, ir.Constant(vec(i32, 16), list(range(16, 32))))
        packed = b.or_(lo, b.shl(hi, vconst(i8, 4, 16)))
        b.store(packed, b.bitcast(b.gep(y, [const(i32, 1)]), ptr(vec(i8, 16))), align=1)

    def emit_dequantize_block(self, b: ir.IRBuilder, y: ir.Value, x: ir.Value) -> None:
        d = self._emit_scale(b, b.zext(b.load(y), i32))
        qs = b.zext(b.load(b.bitcast(b.gep(y, [const(i32, 1)]), ptr(vec(i8, 16))), align=1),
                    vec(i32, 16))
        lo = b.and_(qs, vconst(i32, 0xF, 16))
        hi = b.lshr(qs, vconst(i32, 4, 16))
        idx = b.shuffle_vector(lo, hi, ir.Constant(vec(i32, 32), list(range(32))))
        kv = b.sitofp(emit_lookup16(b, idx, KVALUES_MXFP4), vec(f32, QK))
        b.store(b.fmul(kv, splat(b, d, QK)), b.bitcast(x, ptr(vec(f32, QK))), align=4)
