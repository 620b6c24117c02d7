"""TQ1_0 and TQ2_0, the ternary types (BitNet b1.58, TriLM): weights -1, 0, +1 times one fp16
scale per 256, bit-exact with llama.cpp's `quantize_row_tq{1,2}_0_ref` and dequantizers.

Both take d = max |x| (ggml's `MAX` macro, in order: a NaN resets it) and the trit
lroundf(x / d) + 1 in {0, 1, 2}.

TQ2_0 (66 bytes): 64 bytes of 2-bit fields, then fp16 d. Byte m of each 32-byte group holds
weights m, m + 32, m + 64, m + 96 of its 128 in bits 0-1, 2-3, 4-5, 6-7.

TQ1_0 (54 bytes): 48 bytes of five trits, 4 bytes of four trits, then fp16 d. A byte holds
its trits t0..t4 as the base-3 number t0 t1 t2 t3 t4 scaled to a byte, ceil(n * 256 / 243),
so that trit k is the top "digit" of (byte * 3^k mod 256) * 3 / 256. Bytes 0-31 hold weights
m + 32n (n = 0..4) of the first 160; bytes 32-47 weights 160 + m + 16n; the four last bytes
weights 240 + j + 4n (n = 0..3, shifted up one trit).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir

from ...gguf import GGMLType
from ...jit.builders import const, f32, fabs, i8, i16, i32, intrinsic, ptr, splat, vconst, vec
from ...jit.floats import load_f16, store_f16
from ..base import IntGroup, IntSuperBlock, QuantType, register
from ..floats import f16_from_f32_ref
from ..kquants._qkx2 import F32, half_bytes, half_ref

QK_K = 256
POW3 = np.array([1, 3, 9, 27, 81, 243], np.uint32)


def _absmax_ref(x: np.ndarray) -> np.ndarray:
    """`amax = MAX(amax, fabsf(v))` over each row in order (a NaN makes it NaN until the next
    element replaces it)."""
    amax = np.zeros(x.shape[0], F32)
    with np.errstate(invalid="ignore"):
        for j in range(x.shape[1]):
            a = np.abs(x[:, j])
            amax = np.where(amax > a, amax, a)
    return amax


def _trits_ref(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(d (n,), low byte of lroundf(x / d) + 1 (n, 256) as int32)."""
    d = _absmax_ref(x)
    with np.errstate(all="ignore"):
        idv = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
        v = x * idv[:, None]
        t = np.trunc(v)
        r = np.where(np.abs(v - t) >= F32(0.5), t + np.copysign(F32(1), v), t)
        # lroundf of NaN or of anything beyond a long is LONG_MIN on x86-64: low bits 0
        ok = np.abs(r) < F32(2.0**62)
        xi = np.where(ok, r, 0).astype(np.int64)
    return d, ((xi + 1) & 0xFF).astype(np.int32)


def _pack_base3_ref(t: np.ndarray, extra_shift: bool = False) -> np.ndarray:
    """Trits (..., k) -> bytes: q = q*3 + t in uint8, then ceil(q * 256 / 243) kept to a byte."""
    q = np.zeros(t.shape[:-1], np.int32)
    for k in range(t.shape[-1]):
        q = (q * 3 + t[..., k]) & 0xFF
    if extra_shift:
        q = (q * 3) & 0xFF
    return (((q * 256 + 242) // 243) & 0xFF).astype(np.uint8)


def _unpack_base3_ref(byte: np.ndarray, n: int) -> np.ndarray:
    """Bytes (...) -> trits (..., n): ((byte * 3^k mod 256) * 3) >> 8."""
    q = (byte[..., None].astype(np.uint32) * POW3[:n]) & 0xFF
    return ((q * 3) >> 8).astype(np.int32)


def _emit_trits(b: ir.IRBuilder, byte: ir.Value, mult: ir.Value) -> ir.Value:
    """<n x i8> bytes, <n x i8> powers of 3 -> <n x i32> trits (0..2)."""
    n = byte.type.count
    q = b.zext(b.mul(byte, mult), vec(i16, n))
    t = b.lshr(b.mul(q, ir.Constant(vec(i16, n), [3] * n)), ir.Constant(vec(i16, n), [8] * n))
    return b.zext(t, vec(i32, n))


def _emit_store_trits(b: ir.IRBuilder, t: ir.Value, d: ir.Value, x: ir.Value, at: int) -> None:
    """(trit - 1) * d for the lanes of t, stored at float offset `at` of x."""
    n = t.type.count
    v = b.fmul(b.sitofp(b.sub(t, ir.Constant(vec(i32, n), [1] * n)), vec(f32, n)),
               splat(b, d, n))
    b.store(v, b.bitcast(b.gep(x, [const(i32, at)]), ptr(vec(f32, n))), align=4)


def _emit_trits_of_block(b: ir.IRBuilder, x: ir.Value, y: ir.Value, d_at: int) -> list:
    """d = max |x| (stored as fp16 at `d_at`) and the low byte of lroundf(x / d) + 1 for the
    256 weights at x, as eight <32 x i8> (weights 32k .. 32k + 31)."""
    vf = vec(f32, 32)
    xp = b.bitcast(x, ptr(vf))
    vs = [b.load(b.gep(xp, [const(i32, k)]), align=4) for k in range(8)]
    amax = const(f32, 0.0)
    for v in vs:  # MAX(amax, |v|) in order: a NaN takes over until the next element
        for j in range(32):
            a = fabs(b, b.extract_element(v, const(i32, j)))
            amax = b.select(b.fcmp_ordered(">", amax, a), amax, a)
    store_f16(b, amax, y, d_at)
    idv = b.select(b.fcmp_unordered("!=", amax, const(f32, 0.0)),
                   b.fdiv(const(f32, 1.0), amax), const(f32, 0.0))
    out = []
    for v in vs:
        r = intrinsic(b, "llvm.round.v32f32", vf, [b.fmul(v, splat(b, idv, 32))])
        ok = b.fcmp_ordered("<", fabs(b, r), vconst(f32, 2.0**31, 32))
        xi = b.select(ok, b.trunc(b.fptosi(r, vec(i32, 32)), vec(i8, 32)), vconst(i8, 0, 32))
        out.append(b.add(xi, vconst(i8, 1, 32)))
    return out


def _emit_ceil_byte(b: ir.IRBuilder, q: ir.Value) -> ir.Value:
    """<n x i8> q -> ceil(q * 256 / 243) kept to a byte."""
    n = q.type.count
    w = b.add(b.shl(b.zext(q, vec(i16, n)), vconst(i16, 8, n)), vconst(i16, 242, n))
    return b.trunc(b.udiv(w, vconst(i16, 243, n)), vec(i8, n))


def _emit_base3(b: ir.IRBuilder, trits: list) -> ir.Value:
    q = trits[0]
    for t in trits[1:]:
        q = b.add(b.mul(q, vconst(i8, 3, q.type.count)), t)
    return q


def _part(b: ir.IRBuilder, v: ir.Value, start: int, n: int) -> ir.Value:
    return b.shuffle_vector(v, v, ir.Constant(vec(i32, n), list(range(start, start + n))))


def _int_superblock(group, d: ir.Value) -> IntSuperBlock:
    """As ggml's AVX2 `vec_dot_tq{1,2}_0_q8_K` takes a block: the levels 0..2 (unsigned)
    dotted with Q8_K's levels in 8 i32 lanes, less Q8_K's sums of 16 (the levels' -1: the
    16 sums pairwise into the 8 lanes), converted once and times d * dx. Not in llama.cpp's
    tiled kernel: its prompts sum in this order too."""
    ones = ir.Constant(vec(i16, 16), [1] * 16)
    return IntSuperBlock(lambda g: IntGroup(group(g), False, None, None), d, ones, None, "sub")


def _concat(b: ir.IRBuilder, lo: ir.Value, hi: ir.Value) -> ir.Value:
    n = lo.type.count
    return b.shuffle_vector(lo, hi, ir.Constant(vec(i32, 2 * n), list(range(2 * n))))


def _load(b: ir.IRBuilder, y: ir.Value, offset: int, n: int) -> ir.Value:
    return b.load(b.bitcast(b.gep(y, [const(i32, offset)]), ptr(vec(i8, n))), align=1)


def _emit_qh_trits(b: ir.IRBuilder, y: ir.Value) -> ir.Value:
    """TQ1_0's last 16 trits (weights 240..255, from its 4 bytes at 48) as <16 x i32>."""
    qh = _load(b, y, 48, 4)
    spread = b.shuffle_vector(qh, qh, ir.Constant(vec(i32, 16), [0, 1, 2, 3] * 4))
    p = ir.Constant(vec(i8, 16), [int(POW3[n]) for n in range(4) for _ in range(4)])
    return _emit_trits(b, spread, p)


@register
class TQ1_0(QuantType):
    type = GGMLType.TQ1_0
    activation_type = GGMLType.Q8_K
    n_levels = 3
    has_quantize_kernel = has_dequantize_kernel = True

    def quantize_blocks_ref(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, F32)
        nb = x.shape[0]
        d, t = _trits_ref(x)
        a = t[:, :160].reshape(nb, 5, 32).transpose(0, 2, 1)  # (block, byte m, trit n)
        c = t[:, 160:240].reshape(nb, 5, 16).transpose(0, 2, 1)
        h = t[:, 240:].reshape(nb, 4, 4).transpose(0, 2, 1)
        return np.concatenate([_pack_base3_ref(a), _pack_base3_ref(c),
                               _pack_base3_ref(h, extra_shift=True),
                               half_bytes(f16_from_f32_ref(d))], axis=1)

    def levels_ref(self, q: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(q, np.uint8)
        nb = q.shape[0]
        a = _unpack_base3_ref(q[:, :32], 5).transpose(0, 2, 1).reshape(nb, 160)
        c = _unpack_base3_ref(q[:, 32:48], 5).transpose(0, 2, 1).reshape(nb, 80)
        h = _unpack_base3_ref(q[:, 48:52], 4).transpose(0, 2, 1).reshape(nb, 16)
        return np.concatenate([a, c, h], axis=1)

    def dequantize_blocks_ref(self, q: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(q, np.uint8)
        with np.errstate(all="ignore"):
            return (self.levels_ref(q) - 1).astype(F32) * half_ref(q[:, 52:54])[:, None]

    def emit_quantize_block(self, b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> None:
        V = _emit_trits_of_block(b, x, y, 52)
        st = lambda v, at: b.store(v, b.bitcast(b.gep(y, [const(i32, at)]),  # noqa: E731
                                                ptr(v.type)), align=1)
        st(_emit_ceil_byte(b, _emit_base3(b, V[:5])), 0)
        W = [_part(b, V[5 + n // 2], 16 * (n % 2), 16) for n in range(5)]
        st(_emit_ceil_byte(b, _emit_base3(b, W)), 32)
        H = [_part(b, V[7], 16 + 4 * m, 4) for m in range(4)]
        h = _emit_base3(b, H)
        st(_emit_ceil_byte(b, b.mul(h, vconst(i8, 3, 4))), 48)

    def emit_dequantize_block(self, b: ir.IRBuilder, y: ir.Value, x: ir.Value) -> None:
        d = load_f16(b, y, 52)
        for offset, width, at in ((0, 32, 0), (32, 16, 160)):
            byte = _load(b, y, offset, width)
            for n in range(5):
                p = ir.Constant(vec(i8, width), [int(POW3[n]) & 0xFF] * width)
                _emit_store_trits(b, _emit_trits(b, byte, p), d, x, at + width * n)
        _emit_store_trits(b, _emit_qh_trits(b, y), d, x, 240)

    int_dot = int_superblock = True
    int_tiled = False

    def emit_int_superblock(self, b: ir.IRBuilder, src: ir.Value) -> IntSuperBlock:
        def trits(offset: int, width: int, n: int) -> ir.Value:  # <width x i8>
            p = ir.Constant(vec(i8, width), [int(POW3[n]) & 0xFF] * width)
            return b.trunc(_emit_trits(b, _load(b, src, offset, width), p), vec(i8, width))

        def group(g: int) -> ir.Value:  # weights 32g .. 32g + 31 (see the module docstring)
            if g < 5:
                return trits(0, 32, g)
            if g < 7:
                return _concat(b, trits(32, 16, 2 * (g - 5)), trits(32, 16, 2 * (g - 5) + 1))
            last = b.trunc(_emit_qh_trits(b, src), vec(i8, 16))
            return _concat(b, trits(32, 16, 4), last)

        return _int_superblock(group, load_f16(b, src, 52))


@register
class TQ2_0(QuantType):
    type = GGMLType.TQ2_0
    activation_type = GGMLType.Q8_K
    n_levels = 4  # 2-bit fields (the quantizer writes 0..2)
    has_quantize_kernel = has_dequantize_kernel = True

    def quantize_blocks_ref(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, F32)
        nb = x.shape[0]
        d, t = _trits_ref(x)
        t = (t & 3).reshape(nb, 2, 4, 32)  # (block, group, field n, byte m)
        qs = (t[:, :, 0] | t[:, :, 1] << 2 | t[:, :, 2] << 4 | t[:, :, 3] << 6) & 0xFF
        return np.concatenate([qs.reshape(nb, 64).astype(np.uint8),
                               half_bytes(f16_from_f32_ref(d))], axis=1)

    def levels_ref(self, q: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(q, np.uint8)
        qs = q[:, :64].reshape(-1, 2, 1, 32)
        shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
        return ((qs >> shifts) & 3).reshape(-1, 256)

    def dequantize_blocks_ref(self, q: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(q, np.uint8)
        with np.errstate(all="ignore"):
            lv = self.levels_ref(q).astype(np.int32) - 1
            return lv.astype(F32) * half_ref(q[:, 64:66])[:, None]

    def emit_quantize_block(self, b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> None:
        V = [b.and_(v, vconst(i8, 3, 32)) for v in _emit_trits_of_block(b, x, y, 64)]
        for g in range(2):
            q = V[4 * g]
            for n in range(1, 4):
                q = b.or_(q, b.shl(V[4 * g + n], vconst(i8, 2 * n, 32)))
            b.store(q, b.bitcast(b.gep(y, [const(i32, 32 * g)]), ptr(q.type)), align=1)

    def emit_dequantize_block(self, b: ir.IRBuilder, y: ir.Value, x: ir.Value) -> None:
        d = load_f16(b, y, 64)
        three = ir.Constant(vec(i32, 32), [3] * 32)
        for g in range(2):
            byte = b.zext(_load(b, y, 32 * g, 32), vec(i32, 32))
            for n in range(4):
                t = b.and_(b.lshr(byte, ir.Constant(vec(i32, 32), [2 * n] * 32)), three)
                _emit_store_trits(b, t, d, x, 128 * g + 32 * n)

    int_dot = int_superblock = True
    int_tiled = False

    def emit_int_superblock(self, b: ir.IRBuilder, src: ir.Value) -> IntSuperBlock:
        def group(g: int) -> ir.Value:  # weights 32g .. 32g + 31: bits 2n of byte group g // 4
            byte = _load(b, src, 32 * (g // 4), 32)
            return b.and_(b.lshr(byte, vconst(i8, 2 * (g % 4), 32)), vconst(i8, 3, 32))

        return _int_superblock(group, load_f16(b, src, 64))
