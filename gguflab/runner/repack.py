"""The products llama.cpp runs over weights it has repacked at load (its CPU "repack" buffer
type, on by default in llama-cli, llama-perplexity and llama-bench), with their bits.

On an AVX2 build ggml moves Q4_0, Q4_K and IQ4_NL weights whose row count is a multiple of 8
into an interleaved layout (`q4_0_8x8_q8_0`, `q4_K_8x8_q8_K`, `iq4_nl_8x8_q8_0`, repack.cpp)
and multiplies them with its own kernels: the first n - n % 4 tokens of a product go through
`gemm` (x rounded four tokens at a time), the last n % 4 through `gemv`. Both sum each
output in one float chain per (token, row), in an order of their own:

- Q4_0 and IQ4_NL (one template, a table apart; gemm and gemv alike): per block of 32, the
  exact integer dot of the levels with x's, converted, then acc = fma(sum, d * dx, acc);
- Q4_K, gemm: per super-block of 256, per pair of its 32-groups p, I = the sub-scaled integer
  dots of the pair and M = the mins times x's sums of 32 of the pair; acc = fma(I, d * dx,
  acc), accm = fma(M, dmin * dx, accm); the output is acc - accm;
- Q4_K, gemv: the same with I and M summed over the whole super-block (one fma each).

x is rounded as plain Q8_0 / Q8_K rows would be (ggml's 4-token rounding gives the same
levels and scales; where Q8_K's scale sign could differ, on a tie of +max and -max, levels
and scale both flip and every product is the same float).

We keep the weights as the file has them. The prompt kernel (`gemm_<t>`) puts 8 tokens in
the 8 lanes of a vector instead: x is packed once per product (`pack_<t>`: each 4 levels
of a group of 8 tokens side by side, their scales and sums), and each 4 weight levels are
broadcast against it (vpmaddubsw; IQ4_NL's table values as |w| against x with w's signs,
vpsignb), so every lane runs the float chain of one (token, row) in ggml's order. One-token
products and the gemv tokens (`gemv_<t>`) take 8 rows a pass, one a lane: each row's
integer lanes summed into its lane (vphaddd), then one fma in lanes. Integer sums are exact
and the float ops are spelled out (`llvm.fma`, no reassociation flags), so the bits are
ggml's on every x86-64 CPU with AVX2.

This is what llama.cpp's AVX2 build does (the oracle build, GGML_NATIVE=OFF, on any x86
host); a build for AVX-512 runs 512-bit variants of these kernels and repacks Q2_K too,
which we do not follow. `REPACK = False` gives llama.cpp's `--no-repack` products.
"""

from __future__ import annotations

import ctypes
import threading
from functools import cache

import numpy as np
from llvmlite import ir

from .. import quant
from ..gguf import GGMLType
from ..jit import compile_kernels, host_cpu
from ..jit.builders import alloca_entry, const, f32, for_range, i8, i16, i32, i64, intrinsic, ptr
from ..jit.parallel import emit_part_rows, row_parts, run_jobs
from . import kernels as K

__all__ = ["repacked", "REPACK"]

REPACK = True  # follow llama.cpp's default (repacked weights); False: its --no-repack run
REPACK_TYPES = (GGMLType.Q4_0, GGMLType.Q4_K, GGMLType.IQ4_NL)
ROWS_INTERLEAVED = 8  # ggml repacks a weight only when its row count is a multiple of this
GEMM_TOKENS = 4  # ggml's gemm takes tokens four at a time, the rest go through gemv
LANES = 8  # tokens per vector of the prompt kernel
GROUP = 32  # levels per group (Q4_0 block, Q4_K sub-block)
RECORD = GROUP * LANES + 2 * 4 * LANES  # packed x per (tile, group): levels, dx, sums
# rows of the prompt kernel that share each packed x vector (Q4_K: two float chains a row,
# so fewer rows before registers run out); measured best on SmolLM2's shapes
GEMM_ROWS = {GGMLType.Q4_0: 4, GGMLType.Q4_K: 2, GGMLType.IQ4_NL: 4}
QK_PAIRS = 256 // GROUP // 2  # pairs of groups in a Q4_K super-block
TOKEN_CHUNK = 64  # tokens per pass of the prompt kernel over a slice of rows
_V32I8, _V8I32, _V16I16 = (ir.VectorType(i8, 32), ir.VectorType(i32, 8),
                           ir.VectorType(i16, 16))
_V8F = ir.VectorType(f32, LANES)


@cache
def _host_repacks() -> bool:
    cpu = host_cpu()
    return cpu.triple.startswith("x86_64") and cpu.has("avx2") and K.INT_DOT


def repacked(t: GGMLType, n_out: int) -> bool:
    """Whether llama.cpp's CPU backend repacks a weight of type `t` and `n_out` rows on this
    host (and so sums its products in the repacked kernels' order): Q4_0, Q4_K, IQ4_NL on AVX2
    (`ggml_repack_get_optimal_repack_type`), rows a multiple of 8."""
    return REPACK and t in REPACK_TYPES and n_out % ROWS_INTERLEAVED == 0 and _host_repacks()


# -- IR --------------------------------------------------------------------------------------


def _c64(v: int) -> ir.Constant:
    return const(i64, v)


def _is_k(t: GGMLType) -> bool:
    return t == GGMLType.Q4_K


def _is_table(t: GGMLType) -> bool:
    """IQ4_NL: signed table values up to 127 in magnitude instead of Q4_0's nibbles - 8."""
    return t == GGMLType.IQ4_NL


def _build_pack(m: ir.Module, t: GGMLType) -> ir.Function:
    """pack(xq, ldq, t0, t1, n_groups, out): tokens [t0, t1) of x in `round_q8`'s form, as
    the prompt kernel reads them: per tile of 8 tokens (the last repeats its last token),
    per group of 32, a record of RECORD bytes: the levels as 8 vectors (vector i: levels
    4i..4i+3 of each token in its 32-bit lane), the tokens' dx (8 f32), their sums of the
    group (Q4_0: i32; Q4_K, even groups: the sums of this group and the next as two i16)."""
    fn = K._internal(m, f"pack_{t.name.lower()}", [ptr(i8), i64, i64, i64, i64, ptr(i8)])
    xq, ldq, t0, t1, ng, out = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    n_in = b.mul(ng, _c64(GROUP))
    last = b.sub(t1, _c64(1))
    tiles = b.sdiv(b.add(b.sub(t1, t0), _c64(LANES - 1)), _c64(LANES))
    with for_range(b, _c64(0), tiles, name="tile") as tile:
        rows = []
        for lane in range(LANES):
            tok = b.add(t0, b.add(b.mul(tile, _c64(LANES)), _c64(lane)))
            tok = b.select(b.icmp_signed("<", tok, t1), tok, last)
            rows.append(b.gep(xq, [b.mul(tok, ldq)]))
        with for_range(b, _c64(0), ng, name="g") as g:
            rec = b.gep(out, [b.mul(b.add(b.mul(tile, ng), g), _c64(RECORD))])
            for i in range(GROUP // 4):
                v = ir.Constant(_V8I32, None)
                for lane, row in enumerate(rows):
                    p = b.bitcast(b.gep(row, [b.add(b.mul(g, _c64(GROUP)), _c64(4 * i))]),
                                  ptr(i32))
                    v = b.insert_element(v, b.load(p, align=1), const(i32, lane))
                b.store(v, b.bitcast(b.gep(rec, [_c64(32 * i)]), ptr(_V8I32)), align=1)
            dx = ir.Constant(_V8F, None)
            sums = ir.Constant(_V8I32, None)
            for lane, row in enumerate(rows):
                d = b.load(b.gep(b.bitcast(b.gep(row, [n_in]), ptr(f32)), [g]))
                dx = b.insert_element(dx, d, const(i32, lane))

                def gsum(gi, row=row):
                    q = b.load(b.bitcast(b.gep(row, [b.mul(gi, _c64(GROUP))]), ptr(_V32I8)),
                               align=1)
                    return intrinsic(b, "llvm.vector.reduce.add.v32i32", i32,
                                     [b.sext(q, ir.VectorType(i32, 32))])

                if _is_k(t):  # (S_g, S_g+1) as two i16 for vpmaddwd; odd groups unused
                    s0 = gsum(g)
                    s1 = gsum(b.select(b.icmp_signed("<", b.add(g, _c64(1)), ng),
                                       b.add(g, _c64(1)), g))
                    s = b.or_(b.and_(s0, const(i32, 0xFFFF)), b.shl(s1, const(i32, 16)))
                else:
                    s = gsum(g)
                sums = b.insert_element(sums, s, const(i32, lane))
            b.store(dx, b.bitcast(b.gep(rec, [_c64(GROUP * LANES)]), ptr(_V8F)), align=1)
            b.store(sums, b.bitcast(b.gep(rec, [_c64(GROUP * LANES + 32)]), ptr(_V8I32)),
                    align=1)
    b.ret_void()
    return fn


def _bcast_dots(b: ir.IRBuilder, levels: list[ir.Value], xs: list[ir.Value]) -> list:
    """For each row's group (`levels`: i8* to its 32 levels, u8, the same for every lane)
    the sum of its levels times x (the lanes' tokens), as <16 x i16> pair sums (at most
    16 * 15 * 127 a lane: no wrap): each 4 levels broadcast from memory (vpbroadcastd m32,
    no shuffle) against the packed x vector, every x vector taken by all rows in turn."""
    acc = [None] * len(levels)
    for i, x in enumerate(xs):
        for r, lv in enumerate(levels):
            w = b.load(b.gep(b.bitcast(lv, ptr(i32)), [_c64(i)]), align=4)
            v = b.insert_element(ir.Constant(_V8I32, None), w, const(i32, 0))
            q = b.bitcast(b.shuffle_vector(v, v, ir.Constant(_V8I32, [0] * 8)), _V32I8)
            prod = K._maddubs(b, q, x)
            acc[r] = prod if acc[r] is None else b.add(acc[r], prod)
    return acc


def _bcast_dots_signed(b: ir.IRBuilder, levels: list[ir.Value], mags: list[ir.Value],
                       xs: list[ir.Value]) -> list:
    """`_bcast_dots` for signed levels up to 127 in magnitude (IQ4_NL): each product is |w|
    (`mags`, staged as the levels are) against x with w's signs (vpsignb), both broadcast
    from memory, and its pair sums go to i32 at once (vpmaddwd), as two of them could pass
    i16's range. <8 x i32> per row."""
    acc = [None] * len(levels)
    ones = ir.Constant(_V16I16, [1] * 16)

    def bcast(p, i):
        w = b.load(b.gep(b.bitcast(p, ptr(i32)), [_c64(i)]), align=4)
        v = b.insert_element(ir.Constant(_V8I32, None), w, const(i32, 0))
        return b.bitcast(b.shuffle_vector(v, v, ir.Constant(_V8I32, [0] * 8)), _V32I8)

    for i, x in enumerate(xs):
        for r, (lv, mg) in enumerate(zip(levels, mags)):
            s = intrinsic(b, "llvm.x86.avx2.psign.b", _V32I8, [x, bcast(lv, i)])
            prod = K._madd(b, K._maddubs(b, bcast(mg, i), s), ones)
            acc[r] = prod if acc[r] is None else b.add(acc[r], prod)
    return acc


def _stage(b: ir.IRBuilder, slot: ir.Value, groups: list[ir.Value]) -> list[ir.Value]:
    """The groups' levels stored in `slot` (<32 x i8> each), behind a barrier so that the
    broadcasts read them from memory; i8* to each."""
    for j, q in enumerate(groups):
        b.store(q, b.gep(slot, [_c64(j)]), align=32)
    K._barrier(b, b.bitcast(slot, ptr(i8)))
    return [b.bitcast(b.gep(slot, [_c64(j)]), ptr(i8)) for j in range(len(groups))]


def _build_gemm(m: ir.Module, t: GGMLType) -> ir.Function:
    """gemm(w, w_stride, xp, y, ldy, n_tok, tile0, tile1, r0, r1, n_blocks): y[tok, r] for
    the tokens of packed tiles [tile0, tile1) (those below n_tok) and rows [r0, r1), in the
    order of ggml's repacked gemm (see the module docstring); GEMM_ROWS[t] rows share each
    packed x vector."""
    qt = quant.get(t)
    nbytes = qt.info.type_size
    fn = K._internal(m, f"gemm_{t.name.lower()}", [ptr(i8), i64, ptr(i8), ptr(f32), i64, i64,
                                                   i64, i64, i64, i64, i64])
    w, ws, xp, y, ldy, ntok, tile0, tile1, r0, r1, nb = fn.args
    b = K._Builder(fn.append_basic_block("entry"))
    gpb = qt.info.block_size // GROUP  # groups per weight block
    ng = b.mul(nb, _c64(gpb))
    zero_f = ir.Constant(_V8F, [0.0] * LANES)
    R = GEMM_ROWS[t]
    accs = K._Accs(b, _V8F, 2 * R)
    slot = alloca_entry(b, _V32I8, gpb * R, name="levels")  # staged for broadcasts
    if _is_table(t):  # IQ4_NL: the rows' levels, their |w| and d, staged once a row pass
        stg = b.alloca(_V32I8, size=b.mul(nb, _c64(2 * R)), name="stage")
        stg_d = b.alloca(f32, size=b.mul(nb, _c64(R)), name="stage_d")

    def record(tile, gi):
        return b.gep(xp, [b.mul(b.add(b.mul(tile, ng), gi), _c64(RECORD))])

    def xvecs(rec):
        return [b.load(b.bitcast(b.gep(rec, [_c64(32 * i)]), ptr(_V32I8)), align=1)
                for i in range(GROUP // 4)]

    def rec_dx(rec):
        return b.load(b.bitcast(b.gep(rec, [_c64(GROUP * LANES)]), ptr(_V8F)), align=1)

    def rec_sums(rec, vt):
        return b.load(b.bitcast(b.gep(rec, [_c64(GROUP * LANES + 32)]), ptr(vt)), align=1)

    def rows_pass(start, stop, R):
        with for_range(b, start, stop, step=R, name=f"r{R}") as r:
            row = [b.gep(w, [b.mul(b.add(r, _c64(i)), ws)]) for i in range(R)]
            if _is_table(t):
                with for_range(b, _c64(0), nb, name=f"stage{R}") as k:
                    for i, p in enumerate(row):
                        g = qt.emit_int_groups(b, b.gep(p, [b.mul(k, _c64(nbytes))]))[0]
                        at = b.add(b.mul(k, _c64(2 * R)), _c64(i))
                        b.store(g.q, b.gep(stg, [at]), align=32)
                        mag = intrinsic(b, "llvm.abs.v32i8", _V32I8,
                                        [g.q, ir.Constant(ir.IntType(1), 0)])
                        b.store(mag, b.gep(stg, [b.add(at, _c64(R))]), align=32)
                        b.store(g.scale, b.gep(stg_d, [b.add(b.mul(k, _c64(R)), _c64(i))]))
            with for_range(b, tile0, tile1, name=f"tile{R}") as tile:
                for i in range(2 * R):
                    accs.set(i, zero_f)
                with for_range(b, _c64(0), nb, name=f"blk{R}") as k:
                    src = [b.gep(p, [b.mul(k, _c64(nbytes))]) for p in row]
                    g0 = b.mul(k, _c64(gpb))
                    if _is_k(t):
                        _gemm_superblock(b, qt, src, tile, g0, record, xvecs, rec_dx,
                                         rec_sums, accs, R, slot)
                    elif _is_table(t):
                        rec = record(tile, g0)
                        dx = rec_dx(rec)
                        lv = [b.bitcast(b.gep(stg, [b.add(b.mul(k, _c64(2 * R)), _c64(i))]),
                                        ptr(i8)) for i in range(2 * R)]
                        dots = _bcast_dots_signed(b, lv[:R], lv[R:], xvecs(rec))
                        for i in range(R):
                            d = b.load(b.gep(stg_d, [b.add(b.mul(k, _c64(R)), _c64(i))]))
                            dd = b.fmul(K.splat(b, d, LANES), dx, flags=K.FINITE)
                            accs.add_product(i, b.sitofp(dots[i], _V8F), dd)
                    else:
                        rec = record(tile, g0)
                        xs = xvecs(rec)
                        s8 = b.shl(rec_sums(rec, _V8I32), K.splat(b, const(i32, 3), 8))
                        dx = rec_dx(rec)
                        gs = [qt.emit_int_groups(b, s)[0] for s in src]
                        lv = _stage(b, slot, [b.add(g.q, ir.Constant(_V32I8, [8] * 32))
                                              for g in gs])  # the raw nibbles
                        dots = _bcast_dots(b, lv, xs)
                        for i, g in enumerate(gs):
                            isum = K._madd(b, dots[i], ir.Constant(_V16I16, [1] * 16))
                            isum = b.sub(isum, s8)  # (q - 8) . x = q . x - 8 sum(x)
                            dd = b.fmul(K.splat(b, g.scale, LANES), dx, flags=K.FINITE)
                            accs.add_product(i, b.sitofp(isum, _V8F), dd)
                for i in range(R):
                    v = accs.get(i)
                    if _is_k(t):
                        v = b.fsub(v, accs.get(R + i), flags=K.FINITE)
                    rr = b.add(r, _c64(i))
                    for lane in range(LANES):
                        tok = b.add(b.mul(tile, _c64(LANES)), _c64(lane))
                        with b.if_then(b.icmp_signed("<", tok, ntok)):
                            b.store(b.extract_element(v, const(i32, lane)),
                                    b.gep(y, [b.add(b.mul(tok, ldy), rr)]))

    tiled = b.add(r0, b.mul(b.sdiv(b.sub(r1, r0), _c64(R)), _c64(R)))
    rows_pass(r0, tiled, R)
    rows_pass(tiled, r1, 1)
    b.ret_void()
    return fn


def _gemm_superblock(b, qt, src, tile, g0, record, xvecs, rec_dx, rec_sums, accs, R,
                     slot) -> None:
    """One Q4_K super-block of R rows against a tile of 8 tokens: per pair of groups, the
    sub-scaled integer dots (I) and the mins times x's sums (M), each fma'd into its float
    chain (accs 0..R-1: I times d * dx; R..2R-1: M times dmin * dx)."""
    sbs = [qt.emit_int_superblock(b, s) for s in src]
    n = 2 * QK_PAIRS
    lv = _stage(b, slot, [sb.group(g).q for sb in sbs for g in range(n)])
    dx = rec_dx(record(tile, g0))
    dd = [b.fmul(K.splat(b, sb.d, LANES), dx, flags=K.FINITE) for sb in sbs]
    ddm = [b.fmul(K.splat(b, sb.dmin, LANES), dx, flags=K.FINITE) for sb in sbs]
    for p in range(QK_PAIRS):
        isum = [None] * R
        for gl in (2 * p, 2 * p + 1):
            xs = xvecs(record(tile, b.add(g0, _c64(gl))))
            dots = _bcast_dots(b, [lv[i * n + gl] for i in range(R)], xs)
            for i, sb in enumerate(sbs):
                v = K._madd(b, dots[i], sb.group(gl).halves)
                isum[i] = v if isum[i] is None else b.add(isum[i], v)
        sums = rec_sums(record(tile, b.add(g0, _c64(2 * p))), _V16I16)
        for i, sb in enumerate(sbs):
            pair = b.shuffle_vector(sb.mins, sb.mins,
                                    ir.Constant(ir.VectorType(i32, 16), [2 * p, 2 * p + 1] * 8))
            msum = K._madd(b, sums, pair)
            accs.add_product(i, b.sitofp(isum[i], _V8F), dd[i])
            accs.add_product(R + i, b.sitofp(msum, _V8F), ddm[i])




def _rows_to_lanes(b: ir.IRBuilder, vs: list[ir.Value]) -> ir.Value:
    """8 vectors of 8 i32 -> one whose lane r is the sum of vs[r]'s lanes (vphaddd); integer,
    so the grouping is free."""
    def hadd(a, c):
        return intrinsic(b, "llvm.x86.avx2.phadd.d", _V8I32, [a, c])

    a = hadd(hadd(vs[0], vs[1]), hadd(vs[2], vs[3]))  # rows 0-3: low halves | high halves
    c = hadd(hadd(vs[4], vs[5]), hadd(vs[6], vs[7]))
    lo = b.shuffle_vector(a, c, ir.Constant(_V8I32, [0, 1, 2, 3, 8, 9, 10, 11]))
    hi = b.shuffle_vector(a, c, ir.Constant(_V8I32, [4, 5, 6, 7, 12, 13, 14, 15]))
    return b.add(lo, hi)


def _quads_to_lanes(b: ir.IRBuilder, vs: list[ir.Value]) -> ir.Value:
    """8 vectors of 4 i32 -> one whose lane r is the sum of vs[r]'s lanes."""
    wide = [b.shuffle_vector(vs[2 * j], vs[2 * j + 1], ir.Constant(_V8I32, list(range(8))))
            for j in range(4)]  # [row 2j | row 2j + 1]
    return _pairs_to_lanes(b, wide)


def _pairs_to_lanes(b: ir.IRBuilder, wide: list[ir.Value]) -> ir.Value:
    """4 vectors [row 2j (4 i32) | row 2j + 1 (4 i32)] -> lane r = the sum of row r's 4."""
    def hadd(a, c):
        return intrinsic(b, "llvm.x86.avx2.phadd.d", _V8I32, [a, c])

    h = hadd(hadd(wide[0], wide[1]), hadd(wide[2], wide[3]))  # [0, 2, 4, 6 | 1, 3, 5, 7]
    return b.shuffle_vector(h, h, ir.Constant(_V8I32, [0, 4, 1, 5, 2, 6, 3, 7]))


def _prefetch(m: ir.Module) -> ir.Function:
    """LLVM's prefetch (address, write?, locality, data?), declared once."""
    return m.globals.get("llvm.prefetch.p0") or ir.Function(
        m, ir.FunctionType(ir.VoidType(), [ptr(i8), i32, i32, i32]), "llvm.prefetch.p0")


def _build_gemv(m: ir.Module, t: GGMLType) -> ir.Function:
    """gemv(w, w_stride, xq, ldq, y, ldy, t0, t1, r0, r1, n_blocks, unused): y[tok, r] for
    tokens [t0, t1) and rows [r0, r1) in the order of ggml's repacked gemv (the arguments
    of `kernels._build_gemmq`, so that `_export_q_part` makes it a team job): per (token,
    row) one float chain, each block's (super-block's) integer lanes summed first. Rows go
    8 at a time, one a lane (their integer sums moved into lanes with vphaddd), the rest
    one by one."""
    qt = quant.get(t)
    nbytes = qt.info.type_size
    fn = K._internal(m, f"gemv_{t.name.lower()}", [ptr(i8), i64, ptr(i8), i64, ptr(f32), i64,
                                                   i64, i64, i64, i64, i64, i64])
    w, ws, xq, ldq, y, ldy, t0, t1, r0, r1, nb, _ = fn.args
    b = K._Builder(fn.append_basic_block("entry"))
    k_quant, table = _is_k(t), _is_table(t)
    block = qt.info.block_size
    n_in = b.mul(nb, _c64(block))
    v8i16 = ir.VectorType(i16, 8)
    bsums = b.alloca(v8i16, size=nb, name="bsums") if k_quant else None
    xsum8 = None if k_quant or table else b.alloca(i32, size=nb, name="xsum8")  # 8 * sum(x)
    accs = K._Accs(b, _V8F, 2)
    acc1 = alloca_entry(b, f32, 2, name="acc")

    def hsum(v):
        n = v.type.count
        return intrinsic(b, f"llvm.vector.reduce.add.v{n}i32", i32, [v])

    def halves(srcs, offset):
        """The fp16 at `offset` of each row's block, as 8 floats (one vcvtph2ps)."""
        v = ir.Constant(ir.VectorType(i16, LANES), None)
        for j, src in enumerate(srcs):
            h = b.load(b.bitcast(b.gep(src, [_c64(offset)]), ptr(i16)), align=1)
            v = b.insert_element(v, h, const(i32, j))
        return b.fpext(b.bitcast(v, ir.VectorType(ir.HalfType(), LANES)), _V8F)

    def block_sums(src, xr, k):
        """(integer sum, mins' sum or None, d, dmin or None) of one block of one row: the
        sums as the i32 lanes ggml adds up before it converts."""
        if k_quant:
            sb = qt.emit_int_superblock(b, src)
            xk = b.gep(xr, [b.mul(k, _c64(block))])
            isum = None
            for gi in range(block // GROUP):
                xg = b.load(b.bitcast(b.gep(xk, [_c64(GROUP * gi)]), ptr(_V32I8)), align=1)
                v = K._group_dot(b, sb.group(gi), xg)
                isum = v if isum is None else b.add(isum, v)
            msum = K._madd(b, sb.mins, b.load(b.gep(bsums, [k]), align=2))
            return isum, msum, sb.d, sb.dmin
        g = qt.emit_int_groups(b, src)[0]
        if table:  # IQ4_NL: |x| (the same for the 8 rows) against w with x's signs
            xg = b.load(b.bitcast(b.gep(xr, [b.mul(k, _c64(GROUP))]), ptr(_V32I8)), align=1)
            ux = intrinsic(b, "llvm.abs.v32i8", _V32I8, [xg, ir.Constant(ir.IntType(1), 0)])
            s = intrinsic(b, "llvm.x86.avx2.psign.b", _V32I8, [g.q, xg])
            return K._madd(b, K._maddubs(b, ux, s), ir.Constant(_V16I16, [1] * 16)), None, \
                g.scale, None
        # Q4_0: the raw nibbles (u = q + 8) against x, less 8 * sum(x) once in lanes: exact
        u = b.add(g.q, ir.Constant(_V32I8, [8] * 32))
        xg = b.load(b.bitcast(b.gep(xr, [b.mul(k, _c64(GROUP))]), ptr(_V32I8)), align=1)
        return K._madd(b, K._maddubs(b, u, xg), ir.Constant(_V16I16, [1] * 16)), None, \
            g.scale, None

    with for_range(b, t0, t1, name="t") as tok:
        xr = b.gep(xq, [b.mul(tok, ldq)])
        xd = b.bitcast(b.gep(xr, [n_in]), ptr(f32))
        yt = b.gep(y, [b.mul(tok, ldy)])
        if k_quant:
            K._build_bsums(b, xr, nb, bsums, 8)
        elif not table:
            with for_range(b, _c64(0), nb, name="xs") as k:
                q = b.load(b.bitcast(b.gep(xr, [b.mul(k, _c64(GROUP))]), ptr(_V32I8)),
                           align=1)
                total = intrinsic(b, "llvm.vector.reduce.add.v32i32", i32,
                                  [b.sext(q, ir.VectorType(i32, 32))])
                b.store(b.shl(total, const(i32, 3)), b.gep(xsum8, [k]))
        tiled = b.add(r0, b.mul(b.sdiv(b.sub(r1, r0), _c64(LANES)), _c64(LANES)))
        # the 8 rows are read side by side, block by block: a pattern the hardware
        # prefetcher does not follow when the weights stream from memory (it halved the
        # bandwidth of a large model's decoding), so each block step asks for its share of
        # the next 8 rows ahead of time
        ahead = b.mul(_c64(LANES), ws)  # bytes of 8 rows
        share = b.sdiv(b.add(ahead, b.sub(nb, _c64(1))), nb)  # per block step
        with for_range(b, r0, tiled, step=LANES, name="r8") as r:
            rows = [b.gep(w, [b.mul(b.add(r, _c64(i)), ws)]) for i in range(LANES)]
            nxt = b.gep(w, [b.mul(b.add(r, _c64(LANES)), ws)])
            accs.zero()
            with for_range(b, _c64(0), nb, name="blk8") as k:
                start = b.mul(k, share)
                with for_range(b, start, b.add(start, share), step=64, name="pf") as off:
                    b.call(_prefetch(m), [b.gep(nxt, [off]), const(i32, 0), const(i32, 3),
                                          const(i32, 1)])
                dx = K.splat(b, b.load(b.gep(xd, [b.mul(k, _c64(block // GROUP))])), LANES)
                srcs = [b.gep(p, [b.mul(k, _c64(nbytes))]) for p in rows]
                sums = [block_sums(src, xr, k) for src in srcs]
                isum = _rows_to_lanes(b, [s[0] for s in sums])
                if xsum8 is not None:
                    isum = b.sub(isum, K.splat(b, b.load(b.gep(xsum8, [k])), LANES))
                d = b.fmul(halves(srcs, 0), dx, flags=K.FINITE)
                accs.add_product(0, b.sitofp(isum, _V8F), d)
                if k_quant:
                    msum = _quads_to_lanes(b, [s[1] for s in sums])
                    dm = b.fmul(halves(srcs, 2), dx, flags=K.FINITE)
                    accs.add_product(1, b.sitofp(msum, _V8F), dm)
            total = accs.get(0)
            if k_quant:
                total = b.fsub(total, accs.get(1), flags=K.FINITE)
            b.store(total, b.bitcast(b.gep(yt, [r]), ptr(_V8F)), align=4)
        with for_range(b, tiled, r1, name="r") as r:
            row = b.gep(w, [b.mul(r, ws)])
            for j in range(2):
                b.store(const(f32, 0.0), b.gep(acc1, [const(i32, j)]))
            with for_range(b, _c64(0), nb, name="blk") as k:
                dx = b.load(b.gep(xd, [b.mul(k, _c64(block // GROUP))]))
                isum, msum, d, dmin = block_sums(b.gep(row, [b.mul(k, _c64(nbytes))]), xr, k)
                if k_quant:
                    chains = [(hsum(isum), d), (hsum(msum), dmin)]
                elif table:
                    chains = [(hsum(isum), d)]
                else:
                    chains = [(b.sub(hsum(isum), b.load(b.gep(xsum8, [k]))), d)]
                for j, (v, scale) in enumerate(chains):
                    p = b.gep(acc1, [const(i32, j)])
                    b.store(K._fma(b, b.load(p), b.sitofp(v, f32),
                                   b.fmul(scale, dx, flags=K.FINITE)), p)
            total = b.load(acc1)
            if k_quant:
                total = b.fsub(total, b.load(b.gep(acc1, [const(i32, 1)])), flags=K.FINITE)
            b.store(total, b.gep(yt, [r]))
    b.ret_void()
    return fn


def _job_fn(m: ir.Module, name: str, n_args: int):
    """A team job `name(i64* args, part, n_parts)`: (builder, its first n_args args, part,
    n_parts)."""
    fn = ir.Function(m, ir.FunctionType(ir.VoidType(), [ptr(i64), i64, i64]), name)
    argv, part, n_parts = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    return b, [b.load(b.gep(argv, [_c64(k)])) for k in range(n_args)], part, n_parts


def _build_jobs(m: ir.Module, t: GGMLType, pack: ir.Function, gemm: ir.Function,
                gemv: ir.Function) -> None:
    """The prompt's kernels as team jobs over raw addresses (see `prompt_jobs`):
    `pack_<t>_ppart` (xq, ldq, n_gemm, n_groups, xp) packs its share of x's tiles;
    `gemm_<t>_ppart` (w, w_stride, xp, y, ldy, n_gemm, n_rows, n_blocks, align) and
    `gemv_<t>_ppart` (w, w_stride, xq, ldq, y, ldy, t0, t1, n_rows, n_blocks, align) take
    their share of the rows."""
    name = t.name.lower()
    b, (xq, ldq, n_gemm, ng, xp), part, n_parts = _job_fn(m, f"pack_{name}_ppart", 5)
    tiles = b.sdiv(b.add(n_gemm, _c64(LANES - 1)), _c64(LANES))
    a0, a1 = emit_part_rows(b, tiles, _c64(1), part, n_parts)
    t1 = b.mul(a1, _c64(LANES))
    t1 = b.select(b.icmp_signed("<", t1, n_gemm), t1, n_gemm)
    with b.if_then(b.icmp_signed("<", a0, a1)):
        b.call(pack, [b.inttoptr(xq, ptr(i8)), ldq, b.mul(a0, _c64(LANES)), t1, ng,
                      b.gep(b.inttoptr(xp, ptr(i8)), [b.mul(b.mul(a0, ng), _c64(RECORD))])])
    b.ret_void()
    b, (w, ws, xp, y, ldy, n_gemm, n_rows, nb, align), part, n_parts = _job_fn(
        m, f"gemm_{name}_ppart", 9)
    r0, r1 = emit_part_rows(b, n_rows, align, part, n_parts)
    tiles = b.sdiv(b.add(n_gemm, _c64(LANES - 1)), _c64(LANES))
    w, xp, y = b.inttoptr(w, ptr(i8)), b.inttoptr(xp, ptr(i8)), b.inttoptr(y, ptr(f32))
    chunk = TOKEN_CHUNK // LANES
    with b.if_then(b.icmp_signed("<", r0, r1)):
        with for_range(b, _c64(0), b.sdiv(b.add(tiles, _c64(chunk - 1)), _c64(chunk)),
                       name="chunk") as c:
            c0 = b.mul(c, _c64(chunk))
            c1 = b.add(c0, _c64(chunk))
            c1 = b.select(b.icmp_signed("<", c1, tiles), c1, tiles)
            b.call(gemm, [w, ws, xp, y, ldy, n_gemm, c0, c1, r0, r1, nb])
    b.ret_void()
    b, (w, ws, xq, ldq, y, ldy, t0, t1, n_rows, nb, align), part, n_parts = _job_fn(
        m, f"gemv_{name}_ppart", 11)
    r0, r1 = emit_part_rows(b, n_rows, align, part, n_parts)
    with b.if_then(b.icmp_signed("<", r0, r1)):
        b.call(gemv, [b.inttoptr(w, ptr(i8)), ws, b.inttoptr(xq, ptr(i8)), ldq,
                      b.inttoptr(y, ptr(f32)), ldy, t0, t1, r0, r1, nb, _c64(0)])
    b.ret_void()


def build_module(t: GGMLType) -> ir.Module:
    """`gemv_<t>_part` (a one-token gemv as a team job) and the prompt's jobs
    (`_build_jobs`) for a repacked weight type."""
    m = ir.Module(name=f"repack_{t.name.lower()}")
    name = t.name.lower()
    pack, gemm, gemv = _build_pack(m, t), _build_gemm(m, t), _build_gemv(m, t)
    K._export_q_part(m, f"gemv_{name}_part", gemv)
    _build_jobs(m, t, pack, gemm, gemv)
    return m


# -- Python side -----------------------------------------------------------------------------



class _Kernels:
    def __init__(self, t: GGMLType):
        name = t.name.lower()
        jobs = [f"{k}_{name}_ppart" for k in ("pack", "gemm", "gemv")]
        sigs = {f"gemv_{name}_part": K._PART_SIG, **dict.fromkeys(jobs, K._PART_SIG)}
        mod = compile_kernels(lambda: build_module(t), sigs, key=f"repack.build_module:{t.name}")
        addr = lambda k: ctypes.cast(mod[k], ctypes.c_void_p).value  # noqa: E731
        self.gemv_part = addr(f"gemv_{name}_part")
        self.pack_job, self.gemm_job, self.gemv_job = map(addr, jobs)
        self.k_quant = _is_k(t)


_KERNELS: dict = {}
_lock = threading.Lock()


def kernels(t: GGMLType) -> _Kernels:
    k = _KERNELS.get(t)
    if k is None:
        with _lock:
            k = _KERNELS.get(t) or _Kernels(t)
            _KERNELS[t] = k
    return k


def gemv_part(t: GGMLType) -> int:
    """The address of the one-token team job over repacked weights of type `t` (arguments
    as `kernels._add_gemv` posts them for `gemvq_<t>_part`)."""
    return kernels(t).gemv_part


def gemm_tokens(t: GGMLType, n_tok: int) -> int:
    """The first tokens of a product that ggml's repacked gemm takes (the rest: its gemv).
    Q4_0's (IQ4_NL's) gemm and gemv sum alike: the prompt kernel takes every token."""
    if _is_k(t):
        return n_tok - n_tok % GEMM_TOKENS
    return n_tok if n_tok >= GEMM_TOKENS else 0


def packed_bytes(t: GGMLType, n_tok: int, n_in: int) -> int:
    """Bytes of x packed for the prompt kernel (`pack_<t>`): 0 where gemv takes it all."""
    return -(-gemm_tokens(t, n_tok) // LANES) * (n_in // GROUP) * RECORD


def prompt_jobs(w: np.ndarray, t: GGMLType, xq: int, ldq: int, y: int, ldy: int, n_tok: int,
                n_in: int, n_out: int, threads: int, xp: int) -> tuple[list, list]:
    """A product over a repacked weight as team jobs on raw addresses, x given rounded
    (`kernels.round_q8`'s rows, ldq bytes apart): (the phase that packs x into `xp`,
    `packed_bytes` long; empty where gemv takes every token), (the phase of the products:
    the first `gemm_tokens` tokens in the order of ggml's gemm, the rest in its gemv's)."""
    kern = kernels(t)
    nb = n_in // quant.get(t).info.block_size
    ng = n_in // GROUP
    n_gemm = gemm_tokens(t, n_tok)
    parts = row_parts(n_out, threads, K._min_rows(n_in * (2 + n_tok // 2)), K.ROW_ALIGN)
    wa, ws = K.data_address(w), w.strides[0]
    pack, products = [], []
    if n_gemm:
        tiles = -(-n_gemm // LANES)
        pack.append([kern.pack_job, row_parts(tiles, threads, max(1, (1 << 13) // ng), 1),
                     xq, ldq, n_gemm, ng, xp])
        products.append([kern.gemm_job, parts, wa, ws, xp, y, ldy, n_gemm, n_out, nb,
                         K.ROW_ALIGN])
    if n_gemm < n_tok:
        products.append([kern.gemv_job, parts, wa, ws, xq, ldq, y, ldy, n_gemm, n_tok, n_out,
                         nb, K.ROW_ALIGN])
    return pack, products


def matmul(w: np.ndarray, t: GGMLType, xq: np.ndarray, y: np.ndarray, ldy: int, n_tok: int,
           n_in: int, n_out: int, threads: int) -> None:
    """y = x @ W.T over a repacked weight, x given rounded (`kernels.round_q8`, xq): the
    first n_tok - n_tok % 4 tokens in the order of ggml's gemm, the rest in its gemv's."""
    xp = np.empty(max(1, packed_bytes(t, n_tok, n_in)), np.uint8)
    for phase in prompt_jobs(w, t, K.data_address(xq), xq.shape[1], K.data_address(y), ldy,
                             n_tok, n_in, n_out, threads, K.data_address(xp)):
        if phase:
            run_jobs(phase, threads)
