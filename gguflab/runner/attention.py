"""Attention as llama.cpp's CPU flash-attention kernel (ggml's `flash_attn_ext`) computes it
over an F16 KV cache, compiled with llvmlite and run on the thread pool over (head, query)
rows.

ggml takes one of two routes, by how many queries the batch holds:

- fewer than 64 (`VEC`: generation, short batches): each query on its own, keys one by one
  in order. Q is rounded to fp16 (an F16 K's dot type), q.k is ggml's AVX2 f16 dot (four
  8-lane FMA accumulators), then scale, softcap, the online softmax (expf), and the V
  accumulator is **fp16**: every step scales and multiply-adds through f32 and rounds back.
- 64 or more (`TILED`: prompts, perplexity): keys in tiles of 64, everything f32. q.k is one
  FMA chain over the dims; per tile the running max moves once, the exponentials are ggml's
  vectorised `expf` approximation (summed 8 at a time into a double), and V is added by an
  FMA chain over the tile's keys in order.

Masked keys (later positions, outside a sliding window) are skipped, as ggml skips them.
"""

from __future__ import annotations

import ctypes
import threading
from functools import cache

import numpy as np
from llvmlite import ir

from ..errors import UserError
from ..jit import compile_kernels
from ..jit.builders import Target, const, f32, f64, for_range, i16, i64, ptr, void
from ..jit.floats import emit_f16_to_f32, emit_f32_to_f16, hardware_half
from ..jit.parallel import default_threads, job_table, row_parts, run_jobs

TILE = 64  # ggml's GGML_FA_TILE_Q and GGML_FA_TILE_KV: queries per tile and keys per tile
VEC, TILED, SPLIT = 0, 1, 2  # the routes (SPLIT: VEC over key ranges, then combined)
SPLIT_KEYS = 512  # ggml splits one query's keys across its threads from this many on
STEP = 32  # ggml_vec_dot_f16 on AVX2: 4 accumulators of 8 lanes
MIN_WORK = 1 << 14  # (query, key, dim) steps below which one thread does it all

i32 = ir.IntType(32)
_ARGS = [ptr(f32), ptr(i16), ptr(i16), ptr(f32), ptr(f32), *[i64] * 8, f32, f32, i64, i64, i64]


def _intr(m: ir.Module, name: str, n_args: int) -> ir.Function:
    """The f32 intrinsic `name` (llvm.fma.f32 ...) of `n_args` floats, declared once."""
    return m.globals.get(name) or ir.Function(m, ir.FunctionType(f32, [f32] * n_args), name)


def _fc(v: float) -> ir.Constant:
    return ir.Constant(f32, v)


def _hexf(s: str) -> ir.Constant:
    return _fc(float.fromhex(s))


def emit_v_expf(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """ggml's AVX2 `ggml_v_expf` of x, a float or a vector of floats (lane by lane the same
    function): 2^n times a polynomial in x - n ln2, with its two-step scaling past
    |n| > 126 (and the limits past 192)."""
    lanes = x.type.count if isinstance(x.type, ir.VectorType) else 0
    ft = x.type
    it = ir.VectorType(i32, lanes) if lanes else i32
    sfx = f"v{lanes}f32" if lanes else "f32"
    fma_f = _intr_t(b.module, f"llvm.fma.{sfx}", ft, 3)
    fabs_f = _intr_t(b.module, f"llvm.fabs.{sfx}", ft, 1)
    fma = lambda a, c, d: b.call(fma_f, [a, c, d])  # noqa: E731
    ci = lambda v: ir.Constant(it, [v] * lanes if lanes else v)  # noqa: E731
    cf = lambda v: ir.Constant(ft, [v] * lanes if lanes else v)  # noqa: E731
    hx = lambda s: cf(float.fromhex(s))  # noqa: E731
    r = hx("0x1.8p23")
    z = fma(x, hx("0x1.715476p+0"), r)
    n = b.fsub(z, r)
    red = fma(b.fneg(n), hx("0x1.7f7d1cp-20"), fma(b.fneg(n), hx("0x1.62e4p-1"), x))
    e = b.shl(b.bitcast(z, it), ci(23))
    k = b.bitcast(b.add(e, ci(0x3F800000)), ft)
    u = b.fmul(red, red)
    j = fma(fma(fma(hx("0x1.0e4020p-7"), red, hx("0x1.573e2ep-5")), u,
                fma(hx("0x1.555e66p-3"), red, hx("0x1.fffdb6p-2"))),
            u, b.fmul(hx("0x1.ffffecp-1"), red))
    an = b.call(fabs_f, [n])
    g = b.select(b.fcmp_ordered("<=", n, cf(0.0)), ci(0x82000000 - (1 << 32)), ci(0))
    s1 = b.bitcast(b.add(g, ci(0x7F000000)), ft)
    s2 = b.bitcast(b.sub(e, g), ft)
    far = b.select(b.fcmp_ordered(">", an, cf(192.0)), b.fmul(s1, s1),
                   b.fmul(fma(s2, j, s2), s1))
    return b.select(b.fcmp_ordered(">", an, cf(126.0)), far, fma(k, j, k))


def _intr_t(m: ir.Module, name: str, t: ir.Type, n_args: int) -> ir.Function:
    """The intrinsic `name` over values of type t (llvm.fma.v8f32 ...), declared once."""
    return m.globals.get(name) or ir.Function(m, ir.FunctionType(t, [t] * n_args), name)


def _build(m: ir.Module, name: str, half_kv: bool) -> None:
    """`name(q, k, v, kt, out, n, n_head, group, hd, hstride, tpad, p0, n_swa, scale, cap,
    route, row0, row1)`: rows [row0, row1) of (head, query), row = head * n + query."""
    fn = ir.Function(m, ir.FunctionType(void, _ARGS), name)
    (q, kc, vc, kt, out, n, n_head, group, hd, hstride, tpad, p0, n_swa, scale, cap,
     route, row0, row1) = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    hw = hardware_half(Target.CPU)
    fma = _intr(m, "llvm.fma.f32", 3)
    expf = _intr(m, "expf", 1)
    tanhf = _intr(m, "tanhf", 1)
    c0, c1 = const(i64, 0), const(i64, 1)
    fz, one, ninf = _fc(0.0), _fc(1.0), _fc(float("-inf"))
    vkq = b.alloca(f32, hd, name="vkq")  # the V accumulator (fp16 values on the VEC route)
    qh = b.alloca(f32, hd, name="qh")  # Q rounded to fp16
    acc = b.alloca(f32, STEP, name="acc")
    m_, s_ = b.alloca(f32, name="M"), b.alloca(f32, name="S")
    sd_ = b.alloca(f64, name="sumd")
    sv_ = b.alloca(f32, name="score")

    def f16r(x):  # rounded to fp16 and back, as ggml rounds
        return emit_f16_to_f32(b, emit_f32_to_f16(b, x, hw), hw)

    def load_kv(base, idx):  # one cache element as f32
        if half_kv:
            return emit_f16_to_f32(b, b.load(b.gep(base, [idx])), hw)
        return b.load(b.gep(b.bitcast(base, ptr(f32)), [idx]))

    capped = b.fcmp_ordered("!=", cap, fz)
    sc = b.select(capped, b.fdiv(scale, b.select(capped, cap, one)), scale)  # ggml: scale/cap

    def score(s):  # s * scale, then cap * tanh(.)
        b.store(b.fmul(s, sc), sv_)
        with b.if_then(capped):
            b.store(b.fmul(cap, b.call(tanhf, [b.load(sv_)])), sv_)
        return b.load(sv_)

    def vec_row(kbase, qrow, lo, pos):
        with for_range(b, c0, hd, name="qd") as d:
            b.store(f16r(b.load(b.gep(qrow, [d]))), b.gep(qh, [d]))
        np_ = b.sub(hd, b.srem(hd, const(i64, STEP)))
        with for_range(b, lo, b.add(pos, c1), name="j") as j:
            krow = b.add(kbase, b.mul(j, hd))
            with for_range(b, c0, const(i64, STEP), name="a0") as lane:
                b.store(fz, b.gep(acc, [lane]))
            with for_range(b, c0, np_, STEP, name="i0") as i0:
                with for_range(b, c0, const(i64, STEP), name="l") as lane:
                    x = b.add(i0, lane)
                    p = b.gep(acc, [lane])
                    b.store(b.call(fma, [load_kv(kc, b.add(krow, x)),
                                         b.load(b.gep(qh, [x])), b.load(p)]), p)
            a = [b.load(b.gep(acc, [const(i64, t)])) for t in range(STEP)]
            x8 = [b.fadd(b.fadd(a[t], a[16 + t]), b.fadd(a[8 + t], a[24 + t])) for t in range(8)]
            t0 = [b.fadd(x8[t], x8[4 + t]) for t in range(4)]
            b.store(b.fpext(b.fadd(b.fadd(t0[0], t0[1]), b.fadd(t0[2], t0[3])), f64), sd_)
            with for_range(b, np_, hd, name="lo") as x:  # leftovers, in double
                pr = b.fmul(load_kv(kc, b.add(krow, x)), b.load(b.gep(qh, [x])))
                b.store(b.fadd(b.load(sd_), b.fpext(pr, f64)), sd_)
            s = score(b.fptrunc(b.load(sd_), f32))
            mo = b.load(m_)
            new = b.fcmp_ordered(">", s, mo)
            ex = b.call(expf, [b.select(new, b.fsub(mo, s), b.fsub(s, mo))])
            ms, vs = b.select(new, ex, one), b.select(new, one, ex)
            with b.if_then(new):
                b.store(s, m_)
                with for_range(b, c0, hd, name="sc") as d:
                    p = b.gep(vkq, [d])
                    b.store(f16r(b.fmul(b.load(p), ms)), p)
            vrow = b.add(kbase, b.mul(j, hd))
            with for_range(b, c0, hd, name="mad") as d:
                p = b.gep(vkq, [d])
                b.store(f16r(b.call(fma, [load_kv(vc, b.add(vrow, d)), vs, b.load(p)])), p)
            b.store(b.call(fma, [b.load(s_), ms, vs]), s_)

    v8, h8 = ir.VectorType(f32, 8), ir.VectorType(ir.HalfType(), 8)
    accs = [b.alloca(v8, name=f"acc{t}") for t in range(4)]

    def ld8(arr, idx):  # 8 floats of an f32 array
        return b.load(b.bitcast(b.gep(arr, [idx]), ptr(v8)), align=4)

    def st8(val, arr, idx):
        b.store(val, b.bitcast(b.gep(arr, [idx]), ptr(v8)), align=4)

    def kv8(base, idx):  # 8 cache elements as f32
        if half_kv:
            h = b.load(b.bitcast(b.gep(base, [idx]), ptr(ir.VectorType(i16, 8))), align=2)
            return b.fpext(b.bitcast(h, h8), v8)
        return ld8(b.bitcast(base, ptr(f32)), idx)

    def r16(v):  # 8 lanes rounded to fp16 and back (F16C)
        return b.fpext(b.fptrunc(v, h8), v8)

    def by8(stop, body, name):  # body(d, vector?) over [0, stop): 8 lanes, then one by one
        whole = b.sub(stop, b.srem(stop, const(i64, 8)))
        with for_range(b, c0, whole, 8, name=name) as d:
            body(d, True)
        with for_range(b, whole, stop, name=name + "t") as d:
            body(d, False)

    def vec_row_simd(kbase, qrow, lo, pos):
        """vec_row with ggml's own vectors (F16C): the same operations lane by lane."""
        def round_q(d, vec):
            if vec:
                st8(r16(ld8(qrow, d)), qh, d)
            else:
                b.store(f16r(b.load(b.gep(qrow, [d]))), b.gep(qh, [d]))

        by8(hd, round_q, "qd")
        np_ = b.sub(hd, b.srem(hd, const(i64, STEP)))
        zero8 = ir.Constant(v8, [0.0] * 8)
        with for_range(b, lo, b.add(pos, c1), name="j") as j:
            krow = b.add(kbase, b.mul(j, hd))
            for a in accs:
                b.store(zero8, a)
            with for_range(b, c0, np_, STEP, name="i0") as i0:
                for t, a in enumerate(accs):
                    x = b.add(i0, const(i64, 8 * t))
                    b.store(b.call(fma8, [kv8(kc, b.add(krow, x)), ld8(qh, x), b.load(a)]), a)
            a0, a1, a2, a3 = (b.load(a) for a in accs)
            x8 = b.fadd(b.fadd(a0, a2), b.fadd(a1, a3))
            lane = [b.extract_element(x8, const(i32, t)) for t in range(8)]
            t0 = [b.fadd(lane[t], lane[4 + t]) for t in range(4)]
            b.store(b.fpext(b.fadd(b.fadd(t0[0], t0[1]), b.fadd(t0[2], t0[3])), f64), sd_)
            with for_range(b, np_, hd, name="lo") as x:  # leftovers, in double
                pr = b.fmul(load_kv(kc, b.add(krow, x)), b.load(b.gep(qh, [x])))
                b.store(b.fadd(b.load(sd_), b.fpext(pr, f64)), sd_)
            s = score(b.fptrunc(b.load(sd_), f32))
            mo = b.load(m_)
            new = b.fcmp_ordered(">", s, mo)
            ex = b.call(expf, [b.select(new, b.fsub(mo, s), b.fsub(s, mo))])
            ms, vs = b.select(new, ex, one), b.select(new, one, ex)

            def rescale(d, vec):
                if vec:
                    st8(r16(b.fmul(ld8(vkq, d), splat8(ms))), vkq, d)
                else:
                    p = b.gep(vkq, [d])
                    b.store(f16r(b.fmul(b.load(p), ms)), p)

            with b.if_then(new):
                b.store(s, m_)
                by8(hd, rescale, "sc")
            vrow = b.add(kbase, b.mul(j, hd))

            def mad(d, vec):
                if vec:
                    st8(r16(b.call(fma8, [kv8(vc, b.add(vrow, d)), splat8(vs), ld8(vkq, d)])),
                        vkq, d)
                else:
                    p = b.gep(vkq, [d])
                    b.store(f16r(b.call(fma, [load_kv(vc, b.add(vrow, d)), vs, b.load(p)])), p)

            by8(hd, mad, "mad")
            b.store(b.call(fma, [b.load(s_), ms, vs]), s_)

    fma8 = m.globals.get("llvm.fma.v8f32") or ir.Function(
        m, ir.FunctionType(v8, [v8] * 3), "llvm.fma.v8f32")

    def splat8(x):
        v = b.insert_element(ir.Constant(v8, ir.Undefined), x, const(i32, 0))
        return b.shuffle_vector(v, ir.Constant(v8, ir.Undefined), ir.Constant(
            ir.VectorType(i32, 8), [0] * 8))

    split = b.icmp_signed("==", route, const(i64, SPLIT))
    tiled = b.icmp_signed("==", route, const(i64, TILED))
    with b.if_then(tiled):  # whole blocks of Q_BLOCK queries of one head, then one by one
        blocks = {rb: _build_tiled_block(m, f"{name}_tiles{rb}", rb, half_kv)
                  for rb in (Q_BLOCK, 1)}
        r_ = b.alloca(i64, name="row")
        b.store(row0, r_)
        cond = b.append_basic_block("blk.cond")
        body = b.append_basic_block("blk.body")
        done = b.append_basic_block("blk.end")
        b.branch(cond)
        b.position_at_end(cond)
        b.cbranch(b.icmp_signed("<", b.load(r_), row1), body, done)
        b.position_at_end(body)
        r = b.load(r_)
        h, i = b.sdiv(r, n), b.srem(r, n)
        whole = b.and_(b.icmp_signed("<=", b.add(i, const(i64, Q_BLOCK)), n),
                       b.icmp_signed("<=", b.add(r, const(i64, Q_BLOCK)), row1))
        args = [q, kc, vc, kt, out, n, n_head, group, hd, hstride, tpad, p0, n_swa, sc, cap,
                h, i]
        with b.if_else(whole) as (then, other):
            with then:
                b.call(blocks[Q_BLOCK], args)
                b.store(b.add(r, const(i64, Q_BLOCK)), r_)
            with other:
                b.call(blocks[1], args)
                b.store(b.add(r, c1), r_)
        b.branch(cond)
        b.position_at_end(done)
        b.ret_void()
    with for_range(b, row0, row1, name="r") as r:
        # SPLIT: one query, and "query" i is the i-th range of tpad keys of its head
        h, i = b.sdiv(r, n), b.srem(r, n)
        pos = b.select(split, p0, b.add(p0, i))
        g = b.sdiv(h, group)
        # the keys this query sees: [lo, pos]; a sliding window keeps pos - j < n_swa
        lo = b.sub(pos, b.sub(n_swa, c1))
        lo = b.select(b.icmp_signed(">", n_swa, c0),
                      b.select(b.icmp_signed(">", lo, c0), lo, c0), c0)
        k0 = b.mul(i, tpad)
        k1 = b.sub(b.add(k0, tpad), c1)
        lo = b.select(split, b.select(b.icmp_signed(">", k0, lo), k0, lo), lo)
        hi = b.select(split, b.select(b.icmp_signed("<", k1, pos), k1, pos), pos)
        at = b.mul(b.select(split, h, b.add(b.mul(i, n_head), h)), hd)
        qrow, orow = b.gep(q, [at]), b.gep(out, [at])
        kbase = b.mul(g, hstride)
        b.store(ninf, m_)
        b.store(fz, s_)
        with for_range(b, c0, hd, name="zv") as d:
            b.store(fz, b.gep(vkq, [d]))
        (vec_row_simd if hw else vec_row)(kbase, qrow, lo, hi)
        s = b.load(s_)
        with b.if_else(split) as (then, other):
            with then:  # the range's partial (M, S, V unscaled) at out + r * (2 + hd)
                part = b.gep(out, [b.mul(r, b.add(hd, const(i64, 2)))])
                b.store(b.load(m_), part)
                b.store(s, b.gep(part, [c1]))
                with for_range(b, c0, hd, name="pv") as d:
                    b.store(b.load(b.gep(vkq, [d])), b.gep(part, [b.add(d, const(i64, 2))]))
            with other:
                inv = b.select(b.fcmp_ordered("==", s, fz), fz, b.fdiv(one, s))
                with for_range(b, c0, hd, name="o") as d:  # V / S
                    b.store(b.fmul(b.load(b.gep(vkq, [d])), inv), b.gep(orow, [d]))
    b.ret_void()


Q_BLOCK = 4  # queries of one head the tiled route takes together (ggml: a tile of 64)
V_WIDTH = 16  # dims of V (and keys of K) a register block holds: two vectors of 8


def _build_tiled_block(m: ir.Module, name: str, rows: int, half_kv: bool) -> ir.Function:
    """`name(q, k, v, kt, out, n, n_head, group, hd, hstride, tpad, p0, n_swa, sc, cap, h,
    i)`: the TILED route for `rows` consecutive queries i.. of head h, as ggml's tiled
    kernel computes each of them: per tile of 64 keys, q.k as one FMA chain over the dims
    (x scale, softcap, masked keys -inf), the running max moved once (V and S rescaled by
    expf), ggml_v_expf of the scores 8 at a time summed in AVX2's lane tree into a double,
    then V added as one FMA chain over the tile's keys (a masked key's weight is 0, which
    leaves the sum's bits as they are). The queries share the loads of K and V: registers
    hold Q_BLOCK queries x V_WIDTH lanes."""
    fn = ir.Function(m, ir.FunctionType(void, [*_ARGS[:13], f32, f32, i64, i64]), name)
    fn.linkage = "internal"
    (q, kc, vc, kt, out, n, n_head, group, hd, hstride, tpad, p0, n_swa, sc, cap, h,
     i) = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    v8, h8 = ir.VectorType(f32, 8), ir.VectorType(ir.HalfType(), 8)
    c0, c1 = const(i64, 0), const(i64, 1)
    fz, ninf = _fc(0.0), _fc(float("-inf"))
    zero8 = ir.Constant(v8, [0.0] * 8)
    fma = _intr(m, "llvm.fma.f32", 3)
    fma8 = _intr_t(m, "llvm.fma.v8f32", v8, 3)
    expf = _intr(m, "expf", 1)
    tanhf = _intr(m, "tanhf", 1)
    maxnum = _intr(m, "llvm.maxnum.f32", 2)
    half = ptr(ir.VectorType(i16, 8))

    def ld8(base, idx):
        return b.load(b.bitcast(b.gep(base, [idx]), ptr(v8)), align=4)

    def st8(val, base, idx):
        b.store(val, b.bitcast(b.gep(base, [idx]), ptr(v8)), align=4)

    def kv8(base, idx):
        if half_kv:
            return b.fpext(b.bitcast(b.load(b.bitcast(b.gep(base, [idx]), half), align=2), h8),
                           v8)
        return ld8(b.bitcast(base, ptr(f32)), idx)

    def kv1(base, idx):
        if half_kv:
            return emit_f16_to_f32(b, b.load(b.gep(base, [idx])), hardware_half(Target.CPU))
        return b.load(b.gep(b.bitcast(base, ptr(f32)), [idx]))

    def splat8(x):
        return b.shuffle_vector(b.insert_element(ir.Constant(v8, ir.Undefined), x,
                                                 const(i32, 0)),
                                ir.Constant(v8, ir.Undefined),
                                ir.Constant(ir.VectorType(i32, 8), [0] * 8))

    def lanes(v, idx):
        idx = list(idx)
        return b.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, len(idx)), idx))

    tile = const(i64, TILE)
    vkq = b.alloca(f32, b.mul(hd, const(i64, rows)), name="vkq")
    kq = b.alloca(f32, rows * TILE, name="kq")
    m_ = [b.alloca(f32, name=f"M{k}") for k in range(rows)]
    s_ = [b.alloca(f32, name=f"S{k}") for k in range(rows)]
    accs = [[b.alloca(v8, name=f"a{k}{t}") for t in range(2)] for k in range(rows)]
    acc1 = [b.alloca(f32, name=f"t{k}") for k in range(rows)]
    g = b.sdiv(h, group)
    kbase = b.mul(g, hstride)
    pos = [b.add(p0, b.add(i, const(i64, k))) for k in range(rows)]

    def first_key(p):  # a sliding window keeps p - j < n_swa
        lo = b.sub(p, b.sub(n_swa, c1))
        return b.select(b.icmp_signed(">", n_swa, c0),
                        b.select(b.icmp_signed(">", lo, c0), lo, c0), c0)

    lo = [first_key(p) for p in pos]
    qrow = [b.gep(q, [b.mul(b.add(b.mul(b.add(i, const(i64, k)), n_head), h), hd)])
            for k in range(rows)]
    vrow = [b.gep(vkq, [b.mul(const(i64, k), hd)]) for k in range(rows)]
    kqrow = [b.gep(kq, [const(i64, k * TILE)]) for k in range(rows)]
    for k in range(rows):
        b.store(ninf, m_[k])
        b.store(fz, s_[k])
        with for_range(b, c0, hd, name="zv") as d:
            b.store(fz, b.gep(vrow[k], [d]))
    hd_vec = b.sub(hd, b.srem(hd, const(i64, V_WIDTH)))
    capped = b.fcmp_ordered("!=", cap, fz)
    start = b.mul(b.sdiv(lo[0], tile), tile)
    last = pos[-1]
    with for_range(b, start, b.add(last, c1), TILE, name="ic") as ic:
        # q.k for 16 keys at a time: each score one FMA chain over the dims, from 0
        for c in range(0, TILE, V_WIDTH):
            for row in accs:
                for a in row:
                    b.store(zero8, a)
            with for_range(b, c0, hd, name="d") as d:
                ktrow = b.add(b.add(b.mul(b.add(b.mul(g, hd), d), tpad), ic), const(i64, c))
                kv = [ld8(kt, ktrow), ld8(kt, b.add(ktrow, const(i64, 8)))]
                for k in range(rows):
                    qd = splat8(b.load(b.gep(qrow[k], [d])))
                    for t in range(2):
                        b.store(b.call(fma8, [kv[t], qd, b.load(accs[k][t])]), accs[k][t])
            for k in range(rows):
                for t in range(2):
                    st8(b.load(accs[k][t]), kqrow[k], const(i64, c + 8 * t))
        # each query's scores, its running max and sum
        for k in range(rows):
            row = kqrow[k]
            for e in range(0, TILE, 8):
                st8(b.fmul(ld8(row, const(i64, e)), splat8(sc)), row, const(i64, e))
            with b.if_then(capped):
                with for_range(b, c0, tile, name="cap") as t:
                    p = b.gep(row, [t])
                    b.store(b.fmul(cap, b.call(tanhf, [b.load(p)])), p)
            mx = None
            for e in range(0, TILE, 8):
                j = b.add(splat8_i(b, b.add(ic, const(i64, e))),
                          ir.Constant(ir.VectorType(i64, 8), list(range(8))))
                seen = b.and_(b.icmp_signed(">=", j, splat8_i(b, lo[k])),
                              b.icmp_signed("<=", j, splat8_i(b, pos[k])))
                v = b.select(seen, ld8(row, const(i64, e)), ir.Constant(v8, [float("-inf")] * 8))
                st8(v, row, const(i64, e))
                mx = v if mx is None else b.select(b.fcmp_ordered(">", mx, v), mx, v)
            mx4 = b.select(b.fcmp_ordered(">", lanes(mx, range(4)), lanes(mx, range(4, 8))),
                           lanes(mx, range(4)), lanes(mx, range(4, 8)))
            mx2 = b.select(b.fcmp_ordered(">", lanes(mx4, [0, 1]), lanes(mx4, [2, 3])),
                           lanes(mx4, [0, 1]), lanes(mx4, [2, 3]))
            a0, a1 = (b.extract_element(mx2, const(i32, t)) for t in range(2))
            tmax = b.select(b.fcmp_ordered(">", a0, a1), a0, a1)
            with b.if_else(b.fcmp_ordered("==", tmax, ninf)) as (skip, go):
                with skip:  # no key of this tile: weights 0, nothing else moves
                    for e in range(0, TILE, 8):
                        st8(zero8, row, const(i64, e))
                with go:
                    mo = b.load(m_[k])
                    mnew = b.call(maxnum, [mo, tmax])
                    with b.if_then(b.fcmp_ordered(">", mnew, mo)):
                        ms = b.call(expf, [b.fsub(mo, mnew)])
                        with for_range(b, c0, hd, name="sc") as d:
                            p = b.gep(vrow[k], [d])
                            b.store(b.fmul(b.load(p), ms), p)
                        b.store(b.fmul(b.load(s_[k]), ms), s_[k])
                    b.store(mnew, m_[k])
                    sd = ir.Constant(f64, 0.0)
                    for e in range(0, TILE, 8):
                        ev = emit_v_expf(b, b.fsub(ld8(row, const(i64, e)), splat8(mnew)))
                        st8(ev, row, const(i64, e))
                        h4 = b.fadd(lanes(ev, range(4)), lanes(ev, range(4, 8)))
                        h2 = b.fadd(lanes(h4, [0, 1]), lanes(h4, [2, 3]))
                        r = b.fadd(b.extract_element(h2, const(i32, 0)),
                                   b.extract_element(h2, const(i32, 1)))
                        sd = b.fadd(sd, b.fpext(r, f64))
                    b.store(b.fptrunc(b.fadd(b.fpext(b.load(s_[k]), f64), sd), f32), s_[k])
        # V: one FMA chain over the keys any of the queries sees, 16 dims at a time
        jlo = b.select(b.icmp_signed(">", lo[0], ic), lo[0], ic)
        top = b.add(ic, const(i64, TILE - 1))
        jhi = b.select(b.icmp_signed("<", last, top), last, top)
        with for_range(b, c0, hd_vec, V_WIDTH, name="vd") as d:
            for k in range(rows):
                for t in range(2):
                    b.store(ld8(vrow[k], b.add(d, const(i64, 8 * t))), accs[k][t])
            with for_range(b, jlo, b.add(jhi, c1), name="vj") as j:
                at = b.add(b.add(kbase, b.mul(j, hd)), d)
                vv = [kv8(vc, at), kv8(vc, b.add(at, const(i64, 8)))]
                for k in range(rows):
                    pj = splat8(b.load(b.gep(kqrow[k], [b.sub(j, ic)])))
                    for t in range(2):
                        b.store(b.call(fma8, [vv[t], pj, b.load(accs[k][t])]), accs[k][t])
            for k in range(rows):
                for t in range(2):
                    st8(b.load(accs[k][t]), vrow[k], b.add(d, const(i64, 8 * t)))
        with for_range(b, hd_vec, hd, name="vt") as d:  # dims past whole blocks of 16
            for k in range(rows):
                b.store(b.load(b.gep(vrow[k], [d])), acc1[k])
            with for_range(b, jlo, b.add(jhi, c1), name="vtj") as j:
                vj = kv1(vc, b.add(b.add(kbase, b.mul(j, hd)), d))
                for k in range(rows):
                    pj = b.load(b.gep(kqrow[k], [b.sub(j, ic)]))
                    b.store(b.call(fma, [vj, pj, b.load(acc1[k])]), acc1[k])
            for k in range(rows):
                b.store(b.load(acc1[k]), b.gep(vrow[k], [d]))
    for k in range(rows):  # V / S
        s = b.load(s_[k])
        inv = b.select(b.fcmp_ordered("==", s, fz), fz, b.fdiv(_fc(1.0), s))
        orow = b.gep(out, [b.mul(b.add(b.mul(b.add(i, const(i64, k)), n_head), h), hd)])
        with for_range(b, c0, hd, name="o") as d:
            b.store(b.fmul(b.load(b.gep(vrow[k], [d])), inv), b.gep(orow, [d]))
    b.ret_void()
    return fn


def splat8_i(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """<8 x i64> of x."""
    t = ir.VectorType(i64, 8)
    return b.shuffle_vector(b.insert_element(ir.Constant(t, ir.Undefined), x, const(i32, 0)),
                            ir.Constant(t, ir.Undefined),
                            ir.Constant(ir.VectorType(i32, 8), [0] * 8))


def _build_reduce(m: ir.Module) -> None:
    """`attn_reduce(partials, out, n_head, n_parts, hd)`: each head's output from the
    partials of its key ranges (SPLIT), as ggml combines them: in range order, ranges with
    S = 0 skipped, M the running max, both sides rescaled by libm's expf, then V / S."""
    fn = ir.Function(m, ir.FunctionType(void, [ptr(f32), ptr(f32), i64, i64, i64]),
                     "attn_reduce")
    parts, out, n_head, n_parts, hd = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    fma = _intr(m, "llvm.fma.f32", 3)
    expf = _intr(m, "expf", 1)
    maxnum = _intr(m, "llvm.maxnum.f32", 2)
    c0, c2 = const(i64, 0), const(i64, 2)
    fz = _fc(0.0)
    m_, s_ = b.alloca(f32, name="M"), b.alloca(f32, name="S")
    width = b.add(hd, c2)
    with for_range(b, c0, n_head, name="h") as h:
        orow = b.gep(out, [b.mul(h, hd)])
        b.store(_fc(float("-inf")), m_)
        b.store(fz, s_)
        with for_range(b, c0, hd, name="z") as d:
            b.store(fz, b.gep(orow, [d]))
        with for_range(b, c0, n_parts, name="c") as c:
            part = b.gep(parts, [b.mul(b.add(b.mul(h, n_parts), c), width)])
            mc, sc = b.load(part), b.load(b.gep(part, [const(i64, 1)]))
            with b.if_then(b.fcmp_unordered("!=", sc, fz)):
                mo = b.load(m_)
                mn = b.call(maxnum, [mo, mc])
                s_old = b.call(expf, [b.fsub(mo, mn)])
                s_new = b.call(expf, [b.fsub(mc, mn)])
                with for_range(b, c0, hd, name="d") as d:  # GCC's contraction: one FMA
                    p = b.gep(orow, [d])
                    v = b.load(b.gep(part, [b.add(d, c2)]))
                    b.store(b.call(fma, [b.load(p), s_old, b.fmul(v, s_new)]), p)
                b.store(b.call(fma, [b.load(s_), s_old, b.fmul(sc, s_new)]), s_)
                b.store(mn, m_)
        s = b.load(s_)
        with b.if_then(b.fcmp_unordered("!=", s, fz)):
            inv = b.fdiv(_fc(1.0), s)
            with for_range(b, c0, hd, name="o") as d:
                p = b.gep(orow, [d])
                b.store(b.fmul(b.load(p), inv), p)
    b.ret_void()


def _build_part(m: ir.Module, name: str) -> None:
    """`<name>_part(i64* args, part, n_parts)`: `name` as a team job (jit.parallel) over its
    share of the (head, query) rows. args: q, k, v, kt, out (addresses), n | route << 32,
    n_head, group, hd, hstride, tpad, p0, n_swa, then scale and cap as the low and high
    32 bits of one word."""
    impl = m.globals[name]
    fn = ir.Function(m, ir.FunctionType(void, [ptr(i64), i64, i64]), f"{name}_part")
    argv, part, n_parts = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    a = [b.load(b.gep(argv, [const(i64, k)])) for k in range(14)]
    ptrs = [b.inttoptr(a[k], t) for k, t in enumerate(_ARGS[:5])]
    n = b.and_(a[5], const(i64, 0xFFFFFFFF))
    route = b.lshr(a[5], const(i64, 32))
    sc = b.bitcast(b.trunc(a[13], i32), f32)
    cap = b.bitcast(b.trunc(b.lshr(a[13], const(i64, 32)), i32), f32)
    rows = b.mul(n, a[6])
    r0 = b.sdiv(b.mul(rows, part), n_parts)
    r1 = b.sdiv(b.mul(rows, b.add(part, const(i64, 1))), n_parts)
    b.call(impl, [*ptrs, n, *a[6:13], sc, cap, route, r0, r1])
    b.ret_void()


_PART_SIG = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64)
_REDUCE_SIG = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, *[ctypes.c_int64] * 3)


@cache
def _kernels() -> dict:
    def build() -> ir.Module:
        m = ir.Module(name="attention")
        _build(m, "attn_f32", False)
        _build(m, "attn_f16", True)
        for name in ("attn_f32", "attn_f16"):
            _build_part(m, name)
        _build_reduce(m)
        return m

    mod = compile_kernels(build, key="attention", signatures={
        "attn_f32_part": _PART_SIG, "attn_f16_part": _PART_SIG, "attn_reduce": _REDUCE_SIG})
    # team jobs are run by address, from compiled code
    return {**{name: ctypes.cast(mod[f"{name}_part"], ctypes.c_void_p).value
               for name in ("attn_f32", "attn_f16")}, "reduce": mod["attn_reduce"]}


def route_for(n_tokens: int) -> int:
    """ggml's choice: whole tiles of queries once a batch holds 64 or more."""
    return TILED if n_tokens >= TILE else VEC


def key_ranges(n_tokens: int, p0: int, n_ctx: int, threads: int) -> int:
    """Keys per range when ggml splits one query's keys across its threads, else 0.
    llama.cpp hands the kernel a view of the cache padded to 256 cells (at most the whole
    cache), and ggml splits a single query's keys into one range per thread once that view
    holds 512 or more; each range's result is combined afterwards (`attn_reduce`), which
    rounds differently from one pass. One thread: one range, the same as one pass."""
    if n_tokens != 1 or threads < 2:
        return 0
    view = min(n_ctx, max(256, -(-(p0 + 1) // 256) * 256))
    return -(-view // threads) if view >= SPLIT_KEYS else 0


def flash_attn(q: np.ndarray, k: np.ndarray, v: np.ndarray, p0: int, scale: float,
               softcap: float = 0.0, n_swa: int = 0, route: int | None = None,
               threads: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Attention of the queries `q` (n, n_head, head_dim; float32) at positions p0 ..
    p0 + n - 1 over the keys and values of one layer's cache, `k` and `v` (n_kv, n_ctx,
    head_dim; float16, or float32 holding fp16 values), positions 0 .. p0 + n - 1 filled;
    causal, and within `n_swa` positions when n_swa > 0. Returns (n, n_head * head_dim)
    float32 (into `out`, contiguous, when given). `route`: VEC or TILED, by default ggml's
    choice for n queries."""
    if q.ndim != 3 or k.ndim != 3 or k.shape != v.shape or q.shape[2] != k.shape[2]:
        raise UserError(f"attention needs q (n, n_head, head_dim) and k, v (n_kv, n_ctx, "
                        f"head_dim) alike; got q {q.shape}, k {k.shape}, v {v.shape}")
    n, n_head, hd = q.shape
    n_kv, n_ctx = k.shape[:2]
    if n_kv == 0 or n_head % n_kv:
        raise UserError(f"{n_head} query heads do not share {n_kv} kv heads evenly")
    t = p0 + n
    if p0 < 0 or t > n_ctx:
        raise UserError(f"positions {p0}..{t - 1} are outside the cache of {n_ctx}")
    if k.dtype != v.dtype or k.dtype not in (np.float16, np.float32):
        raise UserError(f"the KV cache must be float16 or float32, got {k.dtype}/{v.dtype}")
    threads = threads or default_threads()
    ranges = key_ranges(n, p0, n_ctx, threads) if route is None else 0
    route = route_for(n) if route is None else route
    if out is None:
        out = np.empty((n, n_head * hd), np.float32)
    elif out.shape != (n, n_head * hd) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise UserError(f"attention output must be contiguous float32 {(n, n_head * hd)}, "
                        f"got {out.dtype} {out.shape}")
    if n == 0:
        return out
    q = np.ascontiguousarray(q, np.float32)
    k, v = np.ascontiguousarray(k), np.ascontiguousarray(v)
    tpad = -(-t // TILE) * TILE
    kt = np.zeros((1,), np.float32)
    if route == TILED:  # the keys transposed, (n_kv, head_dim, tpad), as ggml packs a tile
        kt = np.zeros((n_kv, hd, tpad), np.float32)
        kt[:, :, :t] = k[:, :t].transpose(0, 2, 1)
    part = _kernels()["attn_f16" if k.dtype == np.float16 else "attn_f32"]
    floats = np.array([scale, softcap], np.float32).view(np.int64)[0]
    rows = n * n_head
    args = [q.ctypes.data, k.ctypes.data, v.ctypes.data, kt.ctypes.data, out.ctypes.data,
            n | route << 32, n_head, n_head // n_kv, hd, n_ctx * hd, tpad, p0, n_swa,
            int(floats)]
    if n >= TILE:  # a prompt: parts of whole heads' rows, taken first come, first served
        run_jobs([[part, row_parts(rows, threads), *args]], threads)
        return out
    if ranges:
        _post_split(part, args, ranges, threads)
    else:
        _post_decode(part, args, rows, rows * t * hd, threads)
    return out


def _post_decode(part: int, args: list[int], rows: int, work: int, threads: int) -> None:
    """Decoding: a team job beside the products' (parts are claimed first come, first
    served; a short one is not worth a hand-off)."""
    parts = min(rows, 4 * threads) if work >= MIN_WORK and threads > 1 else 1
    jobs = job_table()
    jobs.add(part, parts, *args)
    jobs.run(threads)


_tls = threading.local()


def _post_split(part: int, args: list[int], size: int, threads: int) -> None:
    """One query's keys in ranges of `size` (key_ranges), one range per thread, as a team
    job writing partials, then combined into the output (args as `flash_attn` makes them
    for one query)."""
    n_head, hd = args[6], args[8]
    n_ranges = threads
    need = n_head * n_ranges * (hd + 2)
    buf = getattr(_tls, "partials", None)
    if buf is None or buf.size < need:
        buf = _tls.partials = np.empty(need, np.float32)
    out = args[4]
    split = list(args)
    split[4], split[5], split[10] = buf.ctypes.data, n_ranges | SPLIT << 32, size
    jobs = job_table()
    jobs.add(part, min(n_ranges * n_head, 4 * threads), *split)
    jobs.run(threads)
    _kernels()["reduce"](buf.ctypes.data, out, n_head, n_ranges, hd)


class OneQuery:
    """`flash_attn` of one query (1, n_head, head_dim) into `out` (1, n_head * head_dim) on
    the VEC route: what a decoding step needs, with every argument that does not change
    from token to token worked out once."""

    def __init__(self, q: np.ndarray, out: np.ndarray, n_kv: int, scale: float,
                 softcap: float, threads: int):
        _, n_head, hd = q.shape
        if q.shape[0] != 1 or not q.flags.c_contiguous or out.shape != (1, n_head * hd) or (
                not out.flags.c_contiguous or n_head % n_kv):
            raise ValueError(f"OneQuery takes q (1, n_head, head_dim), got {q.shape}")
        self.kt = np.zeros((1,), np.float32)
        floats = int(np.array([scale, softcap], np.float32).view(np.int64)[0])
        self.args = [q.ctypes.data, 0, 0, self.kt.ctypes.data, out.ctypes.data, 1 | VEC << 32,
                     n_head, n_head // n_kv, hd, 0, 0, 0, 0, floats]
        self.keep, self.threads, self.shape = (q, out), threads, (n_kv, hd)

    def run(self, k: np.ndarray, v: np.ndarray, p0: int, n_swa: int = 0) -> None:
        """The query at position p0 over k, v (n_kv, n_ctx, head_dim; contiguous, float16
        or float32 holding fp16 values), positions 0 .. p0 filled."""
        n_kv, n_ctx, hd = k.shape
        if (n_kv, hd) != self.shape or not 0 <= p0 < n_ctx or k.dtype != v.dtype or not (
                k.flags.c_contiguous and v.flags.c_contiguous and k.shape == v.shape):
            raise ValueError(f"position {p0} over a cache of {k.shape} {k.dtype}")
        args = self.args
        args[1], args[2], args[9] = k.ctypes.data, v.ctypes.data, n_ctx * hd
        args[10], args[11], args[12] = -(-(p0 + 1) // TILE) * TILE, p0, n_swa
        part = _kernels()["attn_f16" if k.dtype == np.float16 else "attn_f32"]
        ranges = key_ranges(1, p0, n_ctx, self.threads)
        if ranges:
            _post_split(part, args, ranges, self.threads)
        else:
            _post_decode(part, args, args[6], args[6] * (p0 + 1) * hd, self.threads)
