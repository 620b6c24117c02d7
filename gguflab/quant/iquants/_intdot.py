"""Pieces the grid i-quants' integer views (`emit_int_superblock`) share: a group of 32
weights as its grid points' magnitude bytes (looked up in the type's constant table), one
sign a weight, and a factor 2 * ls + 1 per 16 or 32 weights, as ggml's AVX2
`vec_dot_iq*_q8_K` reads them. ggml moves the signs onto x (vpsignb); here they go onto the
levels instead (the kernel's signed path): the integer sums are the same, exactly."""

from __future__ import annotations

import numpy as np
from llvmlite import ir

from ...jit.builders import const, i8, i16, i32, vconst

V32I8 = ir.VectorType(i8, 32)
V16I16 = ir.VectorType(i16, 16)


def grid_bytes(b: ir.IRBuilder, table: ir.GlobalVariable, index: list[ir.Value]) -> ir.Value:
    """The magnitude bytes of the grid points `index` (i32 each) of `table` (4 or 8 bytes an
    entry), in order, as one <32 x i8>."""
    elem = table.type.pointee.element
    v = ir.Constant(ir.VectorType(elem, len(index)), ir.Undefined)
    for k, ix in enumerate(index):
        w = b.load(b.gep(table, [const(i32, 0), ix], inbounds=True), align=elem.width // 8)
        v = b.insert_element(v, w, const(i32, k))
    return b.bitcast(v, V32I8)


def sign_bits(b: ir.IRBuilder, signs: ir.Value) -> ir.Value:
    """<4 x i8> sign bytes (bit j of byte l: weight 8l + j is negative) -> <32 x i1>."""
    spread = b.shuffle_vector(signs, signs, ir.Constant(ir.VectorType(i32, 32),
                                                        [e // 8 for e in range(32)]))
    bit = b.and_(spread, ir.Constant(V32I8, [1 << (e % 8) for e in range(32)]))
    return b.icmp_unsigned("!=", bit, vconst(i8, 0, 32))


def signed(b: ir.IRBuilder, mag: ir.Value, neg: ir.Value) -> ir.Value:
    """The levels mag with their signs (<32 x i8>)."""
    return b.select(neg, b.sub(vconst(i8, 0, 32), mag), mag)


def odd_factor(b: ir.IRBuilder, ls: ir.Value) -> ir.Value:
    """2 * ls + 1 (ls an i32 4-bit scale) as an i16."""
    return b.trunc(b.or_(b.shl(ls, const(i32, 1)), const(i32, 1)), i16)


def pair_factors(b: ir.IRBuilder, lo: ir.Value, hi: ir.Value | None = None) -> ir.Value:
    """<16 x i16> vpmaddwd factors of a group's 16 level pairs: `lo` for all of them, or for
    the first 16 weights with `hi` for the last 16 (i16 each)."""
    v = ir.Constant(V16I16, ir.Undefined)
    v = b.insert_element(v, lo, const(i32, 0))
    v = b.insert_element(v, hi if hi is not None else lo, const(i32, 1))
    return b.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, 16), [0] * 8 + [1] * 8))


def splat_i32(b: ir.IRBuilder, v: ir.Value, n: int) -> ir.Value:
    """<n x i32> with every lane the i32 `v`."""
    one = b.insert_element(ir.Constant(ir.VectorType(i32, 1), ir.Undefined), v, const(i32, 0))
    return b.shuffle_vector(one, one, ir.Constant(ir.VectorType(i32, n), [0] * n))


def splat_i8(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """<32 x i8> with every lane the i8 `v`."""
    one = b.insert_element(ir.Constant(ir.VectorType(i8, 1), ir.Undefined), v, const(i32, 0))
    return b.shuffle_vector(one, one, ir.Constant(ir.VectorType(i32, 32), [0] * 32))


def _even_signs() -> np.ndarray:
    """ggml's `keven_signs_q2xs` as 128 u64: for 7 stored sign bits s, the 8 bytes +-1 of
    the signs with the parity bit that makes the count of minus signs even."""
    s = np.arange(128)
    bits = (s[:, None] >> np.arange(7)) & 1
    bits = np.concatenate([bits, bits.sum(axis=1, keepdims=True) & 1], axis=1)
    return np.where(bits == 1, -1, 1).astype(np.int8).view("<u8").reshape(-1)


def even_signs(b: ir.IRBuilder, s7: list[ir.Value]) -> ir.Value:
    """<32 x i8> of +-1: the signs of 4 groups of 8 stored as 7 bits each (i32), looked up
    in ggml's table of them, as its vec_dot does."""
    m = b.module
    table = m.globals.get("gguflab_keven_signs")
    if table is None:
        at = ir.ArrayType(ir.IntType(64), 128)
        table = ir.GlobalVariable(m, at, "gguflab_keven_signs")
        table.global_constant = True
        table.linkage = "internal"
        table.initializer = ir.Constant(at, [int(w) for w in _even_signs()])
    return grid_bytes(b, table, s7)


def apply_signs(b: ir.IRBuilder, mag: ir.Value, sgn: ir.Value) -> ir.Value:
    """vpsignb: the levels mag times the +-1 of sgn (<32 x i8> each)."""
    fn = b.module.declare_intrinsic("llvm.x86.avx2.psign.b",
                                    fnty=ir.FunctionType(V32I8, [V32I8, V32I8]))
    return b.call(fn, [mag, sgn])
