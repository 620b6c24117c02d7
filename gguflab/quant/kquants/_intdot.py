"""Pieces the K-quants' integer views (`emit_int_superblock`) share: the packed scale bytes
of a block as one vector of 16, and the per-pair factors vpmaddwd takes from it."""

from __future__ import annotations

from llvmlite import ir

from ...jit.builders import const, i8, i16, i32, ptr, vconst

V16I8 = ir.VectorType(i8, 16)
V16I16 = ir.VectorType(i16, 16)


def load_words(b: ir.IRBuilder, src: ir.Value, offset: int, n: int) -> list[ir.Value]:
    """n little-endian u32 at byte `offset` of the block (unaligned)."""
    p = b.bitcast(b.gep(src, [const(i32, offset)]), ptr(i32))
    return [b.load(b.gep(p, [const(i32, k)]), align=1) for k in range(n)]


def words_to_bytes(b: ir.IRBuilder, words: list[ir.Value]) -> ir.Value:
    """Four i32 as the <16 x i8> they hold (little-endian)."""
    v = ir.Constant(ir.VectorType(i32, 4), None)
    for k, w in enumerate(words):
        v = b.insert_element(v, w, const(i32, k))
    return b.bitcast(v, V16I8)


def widen(b: ir.IRBuilder, v: ir.Value, signed: bool) -> ir.Value:
    """<16 x i8> -> <16 x i16>."""
    return b.sext(v, V16I16) if signed else b.zext(v, V16I16)


def pick(b: ir.IRBuilder, v16: ir.Value, idx: list[int]) -> ir.Value:
    """<16 x i16> with lane k = v16[idx[k]]."""
    return b.shuffle_vector(v16, v16, ir.Constant(ir.VectorType(i32, 16), idx))


def per_16(b: ir.IRBuilder, s16: ir.Value, g: int) -> ir.Value:
    """Factors of group g's 16 level pairs when each 16 weights have their own scale in
    `s16`: the first 8 pairs take scale 2g, the last 8 scale 2g + 1."""
    return pick(b, s16, [2 * g] * 8 + [2 * g + 1] * 8)


def per_32(b: ir.IRBuilder, s16: ir.Value, g: int) -> ir.Value:
    """Factors of group g's 16 level pairs when the group has one scale, lane g of `s16`."""
    return pick(b, s16, [g] * 16)


def mask(n: int, v: int) -> ir.Constant:
    return vconst(i8, v, n)
