"""IQ4_NL and IQ4_XS: 4-bit indices into a fixed non-linear table of 16 int8 values, bit-exact
with llama.cpp's `quantize_iq4_nl` / `quantize_iq4_xs` (what `ggml_quantize_chunk` and
llama-quantize run) and their dequantizers.

IQ4_NL (18 bytes / 32 weights): fp16 d, 16 bytes of nibbles (weight j low, j + 16 high).
IQ4_XS (136 bytes / 256 weights): fp16 d, a uint16 of the high 2 bits of the eight 6-bit
sub-block scales, 4 bytes of their low nibbles, then 8 x 16 bytes of nibbles laid out as in
IQ4_NL; weight = d * (scale - 32) * table[nibble].

Both search each 32-weight sub-block's scale the same way (`quantize_row_iq4_nl_impl`): start
from max / table[0], refine by weighted least squares, and try 15 more inverse scales
(itry - 127) / max, keeping the one with the best weighted fit. Weights are the imatrix
column times sqrt(sigma2 + x^2) (sigma2 = twice the mean square of the super-block), or x^2
without one. IQ4_NL stores that scale; IQ4_XS stores d = -max_scale / 32 and a 6-bit integer
multiple of d per sub-block, then picks the levels again with the rounded scale.

The compiled quantizer runs eight sub-blocks at once, one per vector lane (eight IQ4_NL
blocks, or the eight sub-blocks of an IQ4_XS super-block): every C loop over a sub-block's
elements becomes a loop of 8-lane vector ops whose lanes each keep the C order.
The table lookup `best_index_int8` (a binary search in C) is a chain of compares and selects
that gives the same index for every float input, NaN and infinities included.
"""

from __future__ import annotations

import ctypes
from functools import cached_property

import numpy as np
from llvmlite import ir

from ...gguf import GGMLType
from ...jit import compile_kernels, parallel_rows
from ...jit.builders import (
    Target,
    alloca_entry,
    const,
    f32,
    fabs,
    for_range,
    i8,
    i16,
    i32,
    i64,
    intrinsic,
    load_bytes,
    ptr,
    vconst,
    vec,
    void,
)
from ...jit.floats import emit_f32_to_f16, hardware_half, load_f16
from ..base import MIN_ELEMENTS_PER_THREAD, IntGroup, IntSuperBlock, QuantType, register
from ..floats import f16_from_f32_ref
from ..kquants._qkx2 import F32, Lanes, half_bytes, half_ref, nearest_int_ref, seq_sum_ref

# the 16 values of llama.cpp's `kvalues_iq4nl`, sorted
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10,
                          1, 13, 25, 38, 53, 69, 89, 113], np.int8)
_KV = KVALUES_IQ4NL.astype(F32)
GROUP_MAX_EPS = F32(1e-15)  # a sub-block whose largest |x| is below this gets scale 0
NTRY = 7  # inverse scales tried around the first guess: (itry - 127) / max, |itry| <= 7
SUB = 32  # weights per sub-block (and per IQ4_NL block)
LANES = 8  # sub-blocks quantized side by side by the kernel

_ROW_SIG = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                            ctypes.c_int64, ctypes.c_int64)

# -- numpy reference --------------------------------------------------------------------------


def best_index_ref(x: np.ndarray, values: np.ndarray = _KV) -> np.ndarray:
    """`best_index_int8(16, values, x)`: the index of the nearest table value (ties and NaN
    go up), with C's float arithmetic for the distance comparison."""
    x = np.asarray(x, F32)
    with np.errstate(invalid="ignore"):
        idx = np.zeros(x.shape, np.int32)
        for k in range(1, len(values) - 1):
            idx += ~(x < values[k])  # x >= value, or NaN
        lower, upper = values[idx], values[idx + 1]
        return idx + ~((x - lower) < (upper - x))


def _fit_ref(idv: np.ndarray, xT: np.ndarray, wT: np.ndarray):
    """sum(w*q*x), sum(w*q*q) over a sub-block's elements in order, q the table value nearest
    id*x; arrays laid out (element, sub-block)."""
    sumqx = np.zeros(xT.shape[1], F32)
    sumq2 = np.zeros(xT.shape[1], F32)
    for x, w in zip(xT, wT):
        q = _KV[best_index_ref(idv * x)]
        wq = w * q
        sumqx = sumqx + wq * x
        sumq2 = sumq2 + wq * q
    return sumqx, sumq2


def search_scales_ref(xs: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The scale search of quantize_row_iq4_nl_impl (ntry = 7) for sub-blocks xs, weights w,
    both (n, 32) float32 -> scales (n,)."""
    xT, wT = np.ascontiguousarray(xs.T), np.ascontiguousarray(w.T)
    n = xT.shape[1]
    amax, mx = np.zeros(n, F32), np.zeros(n, F32)
    with np.errstate(all="ignore"):
        for x in xT:
            ax = np.abs(x)
            take = ax > amax
            amax = np.where(take, ax, amax)
            mx = np.where(take, x, mx)
        d = -mx / _KV[0]
        sumqx, sumq2 = _fit_ref(F32(1) / d, xT, wT)
        d = np.where(sumq2 > 0, sumqx / sumq2, F32(0)).astype(F32)
        best = d * sumqx
        for itry in range(-NTRY, NTRY + 1):
            sumqx, sumq2 = _fit_ref(F32(itry + int(KVALUES_IQ4NL[0])) / mx, xT, wT)
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            d = np.where(better, sumqx / sumq2, d)
            best = np.where(better, d * sumqx, best)
    return np.where(amax < GROUP_MAX_EPS, F32(0), d).astype(F32)


def weights_ref(x: np.ndarray, imatrix: np.ndarray | None, super_block: int) -> np.ndarray:
    """The per-weight importance of quantize_row_iq4_nl_impl for rows x (n_rows, n)."""
    if imatrix is None:
        with np.errstate(over="ignore"):
            return x * x
    n_rows, n = x.shape
    sb = x.reshape(-1, super_block)
    with np.errstate(all="ignore"):
        sigma2 = seq_sum_ref(np.ascontiguousarray((sb * sb).T)) * F32(2.0 / super_block)
        w = np.broadcast_to(imatrix.astype(F32), (n_rows, n)).reshape(-1, super_block)
        return (w * np.sqrt(sigma2[:, None] + sb * sb)).reshape(n_rows, n)


def _inverse_ref(d: np.ndarray) -> np.ndarray:
    """`d ? 1/d : 0` (NaN counts as true)."""
    with np.errstate(all="ignore"):
        return np.where(d != 0, F32(1) / d, F32(0)).astype(F32)


def pack_nibbles_ref(L: np.ndarray) -> np.ndarray:
    """Levels (n, 32k) -> bytes (n, 16k): in each group of 32, j low and j + 16 high."""
    g = L.reshape(L.shape[0], -1, 2, 16).astype(np.uint8)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(L.shape[0], -1)


def unpack_nibbles_ref(qs: np.ndarray) -> np.ndarray:
    g = qs.reshape(qs.shape[0], -1, 1, 16)
    return np.concatenate([g & 0xF, g >> 4], axis=2).reshape(qs.shape[0], -1)


# -- IR -----------------------------------------------------------------------------------------


def emit_lookup16(b: ir.IRBuilder, idx: ir.Value, table) -> ir.Value:
    """`table[idx]` for a 16-entry int8 table and a vector of i32 indices (0..15), as
    sign-extended i32 lanes: four table bytes a 32-bit word, picked by two selects and
    shifted into place (plain IR, no target-specific shuffle)."""
    n = idx.type.count
    vt = vec(i32, n)
    t = [int(v) & 0xFF for v in table]
    words = [t[4 * k] | t[4 * k + 1] << 8 | t[4 * k + 2] << 16 | t[4 * k + 3] << 24
             for k in range(4)]
    words = [w - (1 << 32) if w >= 1 << 31 else w for w in words]
    c = lambda v: vconst(i32, v, n)  # noqa: E731
    hi = b.icmp_unsigned("!=", b.and_(idx, c(8)), c(0))
    mid = b.icmp_unsigned("!=", b.and_(idx, c(4)), c(0))
    w = b.select(hi, b.select(mid, c(words[3]), c(words[2])),
                 b.select(mid, c(words[1]), c(words[0])))
    shift = b.shl(b.and_(idx, c(3)), c(3))
    return b.ashr(b.shl(w, b.sub(c(24), shift)), ir.Constant(vt, [24] * n))


def emit_levels32(b: ir.IRBuilder, src: ir.Value, offset: int) -> ir.Value:
    """The 32 table values of the 16 bytes of nibbles at `offset` of `src` (low nibbles
    first, then the high ones) as <32 x i8>: one vpshufb over the table in both halves, as
    ggml's AVX2 dot products look them up."""
    qs = load_bytes(b, src, offset, 16)
    lo = b.and_(qs, vconst(i8, 0x0F, 16))
    hi = b.and_(b.lshr(qs, vconst(i8, 4, 16)), vconst(i8, 0x0F, 16))
    idx = b.shuffle_vector(lo, hi, ir.Constant(vec(i32, 32), list(range(32))))
    table = ir.Constant(vec(i8, 32), [int(v) for v in KVALUES_IQ4NL] * 2)
    return intrinsic(b, "llvm.x86.avx2.pshuf.b", vec(i8, 32), [table, idx])


def emit_best_index(ln: Lanes, al: ir.Value) -> tuple[ir.Value, ir.Value]:
    """best_index_int8 over the IQ4_NL table for every lane: (index i32 lanes, the table
    value as float lanes). Same answer as the binary search for any input."""
    b = ln.b
    idx, lower, cs = ln.ic(0), ln.fc(_KV[0]), []
    for k in range(1, 15):
        c = b.fcmp_unordered(">=", al, ln.fc(_KV[k]))  # x >= value, or NaN
        cs.append(c)
        lower = ln.sel(c, ln.fc(_KV[k]), lower)
        idx = b.sub(idx, b.sext(c, ln.i))
    upper = ln.fc(_KV[15])
    for k in range(14, 0, -1):
        upper = ln.sel(cs[k - 1], upper, ln.fc(_KV[k]))
    near = b.fcmp_ordered("<", b.fsub(al, lower), b.fsub(upper, al))
    return b.sub(b.add(idx, ln.ic(1)), b.zext(near, ln.i)), ln.sel(near, lower, upper)


def _emit_fit(ln: Lanes, idv: ir.Value, xs: ir.Value, ws: ir.Value):
    """sum(w*q*x), sum(w*q*q) over the 32 elements (in order) of the sub-blocks in the lanes;
    xs, ws: the elements as [32 x <8 x float>] on the stack (a loop keeps the code small)."""
    b = ln.b
    sums = alloca_entry(b, ir.ArrayType(ln.f, 2), name="sums")
    sqx_p, sq2_p = (b.gep(sums, [const(i32, 0), const(i32, k)]) for k in range(2))
    b.store(ln.fc(0.0), sqx_p)
    b.store(ln.fc(0.0), sq2_p)
    with for_range(b, const(i32, 0), const(i32, SUB), name="j") as j:
        x = b.load(b.gep(xs, [const(i32, 0), j]))
        w = b.load(b.gep(ws, [const(i32, 0), j]))
        _, q = emit_best_index(ln, b.fmul(idv, x))
        wq = b.fmul(w, q)
        b.store(b.fadd(b.load(sqx_p), b.fmul(wq, x)), sqx_p)
        b.store(b.fadd(b.load(sq2_p), b.fmul(wq, q)), sq2_p)
    return b.load(sqx_p), b.load(sq2_p)


def _emit_spill(b: ir.IRBuilder, vs: list[ir.Value], name: str) -> ir.Value:
    """The vectors vs as an array on the stack."""
    mem = alloca_entry(b, ir.ArrayType(vs[0].type, len(vs)), name=name)
    for k, v in enumerate(vs):
        b.store(v, b.gep(mem, [const(i32, 0), const(i32, k)]))
    return mem


def emit_search_scales(ln: Lanes, xT: list[ir.Value], wT: list[ir.Value]) -> ir.Value:
    """search_scales_ref for the eight sub-blocks in the lanes (xT[i]: element i of each)."""
    b = ln.b
    zero = ln.fc(0.0)
    amax = mx = zero
    for x in xT:
        ax = ln.fabs(x)
        take = ln.gt(ax, amax)
        amax = ln.sel(take, ax, amax)
        mx = ln.sel(take, x, mx)
    id0 = b.fdiv(ln.fc(1.0), b.fdiv(b.fneg(mx), ln.fc(_KV[0])))
    # pass 0 fits the first guess 1/d and always takes its result; passes 1..15 try
    # (itry - 127) / max, itry = -7..7, and keep a better fit: one loop, one copy of the code
    xs, ws = _emit_spill(b, xT, "xs"), _emit_spill(b, wT, "ws")
    state = alloca_entry(b, ir.ArrayType(ln.f, 2), name="fit")
    d_p, best_p = (b.gep(state, [const(i32, 0), const(i32, k)]) for k in range(2))
    b.store(zero, d_p)
    b.store(zero, best_p)
    with for_range(b, const(i32, 0), const(i32, 2 * NTRY + 2), name="pass") as k:
        first = b.icmp_signed("==", k, const(i32, 0))
        itry = b.sub(k, const(i32, NTRY + 1))
        num = b.sitofp(b.add(itry, const(i32, int(KVALUES_IQ4NL[0]))), f32)
        idv = ln.sel(ln.splat(first), id0, b.fdiv(ln.splat(num), mx))
        sumqx, sumq2 = _emit_fit(ln, idv, xs, ws)
        best = b.load(best_p)
        pos = ln.gt(sumq2, zero)
        better = b.and_(pos, ln.gt(b.fmul(sumqx, sumqx), b.fmul(best, sumq2)))
        take = b.or_(ln.splat(first), better)
        d = ln.sel(take, ln.sel(pos, b.fdiv(sumqx, sumq2), zero), b.load(d_p))
        b.store(d, d_p)
        b.store(ln.sel(take, b.fmul(d, sumqx), best), best_p)
    return ln.sel(ln.lt(amax, ln.fc(GROUP_MAX_EPS)), zero, b.load(d_p))


def _emit_inverse(ln: Lanes, d: ir.Value) -> ir.Value:
    b = ln.b
    return ln.sel(b.fcmp_unordered("!=", d, ln.fc(0.0)), b.fdiv(ln.fc(1.0), d), ln.fc(0.0))


def _emit_transpose_load(b: ir.IRBuilder, ln: Lanes, ptrs: list[ir.Value]):
    """Rows of 32 floats at ptrs (one a lane) -> (the rows, element i of every row as lanes)."""
    rows = [b.load(b.bitcast(p, ptr(vec(f32, SUB))), align=4) for p in ptrs]
    out = []
    for i in range(SUB):
        v = ir.Constant(ln.f, ir.Undefined)
        for s, r in enumerate(rows):
            v = b.insert_element(v, b.extract_element(r, const(i32, i)), const(i32, s))
        out.append(v)
    return rows, out


def _emit_weights(ln: Lanes, xT, qT, sigma2):
    b = ln.b
    if qT is None:
        return [b.fmul(x, x) for x in xT]
    return [b.fmul(q, ln.sqrt(b.fadd(sigma2, b.fmul(x, x)))) for x, q in zip(xT, qT)]


def _emit_levels_packed(ln: Lanes, idv: ir.Value, xT) -> list[ir.Value]:
    """Each lane's 32 levels best_index(id * x) packed as nibbles: one <16 x i8> a lane."""
    b = ln.b
    xs = _emit_spill(b, xT, "xl")
    packed = alloca_entry(b, ir.ArrayType(vec(i8, ln.n), 16), name="packed")
    with for_range(b, const(i32, 0), const(i32, 16), name="jl") as j:
        lo = b.load(b.gep(xs, [const(i32, 0), j]))
        hi = b.load(b.gep(xs, [const(i32, 0), b.add(j, const(i32, 16))]))
        l_lo = emit_best_index(ln, b.fmul(idv, lo))[0]
        l_hi = emit_best_index(ln, b.fmul(idv, hi))[0]
        v = b.trunc(b.or_(l_lo, b.shl(l_hi, ln.ic(4))), vec(i8, ln.n))
        b.store(v, b.gep(packed, [const(i32, 0), j]))
    # byte j of lane s is at 8j + s: a transpose, as shuffles of the whole 128 bytes
    allb = b.load(b.bitcast(packed, ptr(vec(i8, 16 * ln.n))))
    return [b.shuffle_vector(allb, allb, ir.Constant(vec(i32, 16),
                                                     [ln.n * j + s for j in range(16)]))
            for s in range(ln.n)]


def _store(b: ir.IRBuilder, v: ir.Value, base: ir.Value, offset: int) -> None:
    b.store(v, b.bitcast(b.gep(base, [const(i32, offset)]), ptr(v.type)), align=1)


# -- the types ----------------------------------------------------------------------------------


class _IQ4(QuantType):
    n_levels = 16
    uses_imatrix = True
    row_quantizer = True  # llama.cpp's chunk quantizer (ntry = 7), rows for the imatrix
    has_dequantize_kernel = True
    super_block: int

    # the spec
    def _quantize_super_blocks(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def quantize_rows_ref(self, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        x = np.ascontiguousarray(x, F32)
        n_rows, n = x.shape
        w = weights_ref(x, imatrix, self.super_block)
        sb = self.super_block
        out = self._quantize_super_blocks(x.reshape(-1, sb), w.reshape(-1, sb))
        return out.reshape(n_rows, self.info.row_bytes(n))

    def quantize_blocks_ref(self, x: np.ndarray) -> np.ndarray:
        return self.quantize_rows_ref(np.asarray(x, F32).reshape(-1, self.super_block))

    # the compiled row quantizer
    def _emit_unit(self, b, ln, x, y, qw, unit, n_units, units_per_row):
        raise NotImplementedError

    def build_row_module(self) -> ir.Module:
        """`quantize_rows_<t>[_w](float *x, u8 *y, float *imatrix, i64 n_rows, i64 n)`."""
        m = ir.Module(name=f"{self.name.lower()}_rows")
        for weighted in (False, True):
            name = f"quantize_rows_{self.name.lower()}" + ("_w" if weighted else "")
            fty = ir.FunctionType(void, [ptr(f32), ptr(i8), ptr(f32), i64, i64])
            fn = ir.Function(m, fty, name)
            b = ir.IRBuilder(fn.append_basic_block("entry"))
            x, y, qw, n_rows, n = fn.args
            units_per_row = b.sdiv(n, const(i64, self.unit_weights))
            n_units = b.mul(n_rows, units_per_row)
            ln = Lanes(b, LANES)
            with for_range(b, const(i64, 0), n_units, self.unit_step, name="u") as u:
                self._emit_unit(b, ln, x, y, qw if weighted else None, u, n_units,
                                units_per_row)
            b.ret_void()
        return m

    def row_modules(self) -> dict[str, ir.Module]:
        return {"rows": self.build_row_module()}

    @cached_property
    def _row_kernels(self):
        base = f"quantize_rows_{self.name.lower()}"
        return compile_kernels(self.build_row_module(),
                               {base: _ROW_SIG, base + "_w": _ROW_SIG})

    def quantize_rows(self, x: np.ndarray, imatrix: np.ndarray | None, threads: int | None,
                      reference: bool) -> np.ndarray:
        if reference:
            return self.quantize_rows_ref(x, imatrix)
        x = np.ascontiguousarray(x, F32)
        n_rows, n = x.shape
        out = np.empty((n_rows, self.info.row_bytes(n)), np.uint8)
        name = f"quantize_rows_{self.name.lower()}"
        qw = None
        if imatrix is not None:
            qw = np.ascontiguousarray(imatrix, F32)
            name += "_w"
        kernel = self._row_kernels[name]
        x0, y0, q0 = x.ctypes.data, out.ctypes.data, 0 if qw is None else qw.ctypes.data
        xs, ys = x.strides[0], out.strides[0]
        parallel_rows(lambda a, c: kernel(x0 + a * xs, y0 + a * ys, q0, c - a, n), n_rows,
                      threads, min_rows=max(1, MIN_ELEMENTS_PER_THREAD // max(1, n)))
        return out


@register
class IQ4_NL(_IQ4):
    type = GGMLType.IQ4_NL
    activation_type = GGMLType.Q8_0
    super_block = SUB
    unit_weights = SUB  # the kernel's loop counts blocks, eight at a time
    unit_step = LANES

    def _quantize_super_blocks(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        d = search_scales_ref(x, w)
        L = best_index_ref(_inverse_ref(d)[:, None] * x)
        return np.concatenate([half_bytes(f16_from_f32_ref(d)), pack_nibbles_ref(L)], axis=1)

    def levels_ref(self, q: np.ndarray) -> np.ndarray:
        return unpack_nibbles_ref(np.ascontiguousarray(q, np.uint8)[:, 2:])

    def dequantize_blocks_ref(self, q: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(q, np.uint8)
        with np.errstate(all="ignore"):
            return half_ref(q[:, 0:2])[:, None] * _KV[self.levels_ref(q)]

    def _emit_unit(self, b, ln, x, y, qw, g, n_blocks, blocks_per_row):
        # eight blocks g..g+7 (the last ones repeat the final block past the end)
        last = b.sub(n_blocks, const(i64, 1))
        blocks = []
        for s in range(LANES):
            k = b.add(g, const(i64, s))
            blocks.append(b.select(b.icmp_signed(">", k, last), last, k))
        xp = [b.gep(x, [b.mul(k, const(i64, SUB))]) for k in blocks]
        yp = [b.gep(y, [b.mul(k, const(i64, self.info.type_size))]) for k in blocks]
        _, xT = _emit_transpose_load(b, ln, xp)
        qT = sigma2 = None
        if qw is not None:
            qp = [b.gep(qw, [b.mul(b.srem(k, blocks_per_row), const(i64, SUB))])
                  for k in blocks]
            _, qT = _emit_transpose_load(b, ln, qp)
            sum_x2 = ln.fc(0.0)
            for v in xT:
                sum_x2 = b.fadd(sum_x2, b.fmul(v, v))
            sigma2 = b.fmul(sum_x2, ln.fc(2.0 / SUB))
        d = emit_search_scales(ln, xT, _emit_weights(ln, xT, qT, sigma2))
        hw = hardware_half(Target.CPU)
        for s in range(LANES):
            h = emit_f32_to_f16(b, b.extract_element(d, const(i32, s)), hw)
            b.store(h, b.bitcast(yp[s], ptr(i16)), align=1)
        for s, v in enumerate(_emit_levels_packed(ln, _emit_inverse(ln, d), xT)):
            _store(b, v, yp[s], 2)

    # the integer view (x86 AVX2): signed levels up to 127 in magnitude, so the products
    # take w's signs onto x (vpsignb) rather than x + 128 (which would overflow vpmaddubsw)
    int_dot = True
    int_signs_on_x = True
    int_dot_pairs = True  # one-token products: ggml's vec_dot sums even and odd blocks apart

    def emit_int_groups(self, b: ir.IRBuilder, src: ir.Value) -> list[IntGroup]:
        """One group: the 32 table values, w = d * q."""
        return [IntGroup(emit_levels32(b, src, 2), True, load_f16(b, src, 0), None)]

    def emit_dequantize_block(self, b: ir.IRBuilder, y: ir.Value, x: ir.Value) -> None:
        d = load_f16(b, y, 0)
        qs = b.zext(b.load(b.bitcast(b.gep(y, [const(i32, 2)]), ptr(vec(i8, 16))), align=1),
                    vec(i32, 16))
        lo = b.and_(qs, vconst(i32, 0xF, 16))
        hi = b.lshr(qs, vconst(i32, 4, 16))
        idx = b.shuffle_vector(lo, hi, ir.Constant(vec(i32, 32), list(range(32))))
        ln = Lanes(b, 32)
        v = b.fmul(ln.splat(d), b.sitofp(emit_lookup16(b, idx, KVALUES_IQ4NL), ln.f))
        b.store(v, b.bitcast(x, ptr(ln.f)), align=4)


@register
class IQ4_XS(_IQ4):
    type = GGMLType.IQ4_XS
    activation_type = GGMLType.Q8_K
    super_block = 256
    unit_weights = 256  # the kernel's loop counts super-blocks
    unit_step = 1

    def _quantize_super_blocks(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        nb = x.shape[0]
        xs = x.reshape(nb, 8, SUB)
        scales = search_scales_ref(xs.reshape(-1, SUB), w.reshape(-1, SUB)).reshape(nb, 8)
        amax, max_scale = np.zeros(nb, F32), np.zeros(nb, F32)
        for ib in range(8):
            a = np.abs(scales[:, ib])
            take = a > amax
            amax = np.where(take, a, amax)
            max_scale = np.where(take, scales[:, ib], max_scale)
        with np.errstate(all="ignore"):
            d = -max_scale / F32(32)
            l = nearest_int_ref(_inverse_ref(d)[:, None] * scales)
            l = np.maximum(-32, np.minimum(31, l))
            dl = d[:, None] * l.astype(F32)
            L = best_index_ref(_inverse_ref(dl)[:, :, None] * xs).reshape(nb, 256)
        l = (l + 32).astype(np.uint16)
        scales_h = np.zeros(nb, np.uint16)
        for ib in range(8):
            scales_h |= (l[:, ib] >> 4) << (2 * ib)
        low = (l & 0xF).astype(np.uint8)
        scales_l = low[:, 0::2] | (low[:, 1::2] << 4)
        return np.concatenate([half_bytes(f16_from_f32_ref(d)),
                               scales_h.astype("<u2").view(np.uint8).reshape(nb, 2),
                               scales_l, pack_nibbles_ref(L)], axis=1)

    def levels_ref(self, q: np.ndarray) -> np.ndarray:
        return unpack_nibbles_ref(np.ascontiguousarray(q, np.uint8)[:, 8:])

    @staticmethod
    def sub_scales_ref(q: np.ndarray) -> np.ndarray:
        """The eight 6-bit sub-block scales minus 32, (n_blocks, 8) int32."""
        h = np.ascontiguousarray(q[:, 2:4]).view("<u2").astype(np.int32)
        lo = q[:, 4:8].astype(np.int32)
        ib = np.arange(8)
        ls = ((lo[:, ib // 2] >> (4 * (ib % 2))) & 0xF) | (((h >> (2 * ib)) & 3) << 4)
        return ls - 32

    def dequantize_blocks_ref(self, q: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(q, np.uint8)
        with np.errstate(all="ignore"):
            dl = half_ref(q[:, 0:2])[:, None] * self.sub_scales_ref(q).astype(F32)
            v = dl[:, :, None] * _KV[self.levels_ref(q)].reshape(-1, 8, SUB)
        return v.reshape(-1, 256)

    def _emit_unit(self, b, ln, x, y, qw, sb, n_units, units_per_row):
        xb = b.gep(x, [b.mul(sb, const(i64, 256))])
        yb = b.gep(y, [b.mul(sb, const(i64, self.info.type_size))])
        rows, xT = _emit_transpose_load(b, ln, [b.gep(xb, [const(i32, SUB * s)])
                                                for s in range(LANES)])
        qT = sigma2 = None
        if qw is not None:
            qb = b.gep(qw, [b.mul(b.srem(sb, units_per_row), const(i64, 256))])
            _, qT = _emit_transpose_load(b, ln, [b.gep(qb, [const(i32, SUB * s)])
                                                 for s in range(LANES)])
            s2 = const(f32, 0.0)
            for r in rows:
                for i in range(SUB):
                    e = b.extract_element(r, const(i32, i))
                    s2 = b.fadd(s2, b.fmul(e, e))
            sigma2 = ln.splat(b.fmul(s2, const(f32, 2.0 / 256)))
        scales = emit_search_scales(ln, xT, _emit_weights(ln, xT, qT, sigma2))
        amax = max_scale = const(f32, 0.0)
        for s in range(LANES):
            e = b.extract_element(scales, const(i32, s))
            a = fabs(b, e)
            take = b.fcmp_ordered(">", a, amax)
            amax = b.select(take, a, amax)
            max_scale = b.select(take, e, max_scale)
        d = b.fdiv(b.fneg(max_scale), const(f32, 32.0))
        b.store(emit_f32_to_f16(b, d, hardware_half(Target.CPU)), b.bitcast(yb, ptr(i16)),
                align=1)
        dv = ln.splat(d)
        l = ln.nearest_int(b.fmul(_emit_inverse(ln, dv), scales))
        l = b.select(b.icmp_signed("<", ln.ic(31), l), ln.ic(31), l)
        l = b.select(b.icmp_signed(">", ln.ic(-32), l), ln.ic(-32), l)
        dl = b.fmul(dv, ln.to_f(l))
        for s, v in enumerate(_emit_levels_packed(ln, _emit_inverse(ln, dl), xT)):
            _store(b, v, yb, 8 + 16 * s)
        l = b.add(l, ln.ic(32))
        ls = [b.extract_element(l, const(i32, s)) for s in range(LANES)]
        h = const(i32, 0)
        for s in range(LANES):
            h = b.or_(h, b.shl(b.lshr(ls[s], const(i32, 4)), const(i32, 2 * s)))
        b.store(b.trunc(h, i16), b.bitcast(b.gep(yb, [const(i32, 2)]), ptr(i16)), align=1)
        for k in range(4):
            lo = b.and_(ls[2 * k], const(i32, 0xF))
            hi = b.shl(b.and_(ls[2 * k + 1], const(i32, 0xF)), const(i32, 4))
            b.store(b.trunc(b.or_(lo, hi), i8), b.gep(yb, [const(i32, 4 + k)]))

    int_dot = int_superblock = True
    int_signs_on_x = True  # (see IQ4_NL)

    def emit_int_superblock(self, b: ir.IRBuilder, src: ir.Value) -> IntSuperBlock:
        """8 groups of 32 table values, each with its 6-bit sub-scale less 32 as the integer
        factor of every pair (vpmaddwd), as ggml's `vec_dot_iq4_xs_q8_K` and its tiled kernel
        take them; no mins."""
        v8 = vec(i16, 8)
        lo = b.zext(load_bytes(b, src, 4, 4), vec(i16, 4))
        lo = b.shuffle_vector(lo, lo, ir.Constant(vec(i32, 8), [0, 0, 1, 1, 2, 2, 3, 3]))
        lo = b.and_(b.lshr(lo, ir.Constant(v8, [0, 4] * 4)), vconst(i16, 0xF, 8))
        h = b.load(b.bitcast(b.gep(src, [const(i32, 2)]), ptr(i16)), align=1)
        h = b.shuffle_vector(b.insert_element(ir.Constant(v8, None), h, const(i32, 0)),
                             ir.Constant(v8, None), ir.Constant(vec(i32, 8), [0] * 8))
        hi = b.shl(b.and_(b.lshr(h, ir.Constant(v8, [2 * k for k in range(8)])),
                          vconst(i16, 3, 8)), vconst(i16, 4, 8))
        ls = b.sub(b.or_(lo, hi), vconst(i16, 32, 8))

        def group(g: int) -> IntGroup:
            halves = b.shuffle_vector(ls, ls, ir.Constant(vec(i32, 16), [g] * 16))
            return IntGroup(emit_levels32(b, src, 8 + 16 * g), True, None, None, halves)

        return IntSuperBlock(group, load_f16(b, src, 0))

    def emit_dequantize_block(self, b: ir.IRBuilder, y: ir.Value, x: ir.Value) -> None:
        d = load_f16(b, y, 0)
        h = b.zext(b.load(b.bitcast(b.gep(y, [const(i32, 2)]), ptr(i16)), align=1), i32)
        ln = Lanes(b, 32)
        xv = b.bitcast(x, ptr(ln.f))
        for ib in range(8):
            lo = b.zext(b.load(b.gep(y, [const(i32, 4 + ib // 2)])), i32)
            ls = b.or_(b.and_(b.lshr(lo, const(i32, 4 * (ib % 2))), const(i32, 0xF)),
                       b.shl(b.and_(b.lshr(h, const(i32, 2 * ib)), const(i32, 3)),
                             const(i32, 4)))
            dl = b.fmul(d, b.sitofp(b.sub(ls, const(i32, 32)), f32))
            qp = b.bitcast(b.gep(y, [const(i32, 8 + 16 * ib)]), ptr(vec(i8, 16)))
            qs = b.zext(b.load(qp, align=1), vec(i32, 16))
            lo4 = b.and_(qs, vconst(i32, 0xF, 16))
            hi4 = b.lshr(qs, vconst(i32, 4, 16))
            idx = b.shuffle_vector(lo4, hi4, ir.Constant(vec(i32, 32), list(range(32))))
            v = b.fmul(ln.splat(dl), b.sitofp(emit_lookup16(b, idx, KVALUES_IQ4NL), ln.f))
            b.store(v, b.gep(xv, [const(i32, ib)]), align=4)
