"""The matrix products of inference, over weights kept in their GGUF form.

`matmul(w, wtype, x)` computes `x @ W.T` where W is the weight as stored in the file: rows
of raw quantized bytes (a zero-copy view into the memory map), or a float array for
F32/F16/BF16. Each weight type gets its own compiled kernels, generated from that type's
`emit_dequantize_block` IR (the same generator the quantizer's dequantizer uses), so the
products see exactly the weights `quant.get(t).dequantize` gives:

- `gemvq_<t>` (decoding one token, x86 AVX2, the legacy types, Q4_K and Q6_K): as llama.cpp
  does, x is rounded to Q8_0 once per product and each block is read as groups of 32 small
  integers with a float scale and offset (from the same level and scale emitters as the
  type's dequantizer): integer dot products (vpmaddubsw / vpmaddwd), one float FMA a group;
- `gemv1_<t>` / `gemv4_<t>` (decoding: 1 token, or 2-4 in one pass) stream each weight row
  once. The block's dequantization IR is emitted through `_Builder`, which turns each of its
  stores into FMAs into the accumulators, so the dequantized floats never touch memory;
- `gemm_<t>` (prompt processing) packs a chunk of tokens and dequantizes a group of rows,
  a K-block at a time, into a per-thread scratch buffer (F16 rows are read in place), then
  runs a register-blocked kernel (3 rows x 4 tokens, twelve vector accumulators) over it, so
  the dequantization is paid once per row for a whole chunk of tokens;
- `gemmq_<t>` (prompt processing on integer dot products); over the legacy types in tiles
  of 8 tokens, each weight group unpacked once for them and its 8 scale products one vector
  multiply, so that a (row, token, group) costs its integer dot, conversion and FMA.

Over float weights (F16, BF16, F32) the products are ggml's bits: x rounded as ggml rounds
it, and each output summed in the order of the kernel llama.cpp's CPU backend runs there,
llamafile's tinyBLAS for 2 tokens or more (one accumulator, k in order), `ggml_vec_dot_<t>`
for one token or a row count tinyBLAS does not take (`gemv1_<t>`: four accumulators).

Every kernel computes the same bits on every x86-64 CPU (AVX2 or AVX-512) and whatever the
thread split: the float accumulators are vectors of a fixed `LANES` floats, summed in an order
the IR spells out (explicit `llvm.fma` for each product, a fixed tree across lanes), and no
float op carries a flag that lets LLVM reassociate or contract it. Only `nnan`/`ninf` are
set (the weights and activations are finite), which drops NaN checks without changing a
finite result. A wider CPU runs the same function, with its wider registers only where that
leaves the result as it is (the integer dot products). Decoding products are posted as
jobs to the thread team of `jit.parallel` (`matmuls` posts a layer's Q, K, V, or gate and
up, at once; `Products` posts them once and replays them every token), a hand-off of about a
microsecond. A prompt's products are team jobs too (`prompt_job`), each part cutting its
share of the rows and the token chunks itself; `runner/ubatch.py` lays a whole batch out
as one program of them. The one-token jobs take the numpy arrays themselves (PyObject*)
and read their data pointers, which keeps posting them to a few microseconds.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

import numpy as np
from llvmlite import ir

from .. import quant
from ..errors import UserError
from ..gguf import GGMLType
from ..jit import compile_kernels, host_cpu
from ..jit.builders import (
    Target,
    alloca_entry,
    const,
    f16,
    f32,
    fabs,
    for_range,
    i8,
    i16,
    i32,
    i64,
    intrinsic,
    ptr,
    splat,
    void,
)
from ..jit.floats import emit_f16_to_f32, emit_f32_to_f16, hardware_half
from ..jit.parallel import (
    MAX_JOBS,
    JobTable,
    default_threads,
    emit_part_rows,
    job_table,
    row_parts,
    run_jobs,
    team,
)
from . import repack

__all__ = ["SUPPORTED_TYPES", "matmul", "matmuls", "get_rows", "quantizes_activations"]

# every type the registry has a dequantizer for (and F32): a type module is all it takes
SUPPORTED_TYPES = quant.weight_types()
_FLOAT_TYPES = {GGMLType.F32: np.float32, GGMLType.F16: np.float16, GGMLType.BF16: np.uint16}
FLOAT_GROUP = 32  # float weights are handled as virtual blocks of this many elements

# Float flags the products may carry: they change no finite result, so no CPU's optimiser
# can make them differ. Never "fast", "reassoc" or "contract" (see the module docstring).
FINITE = ("nnan", "ninf")
LANES = 8  # floats per vector accumulator: fixed, so AVX-512 sums the same partials as AVX2
L2_BUDGET = 256 << 10  # bytes of dequantized rows the prompt kernel keeps hot per thread
MAX_GROUP_ROWS = 30
TOKEN_CHUNK = 64  # tokens per prompt-kernel call: a multiple of TILE_TOKENS
TILE_TOKENS = 4  # tokens per register tile of the prompt kernel
GEMM_ROWS = 3  # rows per register tile of the prompt kernel (x TILE_TOKENS: 12 accumulators)
K_BLOCK = 768  # floats of each row the prompt kernel takes at a time (x tiles stay in L1)
K_BLOCK_F16 = 2048  # (F16 weights read in place: half the bytes a float)
Q_TILE = 8  # tokens per tile of the integer prompt kernel (one vector of scale products)
Q_TILE_K = 8  # (the K-quants: each super-block unpacked once)
Q_TILE_REST = 2  # tokens past the last whole tile that go one at a time (legacy types)
# work (in weight elements touched) below which one more thread costs more than it saves
MIN_WORK_PER_THREAD = 1 << 20
ROW_ALIGN = 8  # prompt products split their rows at multiples of this (the row tiles)
MIN_WORK_PER_PART = 1 << 16  # (decoding, where a hand-off to a team thread costs ~1 us)
# blocks of more vectors than this go through memory between dequantization and dot
BARRIER_MIN_CHUNKS = 8
FUSE = True
F16_DIRECT = True  # the prompt kernel reads F16 weights in place (see `_build_gemm`)
X_HALF = True  # (and packs x, rounded to F16, as F16)
FINITE_DEQUANT = True  # decode kernels: the finite-math flags on the dequantization ops
GEMV_ACCS = 4  # accumulators of the decode kernel: enough to cover the FMA latency
GEMV_TOKENS = (1, 4)  # decode kernel variants: 1 token, and up to 4 tokens in one pass
GEMV_ROWS = 1  # rows the decode kernel runs side by side (quantized weights)
GEMV_ROWS_FLOAT = 1  # (float weights: 4 accumulators each, see _build_gemv_vec_dot; two rows side
# by side were faster on one weight reused from cache, but 1.4x slower on weights streaming from
# memory, as decoding reads them: a 1536x576 F16 product over 212 MB of weights, 194 -> 137 us)


# -- the block each kernel walks -----------------------------------------------------------


@dataclass(frozen=True)
class _Blocks:
    size: int  # floats per block
    nbytes: int  # bytes per block
    emit: Callable[[ir.IRBuilder, ir.Value, ir.Value], None]  # (builder, i8* src, f32* dst)
    # float weights: 32 copies of a one-element IR, which SLP vectorises only when left as
    # plain scalar conversions and stores (no fusing, no half -> float rewrite)
    elementwise: bool = False


def _blocks(t: GGMLType) -> _Blocks:
    qt = quant.get(t)
    info = qt.info
    if info.block_size > 1:
        return _Blocks(info.block_size, info.type_size, qt.emit_dequantize_block)
    es, g = info.type_size, FLOAT_GROUP
    if t == GGMLType.F32:
        vt = ir.VectorType(f32, g)

        def emit(b, y, x):
            v = b.load(b.bitcast(y, ptr(vt)), align=4)
            b.store(v, b.bitcast(x, ptr(vt)), align=4)
    else:

        def emit(b, y, x):
            for i in range(g):
                qt.emit_dequantize_block(b, b.gep(y, [const(i32, i * es)]),
                                         b.gep(x, [const(i32, i)]))

    return _Blocks(g, g * es, emit, elementwise=True)


# -- IR --------------------------------------------------------------------------------------


def _hsum(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    n = v.type.count
    while n > 1:
        h = n // 2
        lo = b.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, h), list(range(h))))
        hi = b.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, h), list(range(h, n))))
        v = b.fadd(lo, hi, flags=FINITE)
        n = h
    return b.extract_element(v, const(i32, 0))


def _fma(b: ir.IRBuilder, acc: ir.Value, a: ir.Value, c: ir.Value) -> ir.Value:
    """acc + a * c with one rounding (`llvm.fma`): the same on every CPU with FMA."""
    suffix = f"v{a.type.count}f32" if isinstance(a.type, ir.VectorType) else "f32"
    return intrinsic(b, f"llvm.fma.{suffix}", a.type, [a, c, acc])


class _Accs:
    """Vector accumulators in entry-block stack slots (SROA turns them into registers)."""

    def __init__(self, b: ir.IRBuilder, vt: ir.VectorType, n: int):
        self.b, self.vt, self.n = b, vt, n
        self.slot = alloca_entry(b, vt, n, name="acc")

    def _at(self, i: int) -> ir.Value:
        return self.b.gep(self.slot, [const(i32, i)])

    def zero(self) -> None:
        for i in range(self.n):
            self.b.store(ir.Constant(self.vt, [0.0] * self.vt.count), self._at(i))

    def add_product(self, i: int, a: ir.Value, c: ir.Value) -> None:
        self.b.store(_fma(self.b, self.b.load(self._at(i)), a, c), self._at(i))

    def get(self, i: int) -> ir.Value:
        return self.b.load(self._at(i))

    def set(self, i: int, v: ir.Value) -> None:
        self.b.store(v, self._at(i))


def _vload(b: ir.IRBuilder, base: ir.Value, vt: ir.VectorType, index: ir.Value | int,
           align: int = 4) -> ir.Value:
    """The vector at `base` (f32*) + index * lanes."""
    if isinstance(index, int):
        index = const(i64, index)
    return b.load(b.gep(b.bitcast(base, ptr(vt)), [index]), align=align)


def _barrier(b: ir.IRBuilder, p: ir.Value) -> None:
    """An empty asm that may read memory at `p`: the stores before it stay stores, and the
    loads after it cannot be forwarded from them. Keeps a dequantized block in L1 instead of
    in (spilled) registers while it waits for its dot product."""
    asm = ir.InlineAsm(ir.FunctionType(void, [p.type]), "", "r,~{memory}", side_effect=True)
    b.call(asm, [p])


class _CannotFuse(Exception):
    """The dequantization IR uses its output buffer in a way `_Builder` cannot follow."""


def _float_lanes(t: ir.Type) -> int | None:
    """Floats in one element of pointee type `t` (float or a vector of floats), else None."""
    if t == f32:
        return 1
    if isinstance(t, ir.VectorType) and t.element == f32:
        return t.count
    return None


class _Builder(ir.IRBuilder):
    """The builder the dequantization IR is emitted through.

    - `intercept(base, on_store)`: while active, every store the IR makes through `base` (an
      f32* it was handed as its output) becomes `on_store(value, float_offset)` instead: the
      decode kernel folds each dequantized vector into the dot product the moment it is
      made, so the block never goes through memory. Pointers derived from `base` by
      bitcasts and constant GEPs are followed; anything else raises `_CannotFuse`.
    - Half -> float: on x86, LLVM loads a scalar fp16 with `vpinsrw` into whatever register
      it picks, a false dependency on that register's last writer; when that is an
      accumulator, every block waits for the previous block's FMA chain. Here a scalar half
      goes through a zero-extended vector (`vmovd`, a whole-register write) and a vector
      `vcvtph2ps`; an empty asm keeps LLVM from folding it back into the scalar form.
    """

    _tracked: dict | None = None
    _on_store = None
    fix_half = True
    fast = False  # the finite-math flags on the dequantization's float ops (`_fast_ops`)

    @contextmanager
    def intercept(self, base: ir.Value, on_store: Callable[[ir.Value, int], None]):
        self._tracked, self._on_store = {id(base): (base, 0)}, on_store
        try:
            yield
        finally:
            self._tracked = self._on_store = None

    def _offset(self, p: ir.Value) -> int | None:
        e = self._tracked.get(id(p)) if self._tracked is not None else None
        return e[1] if e is not None and e[0] is p else None

    def bitcast(self, value, typ, name=""):
        r = super().bitcast(value, typ, name)
        o = self._offset(value)
        if o is not None:
            if not isinstance(typ, ir.PointerType) or _float_lanes(typ.pointee) is None:
                raise _CannotFuse(f"bitcast to {typ}")
            self._tracked[id(r)] = (r, o)
        return r

    def gep(self, ptr_, indices, inbounds=False, name="", source_etype=None):
        r = super().gep(ptr_, indices, inbounds=inbounds, name=name, source_etype=source_etype)
        o = self._offset(ptr_)
        if o is not None:
            lanes = _float_lanes(source_etype or getattr(ptr_.type, "pointee", None))
            if lanes is None or len(indices) != 1 or not isinstance(indices[0], ir.Constant):
                raise _CannotFuse("gep")
            self._tracked[id(r)] = (r, o + int(indices[0].constant) * lanes)
        return r

    def store(self, value, ptr_, align=None):
        o = self._offset(ptr_)
        if o is None:
            return super().store(value, ptr_, align)
        self._on_store(value, o)
        return None

    def load(self, ptr_, name="", align=None, typ=None):
        if self._offset(ptr_) is not None:
            raise _CannotFuse("load from the output")
        return super().load(ptr_, name, align, typ)

    # The dequantization IR keeps ggml's exact float semantics (NaN kept); in the products'
    # kernels its ops may drop the NaN checks, which leaves every finite result as it is.
    def fmul(self, lhs, rhs, name="", flags=()):
        return super().fmul(lhs, rhs, name, flags=flags or self._fast_ops())

    def fadd(self, lhs, rhs, name="", flags=()):
        return super().fadd(lhs, rhs, name, flags=flags or self._fast_ops())

    def fsub(self, lhs, rhs, name="", flags=()):
        return super().fsub(lhs, rhs, name, flags=flags or self._fast_ops())

    def fcmp_unordered(self, cmpop, lhs, rhs, name="", flags=()):
        return super().fcmp_unordered(cmpop, lhs, rhs, name, flags=flags or self._fast_ops())

    def fcmp_ordered(self, cmpop, lhs, rhs, name="", flags=()):
        return super().fcmp_ordered(cmpop, lhs, rhs, name, flags=flags or self._fast_ops())

    def _fast_ops(self) -> tuple:
        return FINITE if self.fast else ()

    def fpext(self, value, typ, name=""):
        if not (self.fix_half and value.type == f16 and typ == f32 and _x86_f16c()):
            return super().fpext(value, typ, name)
        v4i = ir.VectorType(i32, 4)
        v = self.insert_element(ir.Constant(v4i, None), self.zext(self.bitcast(value, i16), i32),
                                const(i32, 0))
        v = self.call(ir.InlineAsm(ir.FunctionType(v4i, [v4i]), "", "=x,0"), [v])
        h = self.bitcast(v, ir.VectorType(f16, 8))
        h = self.shuffle_vector(h, h, ir.Constant(ir.VectorType(i32, 4), [0, 1, 2, 3]))
        return self.extract_element(self.fpext(h, ir.VectorType(f32, 4)), const(i32, 0),
                                    name=name)


@cache
def _x86_f16c() -> bool:
    return host_cpu().triple.startswith(("x86_64", "i686", "i386")) and host_cpu().has("f16c")


def _pieces(b: ir.IRBuilder, value: ir.Value, offset: int, vw: int):
    """A stored float vector as (offset, <vw x float>) pieces; _CannotFuse if it does not
    split into whole aligned pieces."""
    t = value.type
    n = t.count if isinstance(t, ir.VectorType) and t.element == f32 else 0
    if not n or n % vw or offset % vw:
        raise _CannotFuse(f"store of {t} at {offset}")
    if n == vw:
        return [(offset, value)]
    idx = lambda p: ir.Constant(ir.VectorType(i32, vw), list(range(p, p + vw)))  # noqa: E731
    return [(offset + p, b.shuffle_vector(value, value, idx(p))) for p in range(0, n, vw)]


def _can_fuse(blk: _Blocks, vw: int) -> bool:
    """Whether the block's dequantization IR writes each output float exactly once, in
    aligned vectors, through pointers `_Builder` can follow (tried on a scratch module)."""
    if blk.elementwise:
        return False
    m = ir.Module()
    fn = ir.Function(m, ir.FunctionType(void, [ptr(i8), ptr(f32)]), "probe")
    b = _Builder(fn.append_basic_block("entry"))
    seen = np.zeros(blk.size, np.int64)

    def on_store(value, offset):
        for o, _ in _pieces(b, value, offset, vw):
            if o + vw > blk.size:
                raise _CannotFuse("store past the block")
            seen[o:o + vw] += 1

    try:
        with b.intercept(fn.args[1], on_store):
            blk.emit(b, fn.args[0], fn.args[1])
    except _CannotFuse:
        return False
    return bool((seen == 1).all())


def _build_gemv(m: ir.Module, name: str, blk: _Blocks, vw: int, T: int) -> ir.Function:
    """gemv(w, w_stride, x, ldx, y, ldy, n_tok, r0, r1, n_blocks): y[t, r] = dot(W[r], x[t])
    for r in [r0, r1), t < n_tok <= T: each weight row is read and dequantized once for all
    the tokens (tokens past n_tok repeat the last one and are not stored).

    Fused (the usual case): the dequantized vectors of a block go straight into the
    accumulators as the IR makes them. Otherwise the block is dequantized into a stack
    buffer and dotted from there. `_gemv_rows(blk)` rows go side by side (more streams in
    flight, x loaded once for all of them), the remainder one by one."""
    vt = ir.VectorType(f32, vw)
    fn = _internal(m, name, [ptr(i8), i64, ptr(f32), i64, ptr(f32), i64, i64, i64, i64, i64])
    w, ws, x, ldx, y, ldy, ntok, r0, r1, nb = fn.args
    b = _Builder(fn.append_basic_block("entry"))
    b.fix_half = not blk.elementwise
    b.fast = FINITE_DEQUANT
    c64 = lambda v: const(i64, v)  # noqa: E731
    chunks = blk.size // vw
    fuse = FUSE and _can_fuse(blk, vw)
    rows = _gemv_rows(blk) if T == 1 else 1
    scratch_v = alloca_entry(b, vt, 1 if fuse else chunks * rows, name="scratch")
    scratch = b.bitcast(scratch_v, ptr(f32))
    per = max(1, GEMV_ACCS // (rows * T))  # accumulators per (row, token)
    accs = _Accs(b, vt, per * rows * T)
    last = b.sub(ntok, c64(1))
    tok = [c64(0)] + [b.select(b.icmp_signed("<", c64(t), ntok), c64(t), last)
                      for t in range(1, T)]
    xt = [b.gep(x, [b.mul(t, ldx)]) for t in tok]

    def acc(i, t, o):
        return (i * T + t) * per + o // vw % per

    def row_loop(start, stop, R):
        with for_range(b, start, stop, step=R, name=f"r{R}") as r:
            accs.zero()
            row = [b.gep(w, [b.mul(b.add(r, c64(i)), ws)]) for i in range(R)]
            with for_range(b, c64(0), nb, name=f"blk{R}") as k:
                xb = [b.gep(p, [b.mul(k, c64(blk.size))]) for p in xt]
                xs = {}

                def xload(t, o):  # x[t] at float offset o of the block, loaded once
                    if (t, o) not in xs:
                        xs[t, o] = b.load(b.bitcast(b.gep(xb[t], [c64(o)]), ptr(vt)), align=4)
                    return xs[t, o]

                for i in range(R):
                    src = b.gep(row[i], [b.mul(k, c64(blk.nbytes))])
                    if fuse:

                        def on_store(value, offset, i=i):
                            for o, v in _pieces(b, value, offset, vw):
                                for t in range(T):
                                    accs.add_product(acc(i, t, o), v, xload(t, o))

                        with b.intercept(scratch, on_store):
                            blk.emit(b, src, scratch)
                        continue
                    out = b.gep(scratch, [c64(i * blk.size)])
                    blk.emit(b, src, out)
                    if chunks > BARRIER_MIN_CHUNKS:
                        _barrier(b, out)
                    for c in range(chunks):
                        v = _vload(b, out, vt, c, align=vw * 4)
                        for t in range(T):
                            accs.add_product(acc(i, t, c * vw), v, xload(t, c * vw))
            for i in range(R):
                for t in range(T):
                    total = accs.get(acc(i, t, 0))
                    for a in range(1, per):
                        total = b.fadd(total, accs.get(acc(i, t, 0) + a), flags=FINITE)
                    dst = b.gep(y, [b.add(b.mul(c64(t), ldy), b.add(r, c64(i)))])
                    if t == 0:
                        b.store(_hsum(b, total), dst)
                    else:
                        with b.if_then(b.icmp_signed("<", c64(t), ntok)):
                            b.store(_hsum(b, total), dst)

    if rows > 1:
        tiled = b.add(r0, b.mul(b.sdiv(b.sub(r1, r0), c64(rows)), c64(rows)))
        row_loop(r0, tiled, rows)
        r0 = tiled
    row_loop(r0, r1, 1)
    b.ret_void()
    return fn


def _hsum_hadd(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """The 8 lanes of v summed as ggml's AVX reduction does it: halves added, then
    neighbours (two `hadd`s): (s0 + s1) + (s2 + s3) of s = lo + hi."""
    h = ir.VectorType(i32, 4)
    s = b.fadd(b.shuffle_vector(v, v, ir.Constant(h, [0, 1, 2, 3])),
               b.shuffle_vector(v, v, ir.Constant(h, [4, 5, 6, 7])), flags=FINITE)
    e = [b.extract_element(s, const(i32, i)) for i in range(4)]
    return b.fadd(b.fadd(e[0], e[1], flags=FINITE), b.fadd(e[2], e[3], flags=FINITE),
                  flags=FINITE)


VEC_DOT_ACCS = 4  # ggml's vec_dot_f16/bf16/f32 (AVX2): 4 accumulators, every 4th vector


def _vec_dot_order(t: GGMLType) -> bool:
    """Whether the one-token kernel over `t` sums as ggml's vec_dot does (float weights)."""
    return t in _FLOAT_TYPES and LANES == 8


def _build_gemv_vec_dot(m: ir.Module, name: str, t: GGMLType, vw: int) -> ir.Function:
    """gemv(w, w_stride, x, ldx, y, ldy, n_tok, r0, r1, n_blocks) over float weights (F16,
    BF16, F32; n_blocks of FLOAT_GROUP floats) for each of n_tok tokens, summed as ggml's
    `ggml_vec_dot_<t>` sums on x86 AVX2 (where llama.cpp's CPU backend takes one token, or
    weights of a row count tinyBLAS does not tile): VEC_DOT_ACCS accumulators, the j-th
    taking vectors j, j + 4, ..., combined (0 + 2) + (1 + 3), then across lanes (F16, F32:
    two `hadd`s; BF16: halves, as `_hsum`). BF16 multiplies and adds in two roundings.
    The weights are read as vectors (vcvtph2ps for F16), GEMV_ROWS_FLOAT rows side by side."""
    assert vw == 8 and FLOAT_GROUP == vw * VEC_DOT_ACCS
    vt = ir.VectorType(f32, vw)
    fn = _internal(m, name, [ptr(i8), i64, ptr(f32), i64, ptr(f32), i64, i64, i64, i64, i64])
    w, ws, x, ldx, y, ldy, ntok, r0, r1, nb = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    c64 = lambda v: const(i64, v)  # noqa: E731
    A = VEC_DOT_ACCS
    accs = _Accs(b, vt, A * GEMV_ROWS_FLOAT)

    def wload(row, k):
        if t == GGMLType.F32:
            return b.load(b.gep(b.bitcast(row, ptr(vt)), [k]), align=4)
        if t == GGMLType.F16:
            h = b.load(b.gep(b.bitcast(row, ptr(ir.VectorType(f16, vw))), [k]), align=2)
            return b.fpext(h, vt)
        u = b.load(b.gep(b.bitcast(row, ptr(ir.VectorType(i16, vw))), [k]), align=2)
        u = b.shl(b.zext(u, ir.VectorType(i32, vw)), splat(b, const(i32, 16), vw))
        return b.bitcast(u, vt)

    def row_loop(xt, yt, start, stop, R):
        with for_range(b, start, stop, step=R, name=f"r{R}") as r:
            accs.zero()
            rows = [b.gep(w, [b.mul(b.add(r, c64(i)), ws)]) for i in range(R)]
            with for_range(b, c64(0), nb, name=f"k{R}") as k:
                for a in range(A):
                    kv = b.add(b.mul(k, c64(A)), c64(a))
                    xv = b.load(b.gep(xt, [kv]), align=4)
                    for i in range(R):
                        wv = wload(rows[i], kv)
                        if t == GGMLType.BF16:
                            s = b.fadd(b.fmul(wv, xv, flags=FINITE), accs.get(i * A + a),
                                       flags=FINITE)
                            accs.set(i * A + a, s)
                        else:
                            accs.add_product(i * A + a, wv, xv)
            for i in range(R):
                g = [accs.get(i * A + a) for a in range(A)]
                s = b.fadd(b.fadd(g[0], g[2], flags=FINITE), b.fadd(g[1], g[3], flags=FINITE),
                           flags=FINITE)
                total = _hsum(b, s) if t == GGMLType.BF16 else _hsum_hadd(b, s)
                b.store(total, b.gep(yt, [b.add(r, c64(i))]))

    with for_range(b, c64(0), ntok, name="tok") as tk:
        xt = b.bitcast(b.gep(x, [b.mul(tk, ldx)]), ptr(vt))
        yt = b.gep(y, [b.mul(tk, ldy)])
        R = GEMV_ROWS_FLOAT
        tiled = b.add(r0, b.mul(b.sdiv(b.sub(r1, r0), c64(R)), c64(R)))
        row_loop(xt, yt, r0, tiled, R)
        row_loop(xt, yt, tiled, r1, 1)
    b.ret_void()
    return fn


# -- integer dot products (decoding on x86 AVX2) ---------------------------------------------
#
# As llama.cpp does: x is rounded to Q8_0 (groups of 32: d = max|x| / 127 as fp16, q = round(x
# / d)) once per product, and each weight block is read as groups of 32 small integers with a
# float scale a and offset c (w = a * q + c). A group's dot is then one vpmaddubsw + vpmaddwd
# on the integers and one float FMA: a * dx * sum(q * qx) + c * dx * sum(qx), about a quarter
# of the instructions of dequantizing to floats. The levels and scales come from the same
# emitters as the types' dequantizers. The K-quants (x rounded to Q8_K) go as ggml's AVX2
# `vec_dot_<t>_q8_K` goes instead, and give its bits: integer sub-scales, one conversion a
# super-block of 256 (`IntSuperBlock`, `_build_gemmq_k`); from 8 tokens on, in the order of
# the tiled kernel llama.cpp runs there instead (`_prompt_order`): the same integer sums.

Q8_GROUP = 32
QK_K = 256  # Q8_K's block
INT_DOT = True  # decode with integer dot products where the type and the host allow it
_V32I8 = ir.VectorType(i8, 32)


def _int_groups(t: GGMLType) -> Callable | None:
    """The integer view of a block of type t (its module's `emit_int_groups`: builder, i8*
    block -> `IntGroup`s in order), or None where the decode kernel dequantizes to floats."""
    x86 = host_cpu().triple.startswith("x86_64")
    qt = quant.get(t)
    if not (INT_DOT and x86 and host_cpu().has("avx2") and qt.int_dot):
        return None
    return qt.emit_int_superblock if qt.int_superblock else qt.emit_int_groups


def _q_tile(t: GGMLType) -> int:
    """Tokens per tile of the integer prompt kernel for weight type t."""
    return Q_TILE_K if quant.get(t).int_superblock else Q_TILE


def _group_dot(b: ir.IRBuilder, g: quant.IntGroup, xq: ir.Value) -> ir.Value:
    """sum(q * xq) of one group, as 8 i32 lanes."""
    v16 = ir.VectorType(i16, 16)
    if g.signed:  # vpmaddubsw takes unsigned x signed: move w's sign onto x
        u = intrinsic(b, "llvm.abs.v32i8", _V32I8, [g.q, ir.Constant(ir.IntType(1), 0)])
        s = intrinsic(b, "llvm.x86.avx2.psign.b", _V32I8, [xq, g.q])
    else:
        u, s = g.q, xq
    pairs = intrinsic(b, "llvm.x86.avx2.pmadd.ub.sw", v16, [u, s])
    halves = g.halves if g.halves is not None else ir.Constant(v16, [1] * 16)
    return intrinsic(b, "llvm.x86.avx2.pmadd.wd", ir.VectorType(i32, 8), [pairs, halves])


def _build_gemmq(m: ir.Module, name: str, blk: _Blocks, groups: Callable,
                 T: int) -> ir.Function:
    """gemmq(w, w_stride, xq, ldq, y, ldy, t0, t1, r0, r1, n_blocks, group_rows):
    y[t, r] = dot(W[r], x[t]) for t in [t0, t1) and r in [r0, r1), on integer dot products.
    x is given as `round_q8` writes it, one token every `ldq` bytes: n_in i8 levels, then per
    group of 32 its scale dx (f32) and its offset term xs (f32). Rows go in blocks of
    `group_rows` (kept in cache across the token tiles). Every (row, token) sums its groups
    in the same order whatever T, so decoding (T = 1) and a prompt give the same bits.
    T = 1 is the one-token kernel (see `_build_gemmq_one`); for T > 1 see `_build_gemmq_tile`
    (any token count: a short last tile repeats its last token)."""
    if T == 1:
        return _build_gemmq_one(m, name, blk, groups)
    return _build_gemmq_tile(m, name, blk, groups, T)


def _gemmq_fn(m: ir.Module, name: str) -> ir.Function:
    return _internal(m, name, [ptr(i8), i64, ptr(i8), i64, ptr(f32), i64, i64, i64, i64, i64,
                               i64, i64])


def _build_gemmq_one(m: ir.Module, name: str, blk: _Blocks, groups: Callable) -> ir.Function:
    """The one-token gemmq (t1 - t0 tokens, each alone): each weight group unpacked, dotted
    and scaled for the token, the scale product and the offset term as scalars."""
    T = 1
    vt = ir.VectorType(f32, 8)
    fn = _gemmq_fn(m, name)
    w, ws, xq, ldq, y, ldy, t0, t1, r0, r1, nb, group = fn.args
    b = _Builder(fn.append_basic_block("entry"))
    c64 = lambda v: const(i64, v)  # noqa: E731
    gpb = blk.size // Q8_GROUP
    n_in, n_groups = b.mul(nb, c64(blk.size)), b.mul(nb, c64(gpb))
    accs = _Accs(b, vt, 2 * T)
    offs = alloca_entry(b, f32, T, name="off")
    off = [b.gep(offs, [const(i32, j)]) for j in range(T)]
    with for_range(b, r0, r1, step=group, name="rb") as g0:
        end = b.add(g0, group)
        g1 = b.select(b.icmp_signed("<", end, r1), end, r1)
        with for_range(b, t0, t1, step=T, name="t") as t:
            xr = [b.gep(xq, [b.mul(b.add(t, c64(j)), ldq)]) for j in range(T)]
            xd = [b.bitcast(b.gep(r, [n_in]), ptr(f32)) for r in xr]
            xs = [b.gep(d, [n_groups]) for d in xd]
            with for_range(b, g0, g1, name="r") as r:
                accs.zero()
                for p in off:
                    b.store(const(f32, 0.0), p)
                row = b.gep(w, [b.mul(r, ws)])
                with for_range(b, c64(0), nb, name="blk") as k:
                    src = b.gep(row, [b.mul(k, c64(blk.nbytes))])
                    for i, g in enumerate(groups(b, src)):
                        gi = b.add(b.mul(k, c64(gpb)), c64(i))
                        for j in range(T):
                            xg = b.load(b.bitcast(b.gep(xr[j], [b.mul(gi, c64(Q8_GROUP))]),
                                                  ptr(_V32I8)), align=1)
                            isum = b.sitofp(_group_dot(b, g, xg), vt)
                            scale = b.fmul(g.scale, b.load(b.gep(xd[j], [gi])), flags=FINITE)
                            accs.add_product(2 * j + i % 2, isum, splat(b, scale, 8))
                            if g.offset is not None:
                                b.store(_fma(b, b.load(off[j]), g.offset,
                                             b.load(b.gep(xs[j], [gi]))), off[j])
                for j in range(T):
                    total = b.fadd(accs.get(2 * j), accs.get(2 * j + 1), flags=FINITE)
                    b.store(b.fadd(_hsum(b, total), b.load(off[j]), flags=FINITE),
                            b.gep(y, [b.add(b.mul(b.add(t, c64(j)), ldy), r)]))
    b.ret_void()
    return fn


def _build_gemvq_pairs(m: ir.Module, name: str, blk: _Blocks, groups: Callable) -> ir.Function:
    """`_build_gemmq` for one token at a time (same arguments) in the order of ggml's AVX2
    `vec_dot_iq4_nl_q8_0` (a block of one group): even blocks into one 8-lane float sum, odd
    ones into another (acc = fma(d * dx, float(levels . x), acc)), the two added and summed
    as `hsum_float_8`; an odd last block is added on as a scalar, d * dx * its integer sum
    (fused: ggml's C compiles `sumf += d * sumi` to one fma)."""
    vt = ir.VectorType(f32, 8)
    fn = _internal(m, name, [ptr(i8), i64, ptr(i8), i64, ptr(f32), i64, i64, i64, i64, i64,
                             i64, i64])
    w, ws, xq, ldq, y, ldy, t0, t1, r0, r1, nb, _ = fn.args
    b = _Builder(fn.append_basic_block("entry"))
    c64 = lambda v: const(i64, v)  # noqa: E731
    n_in = b.mul(nb, c64(blk.size))
    pairs = b.sdiv(nb, c64(2))
    accs = _Accs(b, vt, 2)

    def block(row, xr, xd, k):
        g = groups(b, b.gep(row, [b.mul(k, c64(blk.nbytes))]))[0]
        xg = b.load(b.bitcast(b.gep(xr, [b.mul(k, c64(Q8_GROUP))]), ptr(_V32I8)), align=1)
        return _group_dot(b, g, xg), b.fmul(g.scale, b.load(b.gep(xd, [k])), flags=FINITE)

    with for_range(b, t0, t1, name="t") as t:
        xr = b.gep(xq, [b.mul(t, ldq)])
        xd = b.bitcast(b.gep(xr, [n_in]), ptr(f32))
        with for_range(b, r0, r1, name="r") as r:
            accs.zero()
            row = b.gep(w, [b.mul(r, ws)])
            with for_range(b, c64(0), pairs, name="pair") as k2:
                for i in range(2):
                    isum, d = block(row, xr, xd, b.add(b.mul(k2, c64(2)), c64(i)))
                    accs.add_product(i, splat(b, d, 8), b.sitofp(isum, vt))
            total = _hsum(b, b.fadd(accs.get(0), accs.get(1), flags=FINITE))
            out = b.gep(y, [b.add(b.mul(t, ldy), r)])
            b.store(total, out)
            with b.if_then(b.icmp_signed("!=", b.mul(pairs, c64(2)), nb)):
                isum, d = block(row, xr, xd, b.sub(nb, c64(1)))
                tail = intrinsic(b, "llvm.vector.reduce.add.v8i32", i32, [isum])
                b.store(_fma(b, total, d, b.sitofp(tail, f32)), out)
    b.ret_void()
    return fn


def _has_offsets(groups: Callable) -> bool:
    """Whether the type's integer groups carry an offset term (w = d * q + m)."""
    fn = ir.Function(ir.Module(), ir.FunctionType(void, [ptr(i8)]), "probe")
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    return any(g.offset is not None for g in groups(b, fn.args[0]))


def _build_gemmq_tile(m: ir.Module, name: str, blk: _Blocks, groups: Callable,
                      T: int) -> ir.Function:
    """The prompt gemmq: tiles of T tokens (T floats, one vector of scale products), per row
    of the tile in two passes over its blocks, so that each (row, token, group) costs only
    its integer dot, its conversion and its FMA:
    - the tile's tokens are first packed group-major: per group, the T tokens' 32 levels,
      then their T scales dx (and T offset terms xs);
    - pass 1: each group's scale times the T tokens' dx, one vector product, into a table
      (and the offsets' T FMAs, one vector FMA);
    - pass 2: each group unpacked once for the T tokens; per token its integer dot product,
      converted and FMA'd with its scale product broadcast from the table.
    The scalars are the ones the one-token kernel computes (the same products and FMAs, in
    the same order, lane by lane), so the bits are its bits."""
    vt = ir.VectorType(f32, 8)
    tv = ir.VectorType(f32, T)
    fn = _gemmq_fn(m, name)
    w, ws, xq, ldq, y, ldy, t0, t1, r0, r1, nb, group = fn.args
    b = _Builder(fn.append_basic_block("entry"))
    c64 = lambda v: const(i64, v)  # noqa: E731
    gpb = blk.size // Q8_GROUP
    offsets = _has_offsets(groups)
    n_in, n_groups = b.mul(nb, c64(blk.size)), b.mul(nb, c64(gpb))
    # packed tile: per group T x 32 levels, T dx, (T xs); bytes
    gstride = T * Q8_GROUP + 4 * T * (2 if offsets else 1)
    xt = b.alloca(i8, size=b.mul(n_groups, c64(gstride)), name="xt")
    prod = b.bitcast(b.alloca(tv, size=n_groups, name="prod"), ptr(f32))
    accs = _Accs(b, vt, 2 * T)
    offv = alloca_entry(b, tv, name="offv")
    last = b.sub(t1, c64(1))
    zero_t = ir.Constant(tv, [0.0] * T)

    def at(gi, byte):  # a byte of group gi's packed tile
        return b.gep(xt, [b.add(b.mul(gi, c64(gstride)), c64(byte))])

    with for_range(b, r0, r1, step=group, name="rb") as g0:
        end = b.add(g0, group)
        g1 = b.select(b.icmp_signed("<", end, r1), end, r1)
        with for_range(b, t0, t1, step=T, name="t") as t:
            toks = [b.select(b.icmp_signed("<", b.add(t, c64(j)), t1), b.add(t, c64(j)), last)
                    for j in range(T)]
            xr = [b.gep(xq, [b.mul(tj, ldq)]) for tj in toks]
            xd = [b.bitcast(b.gep(r, [n_in]), ptr(f32)) for r in xr]
            xs = [b.gep(d, [n_groups]) for d in xd]
            with for_range(b, c64(0), n_groups, name="pk") as gi:
                for j in range(T):
                    src = b.gep(xr[j], [b.mul(gi, c64(Q8_GROUP))])
                    v = b.load(b.bitcast(src, ptr(_V32I8)), align=1)
                    b.store(v, b.bitcast(at(gi, j * Q8_GROUP), ptr(_V32I8)), align=1)
                    b.store(b.load(b.gep(xd[j], [gi])),
                            b.bitcast(at(gi, T * Q8_GROUP + 4 * j), ptr(f32)))
                    if offsets:
                        b.store(b.load(b.gep(xs[j], [gi])),
                                b.bitcast(at(gi, T * Q8_GROUP + 4 * (T + j)), ptr(f32)))
            with for_range(b, g0, g1, name="r") as r:
                row = b.gep(w, [b.mul(r, ws)])
                b.store(zero_t, offv)
                with for_range(b, c64(0), nb, name="sc") as k:
                    src = b.gep(row, [b.mul(k, c64(blk.nbytes))])
                    for i, g in enumerate(groups(b, src)):
                        gi = b.add(b.mul(k, c64(gpb)), c64(i))
                        dx = b.load(b.bitcast(at(gi, T * Q8_GROUP), ptr(tv)), align=4)
                        sc = b.fmul(splat(b, g.scale, T), dx, flags=FINITE)
                        b.store(sc, b.gep(b.bitcast(prod, ptr(tv)), [gi]), align=4)
                        if g.offset is not None:
                            xsv = b.load(b.bitcast(at(gi, T * Q8_GROUP + 4 * T), ptr(tv)),
                                         align=4)
                            b.store(_fma(b, b.load(offv), splat(b, g.offset, T), xsv), offv)
                accs.zero()
                with for_range(b, c64(0), nb, name="blk") as k:
                    src = b.gep(row, [b.mul(k, c64(blk.nbytes))])
                    for i, g in enumerate(groups(b, src)):
                        gi = b.add(b.mul(k, c64(gpb)), c64(i))
                        for j in range(T):
                            xg = b.load(b.bitcast(at(gi, j * Q8_GROUP), ptr(_V32I8)), align=1)
                            isum = b.sitofp(_group_dot(b, g, xg), vt)
                            sc = b.load(b.gep(prod, [b.add(b.mul(gi, c64(T)), c64(j))]))
                            accs.add_product(2 * j + i % 2, isum, splat(b, sc, 8))
                ov = b.load(offv)
                for j in range(T):
                    total = b.fadd(accs.get(2 * j), accs.get(2 * j + 1), flags=FINITE)
                    yv = _hsum(b, total)
                    if offsets:
                        yv = b.fadd(yv, b.extract_element(ov, const(i32, j)), flags=FINITE)
                    else:
                        yv = b.fadd(yv, const(f32, 0.0), flags=FINITE)
                    b.store(yv, b.gep(y, [b.add(b.mul(toks[j], ldy), r)]))
    b.ret_void()
    return fn


def _maddubs(b: ir.IRBuilder, u: ir.Value, s: ir.Value) -> ir.Value:
    """vpmaddubsw: unsigned <32 x i8> x signed <32 x i8> -> <16 x i16>, pairs summed."""
    return intrinsic(b, "llvm.x86.avx2.pmadd.ub.sw", ir.VectorType(i16, 16), [u, s])


def _madd(b: ir.IRBuilder, a: ir.Value, c: ir.Value) -> ir.Value:
    """vpmaddwd: <2n x i16> x <2n x i16> -> <n x i32>, adjacent products summed (n = 8, 4)."""
    if a.type.count == 8:
        return intrinsic(b, "llvm.x86.sse2.pmadd.wd", ir.VectorType(i32, 4), [a, c])
    return intrinsic(b, "llvm.x86.avx2.pmadd.wd", ir.VectorType(i32, 8), [a, c])


def _build_bsums(b: ir.IRBuilder, xr: ir.Value, nb: ir.Value, dst: ir.Value, n: int) -> None:
    """Q8_K's `bsums` of one token, as the type's mins take them: the sums of each 16 (n =
    16) or 32 (n = 8) levels of its xq row `xr`, one <n x i16> per super-block at `dst`."""
    c64 = lambda v: const(i64, v)  # noqa: E731
    size = QK_K // n
    vin, vs = ir.VectorType(i8, size), ir.VectorType(i16, size)
    with for_range(b, c64(0), nb, name="bs") as k:
        sums = ir.Constant(ir.VectorType(i16, n), None)
        for h in range(n):
            q = b.load(b.bitcast(b.gep(xr, [b.add(b.mul(k, c64(QK_K)), c64(size * h))]),
                                 ptr(vin)), align=1)
            s = intrinsic(b, f"llvm.vector.reduce.add.v{size}i16", i16, [b.sext(q, vs)])
            sums = b.insert_element(sums, s, const(i32, h))
        b.store(sums, b.gep(dst, [k]), align=2)


def _superblock_facts(emit: Callable) -> tuple[int, bool, bool]:
    """(lanes of the mins' factors: 16, 8 or 0 for none, whether the levels are signed and
    go against x + 128, whether it has a second sum `group2`) of a K-quant's integer view,
    from emitting it once into a scratch function."""
    m = ir.Module()
    fn = ir.Function(m, ir.FunctionType(void, [ptr(i8)]), "probe")
    sb = emit(ir.IRBuilder(fn.append_basic_block("entry")), fn.args[0])
    # levels of up to 127 in magnitude (IQ4_XS) overflow vpmaddubsw on x + 128: they take
    # their signs onto x instead (`_group_dot`), as ggml does for them
    bias = sb.group(0).signed and not getattr(emit.__self__, "int_signs_on_x", False)
    return (sb.mins.type.count if sb.mins is not None else 0), bias, sb.group2 is not None


def _build_gemmq_k(m: ir.Module, name: str, blk: _Blocks, emit: Callable,
                   T: int, tiled: bool = False) -> ir.Function:
    """`_build_gemmq` for the K-quants (same arguments), as ggml's AVX2 `vec_dot_<t>_q8_K`
    computes each dot product: per super-block of 256, the groups' vpmaddubsw products
    times their integer sub-scales (vpmaddwd) summed in 8 i32 lanes, converted once and
    multiplied by d * dx into 8 float lanes; the mins through Q8_K's sums of 16 (computed
    here once per token tile); the lanes summed as ggml's `hsum_float_8`. Integer sums are
    exact, so the same lanes give ggml's bits; each weight super-block is unpacked once for
    T tokens.

    `tiled`: the float order of ggml's tiled kernel instead (`ggml-cpu/tiled/`, AVX2; what
    llama.cpp runs for 8 tokens or more): per super-block the integer sums s1 = sum of
    sub-scale * (levels . x) and, where the type has mins, s2 = sum of min * (x's sums),
    then res = d * float(s1), less dmin * float(s2) in one FMA, and acc = fma(res, dx, acc)
    in super-block order: one float lane a token, the T tokens side by side."""
    vt, v4 = ir.VectorType(f32, 8), ir.VectorType(f32, 4)
    v8i = ir.VectorType(i32, 8)
    fn = _internal(m, name, [ptr(i8), i64, ptr(i8), i64, ptr(f32), i64, i64, i64, i64, i64,
                             i64, i64])
    w, ws, xq, ldq, y, ldy, t0, t1, r0, r1, nb, group = fn.args
    b = _Builder(fn.append_basic_block("entry"))
    c64 = lambda v: const(i64, v)  # noqa: E731
    n_in = b.mul(nb, c64(QK_K))
    n_mins, signed, two = _superblock_facts(emit)
    two = two and not tiled  # (the tiled kernel folds the delta into the levels)
    # signed levels (Q3_K) take x + 128 as vpmaddubsw's unsigned side, and the lanes lose
    # 128 * (their scaled levels) again once a super-block: exact, one op a group less
    xb = b.alloca(_V32I8, size=b.mul(nb, c64(T * QK_K // Q8_GROUP)), name="xb")
    bias = ir.Constant(_V32I8, [-128] * 32)
    vsums = ir.VectorType(i16, max(n_mins, 8))
    bsums = b.alloca(vsums, size=b.mul(nb, c64(T)), name="bsums")
    accs, accm = _Accs(b, vt, T), _Accs(b, v4, T)
    acc2 = _Accs(b, vt, T if two else 1)  # (IQ1_M) the second sum's float lanes
    summs = alloca_entry(b, f32, T, name="summs")
    vtt = ir.VectorType(f32, T)
    acct = _Accs(b, vtt, 1)  # (tiled) the T tokens' sums of one row
    dxs = b.alloca(vtt, size=nb, name="dxs")  # (tiled) per super-block, the T tokens' dx
    zero8 = ir.Constant(v8i, [0] * 8)
    with for_range(b, r0, r1, step=group, name="rb") as g0:
        end = b.add(g0, group)
        g1 = b.select(b.icmp_signed("<", end, r1), end, r1)
        with for_range(b, t0, t1, step=T, name="t") as t:
            xr = [b.gep(xq, [b.mul(b.add(t, c64(j)), ldq)]) for j in range(T)]
            xd = [b.bitcast(b.gep(r, [n_in]), ptr(f32)) for r in xr]
            bs = [b.gep(bsums, [b.mul(nb, c64(j))]) for j in range(T)]
            for j in range(T if n_mins else 0):
                _build_bsums(b, xr[j], nb, bs[j], n_mins)
            if tiled:
                with for_range(b, c64(0), nb, name="dx") as k:
                    v = ir.Constant(vtt, None)
                    for j in range(T):
                        dx = b.load(b.gep(xd[j], [b.mul(k, c64(QK_K // Q8_GROUP))]))
                        v = b.insert_element(v, dx, const(i32, j))
                    b.store(v, b.gep(dxs, [k]))
            xbj = [b.gep(xb, [b.mul(nb, c64(j * QK_K // Q8_GROUP))]) for j in range(T)]
            for j in range(T if signed else 0):
                with for_range(b, c64(0), b.mul(nb, c64(QK_K // Q8_GROUP)), name="xb") as gi:
                    v = b.load(b.bitcast(b.gep(xr[j], [b.mul(gi, c64(Q8_GROUP))]), ptr(_V32I8)),
                               align=1)
                    b.store(b.xor(v, bias), b.gep(xbj[j], [gi]), align=32)
            with for_range(b, g0, g1, name="r") as r:
                accs.zero()
                accm.zero()
                acc2.zero()
                acct.zero()
                for j in range(T):
                    b.store(const(f32, 0.0), b.gep(summs, [const(i32, j)]))
                row = b.gep(w, [b.mul(r, ws)])
                with for_range(b, c64(0), nb, name="blk") as k:
                    sb = emit(b, b.gep(row, [b.mul(k, c64(blk.nbytes))]))
                    if sb.dmin is not None and not tiled:  # -dx * dmin as dx * -dmin
                        neg_dmin = b.fmul(sb.dmin, const(f32, -1.0), flags=FINITE)
                    xk = [b.gep(x, [b.mul(k, c64(QK_K))]) for x in xr]
                    sumi = [zero8] * T
                    sumi2 = [zero8] * T
                    corr = zero8
                    for gi in range(QK_K // Q8_GROUP):
                        if two:  # (x as it is: the second sum's signs go onto x)
                            g2 = sb.group2(gi)
                            for j in range(T):
                                xg = b.load(b.bitcast(b.gep(xk[j], [c64(Q8_GROUP * gi)]),
                                                      ptr(_V32I8)), align=1)
                                sumi2[j] = b.add(sumi2[j], _group_dot(b, g2, xg))
                        g = sb.group(gi)
                        if signed:
                            corr = b.add(corr, _madd(b, _maddubs(b, bias, g.q), g.halves))
                        for j in range(T):
                            if signed:
                                xg = b.load(b.gep(xbj[j], [b.add(b.mul(k, c64(8)), c64(gi))]),
                                            align=32)
                                dot = _madd(b, _maddubs(b, xg, g.q), g.halves)
                            else:
                                xg = b.load(b.bitcast(b.gep(xk[j], [c64(Q8_GROUP * gi)]),
                                                      ptr(_V32I8)), align=1)
                                dot = _group_dot(b, g, xg)
                            sumi[j] = b.add(sumi[j], dot)
                    if signed and not tiled:  # (tiled: once, off the tokens' totals)
                        sumi = [b.sub(v, corr) for v in sumi]
                    prods = []  # (tiled) the mins' integer lanes of each token
                    for j in range(T):
                        dx = b.load(b.gep(xd[j], [b.mul(k, c64(QK_K // Q8_GROUP))]))
                        if sb.mins is not None:
                            prod = _madd(b, sb.mins, b.load(b.gep(bs[j], [k]), align=2))
                            if sb.fold == "sub":
                                sumi[j] = b.sub(sumi[j], prod)
                            elif tiled:
                                prods.append(prod)
                            else:
                                dm = b.fmul(dx, neg_dmin, flags=FINITE)
                                _fold_mins(b, sb.fold, prod, dm, accs, accm, summs, j)
                        if not tiled:
                            d = b.fmul(dx, sb.d, flags=FINITE)
                            accs.add_product(j, splat(b, d, 8), b.sitofp(sumi[j], vt))
                            if two:
                                acc2.add_product(j, splat(b, d, 8), b.sitofp(sumi2[j], vt))
                    if tiled:
                        _tiled_superblock(b, sb, sumi, prods, b.load(b.gep(dxs, [k])), acct,
                                          corr if signed else None)
                if tiled:
                    tot = acct.get(0)
                    for j in range(T):
                        b.store(b.extract_element(tot, const(i32, j)),
                                b.gep(y, [b.add(b.mul(b.add(t, c64(j)), ldy), r)]))
                for j in range(T if not tiled else 0):
                    total = _hsum(b, accs.get(j))
                    if sb.fold == "acc4":
                        total = b.fadd(total, _hsum(b, accm.get(j)), flags=FINITE)
                    elif sb.fold == "scalar":
                        total = b.fadd(total, b.load(b.gep(summs, [const(i32, j)])),
                                       flags=FINITE)
                    if two:  # (ggml: total + delta * total2; the delta 1/8 makes it exact)
                        total = _fma(b, total, const(f32, sb.factor2), _hsum(b, acc2.get(j)))
                    b.store(total, b.gep(y, [b.add(b.mul(b.add(t, c64(j)), ldy), r)]))
    b.ret_void()
    return fn


def _tiled_superblock(b: ir.IRBuilder, sb, sumi: list, prods: list, dx: ir.Value,
                      acc: _Accs, corr: ir.Value | None = None) -> None:
    """One super-block of the tiled order for T tokens (a lane each): `sumi` the tokens'
    integer lanes of sub-scale * (levels . x) (less the lanes `corr`, the same for every
    token, where given), `prods` those of min * (x's sums) (empty without mins), `dx` the
    tokens' Q8_K scales. res = d * float(s1), then res - dmin * float(s2) rounded once
    (ggml's fnmadd), then acc = fma(res, dx, acc)."""
    vt = dx.type
    s1 = _lane_totals(b, sumi)
    if corr is not None:
        total = intrinsic(b, f"llvm.vector.reduce.add.v{corr.type.count}i32", i32, [corr])
        s1 = b.sub(s1, splat(b, total, vt.count))
    res = b.fmul(splat(b, sb.d, vt.count), b.sitofp(s1, vt), flags=FINITE)
    if prods:
        neg_dmin = b.fmul(sb.dmin, const(f32, -1.0), flags=FINITE)  # exact
        res = _fma(b, res, splat(b, neg_dmin, vt.count), b.sitofp(_lane_totals(b, prods), vt))
    acc.add_product(0, res, dx)


def _lane_totals(b: ir.IRBuilder, vs: list) -> ir.Value:
    """<len(vs) x i32>: lane j the sum of the i32 lanes of vs[j] (exact in any order). Eight
    vectors of 8 or 4 lanes go through vphaddd, ggml's own transposing sum; others reduce."""
    n, lanes = len(vs), vs[0].type.count
    if n == 8 and lanes in (4, 8):
        hadd = (lambda a, c: intrinsic(b, "llvm.x86.avx2.phadd.d", a.type, [a, c])) \
            if lanes == 8 else \
            (lambda a, c: intrinsic(b, "llvm.x86.ssse3.phadd.d.128", a.type, [a, c]))
        t = [hadd(vs[2 * i], vs[2 * i + 1]) for i in range(4)]
        u0, u1 = hadd(t[0], t[1]), hadd(t[2], t[3])
        idx = lambda xs: ir.Constant(ir.VectorType(i32, 8), xs)  # noqa: E731
        if lanes == 4:  # u0 = totals 0..3, u1 = 4..7
            return b.shuffle_vector(u0, u1, idx(list(range(8))))
        # u0 = totals 0..3 of the low 128-bit halves, then of the high halves (u1: 4..7)
        lo = b.shuffle_vector(u0, u1, idx([0, 1, 2, 3, 8, 9, 10, 11]))
        hi = b.shuffle_vector(u0, u1, idx([4, 5, 6, 7, 12, 13, 14, 15]))
        return b.add(lo, hi)
    out = ir.Constant(ir.VectorType(i32, n), None)
    for j, v in enumerate(vs):
        total = intrinsic(b, f"llvm.vector.reduce.add.v{lanes}i32", i32, [v])
        out = b.insert_element(out, total, const(i32, j))
    return out


def _fold_mins(b, fold, prod, dm, accs, accm, summs, j) -> None:
    """Add the mins' term (the integer lanes `prod`, times dm) where ggml adds it."""
    if fold == "acc":  # Q2_K: into the 8 float lanes, before the scales' term
        accs.add_product(j, splat(b, dm, 8), b.sitofp(prod, ir.VectorType(f32, 8)))
    elif fold == "acc4":  # Q4_K: a 4-lane float sum
        accm.add_product(j, splat(b, dm, 4), b.sitofp(prod, ir.VectorType(f32, 4)))
    else:  # Q5_K: the lanes' integer total into a float scalar
        n = prod.type.count
        total = b.sitofp(intrinsic(b, f"llvm.vector.reduce.add.v{n}i32", i32, [prod]), f32)
        p = b.gep(summs, [const(i32, j)])
        b.store(_fma(b, b.load(p), dm, total), p)


# -- the activations, rounded as llama.cpp rounds them ---------------------------------------
#
# llama.cpp's CPU backend rounds the other operand of every product with a quantized weight
# to the weight type's `vec_dot_type` first (`QuantType.activation_type`): Q8_0 or Q8_1 (32
# levels a group, an fp16 scale) or Q8_K (256 levels a block, a float scale). Our products
# take x in that form too ("xq": per token, n_in i8 levels, then per group of 32 its scale dx
# (f32) and the offset term xs (f32)); the float kernels take it back as levels * dx, which
# is the same function. The rounding is llama.cpp's x86 one: Q8_0/Q8_1 as its AVX2
# `quantize_row_q8_0/1` (id = 127 / amax, round half to even), Q8_K as
# `quantize_row_q8_K_ref` (the scale from the signed element of largest magnitude).

_Q8_KINDS = (GGMLType.Q8_0, GGMLType.Q8_1, GGMLType.Q8_K)
_HALF_KINDS = (GGMLType.F16, GGMLType.BF16)


def xq_row_bytes(n_in: int) -> int:
    """Bytes of one token's x in the integer kernels' form."""
    return n_in + 8 * (n_in // Q8_GROUP)


def _build_round_q8(m: ir.Module, kind: GGMLType) -> ir.Function:
    """round_<kind>(x, n_tok, n_in, xq): the rows of x (f32, n_tok x n_in) as `kind` rounds
    them, in the xq form (see above), one row every `xq_row_bytes(n_in)` bytes."""
    v32, i32x32 = ir.VectorType(f32, 32), ir.VectorType(i32, 32)
    fn = _internal(m, f"round_{kind.name.lower()}", [ptr(f32), i64, i64, ptr(i8)])
    x, ntok, n_in, out = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    hw = hardware_half(Target.CPU)
    c64 = lambda v: const(i64, v)  # noqa: E731
    ng = b.sdiv(n_in, c64(Q8_GROUP))
    row_bytes = b.add(n_in, b.mul(ng, c64(8)))

    def half(v):  # through fp16 and back
        return emit_f16_to_f32(b, emit_f32_to_f16(b, v, hw), hw)

    def levels(v, scale):
        r = intrinsic(b, "llvm.roundeven.v32f32", v32, [b.fmul(v, splat(b, scale, 32))])
        return b.fptosi(r, i32x32)

    def store_group(o, g, qi, dx, xs_of_sum):
        b.store(b.trunc(qi, _V32I8),
                b.bitcast(b.gep(o, [b.mul(g, c64(Q8_GROUP))]), ptr(_V32I8)), align=1)
        xd = b.bitcast(b.gep(o, [n_in]), ptr(f32))
        total = b.sitofp(intrinsic(b, "llvm.vector.reduce.add.v32i32", i32, [qi]), f32)
        b.store(dx, b.gep(xd, [g]))
        b.store(xs_of_sum(total), b.gep(xd, [b.add(ng, g)]))

    def load32(xr, g):
        return b.load(b.bitcast(b.gep(xr, [b.mul(g, c64(Q8_GROUP))]), ptr(v32)), align=4)

    with for_range(b, c64(0), ntok, name="t") as t:
        xr = b.gep(x, [b.mul(t, n_in)])
        o = b.gep(out, [b.mul(t, row_bytes)])
        if kind != GGMLType.Q8_K:
            with for_range(b, c64(0), ng, name="g") as g:
                v = load32(xr, g)
                amax = intrinsic(b, "llvm.vector.reduce.fmax.v32f32", f32, [fabs(b, v)])
                d = b.fdiv(amax, const(f32, 127.0))
                inv = b.select(b.fcmp_ordered("!=", amax, const(f32, 0.0)),
                               b.fdiv(const(f32, 127.0), amax), const(f32, 0.0))
                dh = half(d)
                if kind == GGMLType.Q8_0:
                    store_group(o, g, levels(v, inv), dh, lambda s: b.fmul(dh, s))
                else:  # Q8_1 keeps s = fp16(d * sum) with the unrounded d
                    store_group(o, g, levels(v, inv), dh, lambda s: half(b.fmul(d, s)))
        else:
            per = QK_K // Q8_GROUP
            with for_range(b, c64(0), b.sdiv(n_in, c64(QK_K)), name="k") as k:
                gs = [b.add(b.mul(k, c64(per)), c64(j)) for j in range(per)]
                vs = [load32(xr, g) for g in gs]
                absv = [fabs(b, v) for v in vs]
                amax = intrinsic(b, "llvm.vector.reduce.fmax.v32f32", f32, [absv[0]])
                for a in absv[1:]:
                    amax = intrinsic(b, "llvm.maxnum.f32", f32, [amax, intrinsic(
                        b, "llvm.vector.reduce.fmax.v32f32", f32, [a])])
                # the first element of largest magnitude, with its sign
                pos = c64(QK_K)
                for j in reversed(range(per)):
                    hit = b.bitcast(b.fcmp_ordered("==", absv[j], splat(b, amax, 32)),
                                    ir.IntType(32))
                    first = b.zext(intrinsic(b, "llvm.cttz.i32", i32,
                                             [hit, ir.Constant(ir.IntType(1), 0)]), i64)
                    pos = b.select(b.icmp_unsigned("!=", hit, const(i32, 0)),
                                   b.add(c64(j * Q8_GROUP), first), pos)
                nz = b.fcmp_ordered("!=", amax, const(f32, 0.0))
                pos = b.select(nz, pos, c64(0))
                mx = b.load(b.gep(xr, [b.add(b.mul(k, c64(QK_K)), pos)]))
                iscale = b.select(nz, b.fdiv(const(f32, -127.0), mx), const(f32, 0.0))
                d = b.select(nz, b.fdiv(const(f32, 1.0), iscale), const(f32, 0.0))
                cap = ir.Constant(i32x32, [127] * 32)
                for g, v in zip(gs, vs):
                    qi = levels(v, iscale)
                    qi = b.select(b.icmp_signed(">", qi, cap), cap, qi)
                    store_group(o, g, qi, d, lambda s: b.fmul(d, s))
    b.ret_void()
    return fn


def _build_xq_float(m: ir.Module) -> ir.Function:
    """xq_float(xq, n_tok, n_in, y): y (f32, n_tok x n_in) = the levels * dx of each group."""
    v32 = ir.VectorType(f32, 32)
    fn = _internal(m, "xq_float", [ptr(i8), i64, i64, ptr(f32)])
    xq, ntok, n_in, y = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    c64 = lambda v: const(i64, v)  # noqa: E731
    ng = b.sdiv(n_in, c64(Q8_GROUP))
    row_bytes = b.add(n_in, b.mul(ng, c64(8)))
    with for_range(b, c64(0), ntok, name="t") as t:
        o = b.gep(xq, [b.mul(t, row_bytes)])
        xd = b.bitcast(b.gep(o, [n_in]), ptr(f32))
        yr = b.gep(y, [b.mul(t, n_in)])
        with for_range(b, c64(0), ng, name="g") as g:
            q = b.load(b.bitcast(b.gep(o, [b.mul(g, c64(Q8_GROUP))]), ptr(_V32I8)), align=1)
            v = b.fmul(b.sitofp(q, v32), splat(b, b.load(b.gep(xd, [g])), 32))
            b.store(v, b.bitcast(b.gep(yr, [b.mul(g, c64(Q8_GROUP))]), ptr(v32)), align=4)
    b.ret_void()
    return fn


def _build_round_float(m: ir.Module, kind: GGMLType) -> ir.Function:
    """round_<kind>(x, n_tok, n_in, y): y (f32) = x (f32, n_tok x n_in) through `kind` (F16
    or BF16) and back, as ggml's from_float rounds it: to nearest even; a bf16 NaN made
    quiet, as ggml's fp32 -> bf16 does."""
    fn = _internal(m, f"round_{kind.name.lower()}", [ptr(f32), i64, i64, ptr(f32)])
    x, ntok, n_in, y = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    hw = hardware_half(Target.CPU)
    c32 = lambda v: const(i32, v)  # noqa: E731
    with for_range(b, const(i64, 0), b.mul(ntok, n_in)) as i:
        v = b.load(b.gep(x, [i]))
        if kind == GGMLType.F16:
            r = emit_f16_to_f32(b, emit_f32_to_f16(b, v, hw), hw)
        else:
            u = b.bitcast(v, i32)
            odd = b.and_(b.lshr(u, c32(16)), c32(1))
            near = b.and_(b.add(u, b.add(c32(0x7FFF), odd)), c32(-0x10000))
            nan = b.icmp_unsigned(">", b.and_(u, c32(0x7FFFFFFF)), c32(0x7F800000))
            quiet = b.or_(b.and_(u, c32(-0x10000)), c32(0x400000))
            r = b.bitcast(b.select(nan, quiet, near), f32)
        b.store(r, b.gep(y, [i]))
    b.ret_void()
    return fn


def _export_act_part(m: ir.Module, name: str, impl: ir.Function) -> None:
    """`name(i64* args, part, n_parts)`: a rounding kernel as a team job over its share of
    the tokens; args are (x, n_tok, n_in, out, out_row_bytes), raw addresses."""
    fn = ir.Function(m, ir.FunctionType(void, [ptr(i64), i64, i64]), name)
    argv, part, n_parts = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    x, ntok, n_in, out, out_row = [b.load(b.gep(argv, [const(i64, k)])) for k in range(5)]
    t0, t1 = emit_part_rows(b, ntok, const(i64, 1), part, n_parts)
    xp = b.gep(b.inttoptr(x, ptr(f32)), [b.mul(t0, n_in)])
    op = b.gep(b.inttoptr(out, ptr(i8)), [b.mul(t0, out_row)])
    b.call(impl, [xp, b.sub(t1, t0), n_in, b.bitcast(op, impl.args[3].type)])
    b.ret_void()


def build_activation_module() -> ir.Module:
    """`round_q8_0`, `round_q8_1`, `round_q8_k`, `xq_float`, `round_f16` and `round_bf16`,
    with ndarray arguments; and each `round_<kind>_part`, the rounding as a team job."""
    m = ir.Module(name="activations")
    for kind in _Q8_KINDS:
        impl = _build_round_q8(m, kind)
        _export(m, f"round_{kind.name.lower()}", impl)
        _export_act_part(m, f"round_{kind.name.lower()}_part", impl)
    _export(m, "xq_float", _build_xq_float(m))
    for kind in _HALF_KINDS:
        impl = _build_round_float(m, kind)
        _export(m, f"round_{kind.name.lower()}", impl)
        _export_act_part(m, f"round_{kind.name.lower()}_part", impl)
    return m


def _gemv_rows(blk: _Blocks) -> int:
    return GEMV_ROWS_FLOAT if blk.elementwise else GEMV_ROWS


def _gemm_rounds(t: GGMLType) -> bool:
    """Whether the prompt kernel over `t` rounds x itself (to fp16 or bf16, as ggml's
    from_float does, round to nearest even) while packing it; otherwise x comes rounded."""
    if t == GGMLType.F16:
        return _x86_f16c()
    return t in (GGMLType.BF16, GGMLType.F32)


def _emit_round_x(b: ir.IRBuilder, v: ir.Value, t: GGMLType | None) -> ir.Value:
    """A vector of x as a product over `t` weights sees it (see `_gemm_rounds`)."""
    n = v.type.count
    if t == GGMLType.F16:
        return b.fpext(b.fptrunc(v, ir.VectorType(f16, n)), v.type)
    if t == GGMLType.BF16:  # u + 0x7fff + (u >> 16 & 1), low half cleared; NaN made quiet
        vi = ir.VectorType(i32, n)
        u = b.bitcast(v, vi)
        hi = splat(b, const(i32, -65536), n)
        odd = b.and_(b.lshr(u, splat(b, const(i32, 16), n)), splat(b, const(i32, 1), n))
        r = b.and_(b.add(u, b.add(odd, splat(b, const(i32, 0x7FFF), n))), hi)
        quiet = b.or_(b.and_(u, hi), splat(b, const(i32, 0x400000), n))
        return b.bitcast(b.select(b.fcmp_unordered("uno", v, v), quiet, r), v.type)
    return v


def _k_block(t: GGMLType) -> int:
    """The most floats of a row the prompt kernel over `t` takes at a time."""
    return K_BLOCK_F16 if _gemm_direct(t) else K_BLOCK


def _gemm_direct(t: GGMLType) -> bool:
    """Whether the prompt kernel reads `t`'s rows in place (F16 on F16C: see `_build_gemm`)."""
    return F16_DIRECT and t == GGMLType.F16 and _gemm_rounds(t)


def _k_blocks(n: int, block: int, k_block: int = K_BLOCK) -> tuple[int, int]:
    """(floats per K-block, K-blocks) the prompt kernel cuts rows of n floats into: whole
    weight blocks of `block` floats, at most `k_block` floats, as even as that allows (the
    kernel computes the same)."""
    nb = n // block
    count = -(-nb // max(1, k_block // block))
    per = -(-nb // count)
    return per * block, -(-nb // per)


def _gemm_group() -> int:
    """Rows the prompt kernel dequantizes at a time (one K-block of them stays in L2)."""
    return max(GEMM_ROWS, MAX_GROUP_ROWS - MAX_GROUP_ROWS % GEMM_ROWS)


def gemm_scratch_floats(n_in: int, block: int, group: int, k_block: int = K_BLOCK) -> int:
    """Floats of scratch one prompt-kernel call needs (see `_build_gemm`)."""
    kc, count = _k_blocks(n_in, block, k_block)
    return group * (kc + TOKEN_CHUNK * LANES) + TOKEN_CHUNK * kc * count


def _build_gemm(m: ir.Module, name: str, blk: _Blocks, vw: int,
                rounding: GGMLType | None = None) -> ir.Function:
    """gemm(w, w_stride, x, ldx, y, ldy, t0, t1, r0, r1, n_blocks, scratch, group_rows):
    y[t, r] = dot(W[r], x[t]) for t in [t0, t1) (at most TOKEN_CHUNK tokens), r in [r0, r1).

    As llamafile's tinyBLAS sums it: each (row, token) has one vector accumulator, summed in
    k order, then one fixed lane tree. The work goes in K-blocks of K_BLOCK floats, so that
    what the register tiles (GEMM_ROWS rows x TILE_TOKENS tokens) read stays in L1:
    - x's tokens are first packed into `scratch` block-major (rounded for `rounding`);
    - rows go in groups of `group_rows`, dequantized into `scratch`, block-major too (one
      K-block of the group is one contiguous run, read by every token tile); F16 rows on
      F16C are read in place instead, each vector widened as it is loaded (K-blocks of
      K_BLOCK_F16 then: half the bytes in cache a float, and no copy to make), and x,
      rounded to F16, is packed as F16 too;
    - between K-blocks a tile's accumulators wait in `scratch` (an exact round trip).
    A short last tile repeats its last row or token (the same bits, stored twice).
    Scratch holds `gemm_scratch_floats(n, block, group_rows)` floats."""
    vt = ir.VectorType(f32, vw)
    args = [ptr(i8), i64, ptr(f32), i64, ptr(f32), i64, i64, i64, i64, i64, i64, ptr(f32), i64]
    fn = _internal(m, name, args)
    w, ws, x, ldx, y, ldy, t0, t1, r0, r1, nb, scratch, group = fn.args
    b = _Builder(fn.append_basic_block("entry"))
    b.fix_half = not blk.elementwise
    c64 = lambda v: const(i64, v)  # noqa: E731
    R, T = GEMM_ROWS, TILE_TOKENS
    bs, bv = blk.size, blk.size // vw

    def cdiv(a, c):
        return b.sdiv(b.add(a, b.sub(c, c64(1))), c)

    # the K-blocks as `_k_blocks` cuts them: kcb weight blocks (kc floats, kcv vectors) each
    direct = F16_DIRECT and rounding == GGMLType.F16
    kcb = cdiv(nb, cdiv(nb, c64(max(1, (K_BLOCK_F16 if direct else K_BLOCK) // bs))))
    kc, kcv = b.mul(kcb, c64(bs)), b.mul(kcb, c64(bv))
    nv = b.mul(nb, c64(bv))  # vectors per row
    tile = _Accs(b, vt, R * T)
    part = b.bitcast(b.gep(scratch, [b.mul(group, kc)]), ptr(vt))  # partial sums
    xp = b.gep(b.bitcast(part, ptr(f32)), [b.mul(group, c64(TOKEN_CHUNK * vw))])  # x packed
    nt = b.sub(t1, t0)
    xblock = b.mul(nt, kc)  # floats of one K-block of the packed tokens

    def smin(a, c):
        return b.select(b.icmp_signed("<", a, c), a, c)

    # F16 weights on F16C: read in place, each vector widened as it is loaded (exact), half
    # the bytes of a dequantized copy in cache and no copy to make
    hv = ir.VectorType(f16, vw)
    xhalf = direct and X_HALF
    xet, xvt = (f16, hv) if xhalf else (f32, vt)

    def xload(p, k):
        v = b.load(b.gep(p, [k]), align=2 if xhalf else 4)
        return b.fpext(v, vt) if xhalf else v

    def wload(row, k):
        if direct:
            return b.fpext(b.load(b.gep(row, [k]), align=2), vt)
        return b.load(b.gep(row, [k]), align=4)

    with for_range(b, c64(0), nt, name="xt") as j:
        src = b.bitcast(b.gep(x, [b.mul(b.add(t0, j), ldx)]), ptr(vt))
        with for_range(b, c64(0), nv, step=kcv, name="xb") as k0:
            # vector k of token j in K-block k0 / kcv, as one vector index of the packed x
            base = b.sub(b.add(b.mul(b.sdiv(k0, kcv), b.mul(nt, kcv)), b.mul(j, kcv)), k0)
            dst = b.gep(b.bitcast(xp, ptr(xvt)), [base])
            with for_range(b, k0, smin(b.add(k0, kcv), nv), name="xv") as k:
                v = b.load(b.gep(src, [k]), align=4)
                if xhalf:  # x rounded to F16 is kept as F16 (exact)
                    v = b.fptrunc(v, hv)
                else:
                    v = _emit_round_x(b, v, rounding)
                b.store(v, b.gep(dst, [k]), align=2 if xhalf else 4)
    last_t = b.sub(nt, c64(1))
    with for_range(b, r0, r1, step=group, name="g") as g:
        cnt = b.sub(smin(b.add(g, group), r1), g)
        last_r = b.sub(cnt, c64(1))
        with for_range(b, c64(0), nv, step=kcv, name="kb") as kv:
            ke = smin(b.add(kv, kcv), nv)
            first = b.icmp_signed("==", kv, c64(0))
            final = b.icmp_signed("==", ke, nv)
            # this K-block of the group's rows, dequantized (row-major, kc floats a row)
            k0 = b.sdiv(kv, c64(bv))
            if not direct:
                with for_range(b, c64(0), cnt, name="dq") as i:
                    row = b.gep(w, [b.mul(b.add(g, i), ws)])
                    base = b.sub(b.mul(i, kc), b.mul(k0, c64(bs)))
                    with for_range(b, k0, smin(b.add(k0, kcb), nb), name="blk") as k:
                        blk.emit(b, b.gep(row, [b.mul(k, c64(blk.nbytes))]),
                                 b.gep(scratch, [b.add(base, b.mul(k, c64(bs)))]))
            kbi = b.sdiv(kv, kcv)
            # both blocks as vectors, offset so that index k (from kv) reads them
            wblk = b.gep(b.bitcast(scratch, ptr(vt)), [b.neg(kv)])
            xblk = b.gep(b.bitcast(b.gep(b.bitcast(xp, ptr(xet)), [b.mul(kbi, xblock)]),
                                   ptr(xvt)), [b.neg(kv)])
            with for_range(b, c64(0), nt, step=T, name="t") as t:
                toks = [smin(b.add(t, c64(j)), last_t) for j in range(T)]
                xs = [b.gep(xblk, [b.mul(tj, kcv)]) for tj in toks]
                with for_range(b, c64(0), cnt, step=R, name="p") as p:
                    rows = [smin(b.add(p, c64(i)), last_r) for i in range(R)]
                    if direct:  # the weight's own rows, as vectors of halves
                        wr = [b.bitcast(b.gep(w, [b.mul(b.add(g, ri), ws)]), ptr(hv))
                              for ri in rows]
                    else:
                        wr = [b.gep(wblk, [b.mul(ri, kcv)]) for ri in rows]
                    slots = [[b.gep(part, [b.add(b.mul(ri, c64(TOKEN_CHUNK)), tj)])
                              for tj in toks] for ri in rows]
                    with b.if_else(first) as (then, other):
                        with then:
                            tile.zero()
                        with other:
                            for i in range(R):
                                for j in range(T):
                                    tile.set(i * T + j, b.load(slots[i][j], align=4))
                    with for_range(b, kv, ke, name="k") as k:
                        if R <= T:  # the rows' vectors held, each token's loaded once
                            wv = [wload(wr[i], k) for i in range(R)]
                            for j in range(T):
                                xv = xload(xs[j], k)
                                for i in range(R):
                                    tile.add_product(i * T + j, wv[i], xv)
                        else:
                            xv = [xload(xs[j], k) for j in range(T)]
                            for i in range(R):
                                wv = wload(wr[i], k)
                                for j in range(T):
                                    tile.add_product(i * T + j, wv, xv[j])
                    with b.if_else(final) as (then, other):
                        with then:
                            for i in range(R):
                                for j in range(T):
                                    at = b.add(b.mul(b.add(t0, toks[j]), ldy), b.add(g, rows[i]))
                                    b.store(_hsum(b, tile.get(i * T + j)), b.gep(y, [at]))
                        with other:
                            for i in range(R):
                                for j in range(T):
                                    b.store(tile.get(i * T + j), slots[i][j], align=4)
    b.ret_void()
    return fn


def _internal(m: ir.Module, name: str, args: list[ir.Type]) -> ir.Function:
    """A function inlined into its exported wrapper, its pointers marked noalias."""
    fn = ir.Function(m, ir.FunctionType(void, args), f"{name}.impl")
    fn.linkage = "internal"
    fn.attributes.add("alwaysinline")
    for a in fn.args:
        if isinstance(a.type, ir.PointerType):
            a.add_attribute("noalias")
    return fn


def _export(m: ir.Module, name: str, impl: ir.Function) -> None:
    """`name(args...)` with each pointer argument of `impl` passed as a numpy array object
    (a PyObject*): the data pointer is read from the array, which saves the microseconds
    `ndarray.ctypes` costs on every call."""
    types = [ptr(i8) if isinstance(a.type, ir.PointerType) else a.type for a in impl.args]
    fn = ir.Function(m, ir.FunctionType(void, types), name)
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    args = []
    for a, want in zip(fn.args, impl.args):
        if isinstance(want.type, ir.PointerType):
            field = b.bitcast(b.gep(a, [const(i64, ARRAY_DATA_OFFSET)]), ptr(ptr(i8)))
            a = b.bitcast(b.load(field), want.type)
        args.append(a)
    b.call(impl, args)
    b.ret_void()


def _array_data(b: ir.IRBuilder, obj: ir.Value, typ: ir.Type) -> ir.Value:
    """The data pointer of the ndarray object at `obj` (an i8* PyObject*), as `typ`."""
    field = b.bitcast(b.gep(obj, [const(i64, ARRAY_DATA_OFFSET)]), ptr(ptr(i8)))
    return b.bitcast(b.load(field), typ)


def _export_part(m: ir.Module, name: str, impl: ir.Function, align: int) -> None:
    """`name(i64* args, part, n_parts)`: a gemv as a team job (see jit.parallel). args are
    (w, w_stride, x, ldx, y, ldy, n_tok, n_rows, n_blocks) with the arrays as ndarray object
    addresses; the part runs its share of the rows, cut at multiples of `align`."""
    fn = ir.Function(m, ir.FunctionType(void, [ptr(i64), i64, i64]), name)
    argv, part, n_parts = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    a = [b.load(b.gep(argv, [const(i64, k)])) for k in range(9)]
    w, ws, x, ldx, y, ldy, ntok, n_rows, nb = a

    r0, r1 = emit_part_rows(b, n_rows, const(i64, align), part, n_parts)
    data = lambda v, arg: _array_data(b, b.inttoptr(v, ptr(i8)), arg.type)  # noqa: E731
    b.call(impl, [data(w, impl.args[0]), ws, data(x, impl.args[2]), ldx, data(y, impl.args[4]),
                  ldy, ntok, r0, r1, nb])
    b.ret_void()


def _export_q_part(m: ir.Module, name: str, impl: ir.Function) -> None:
    """`name(i64* args, part, n_parts)`: one token's product on integer dot products (the
    one-token `gemmq`) as a team job; args are (w, w_stride, xq, y, n_rows, n_blocks), the
    arrays as ndarray object addresses."""
    fn = ir.Function(m, ir.FunctionType(void, [ptr(i64), i64, i64]), name)
    argv, part, n_parts = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    w, ws, xq, y, n_rows, nb = [b.load(b.gep(argv, [const(i64, k)])) for k in range(6)]
    r0, r1 = emit_part_rows(b, n_rows, const(i64, 1), part, n_parts)
    data = lambda v, arg: _array_data(b, b.inttoptr(v, ptr(i8)), arg.type)  # noqa: E731
    zero, one = const(i64, 0), const(i64, 1)
    b.call(impl, [data(w, impl.args[0]), ws, data(xq, impl.args[2]), zero,
                  data(y, impl.args[4]), zero, zero, one, r0, r1, nb, n_rows])
    b.ret_void()


def _token_chunks(b: ir.IRBuilder, t0: ir.Value, t1: ir.Value, call: Callable) -> None:
    """call(c0, c1) over [t0, t1) in chunks of TOKEN_CHUNK tokens."""
    with for_range(b, const(i64, 0), b.sdiv(b.add(b.sub(t1, t0), const(i64, TOKEN_CHUNK - 1)),
                                            const(i64, TOKEN_CHUNK)), name="chunk") as c:
        c0 = b.add(t0, b.mul(c, const(i64, TOKEN_CHUNK)))
        c1 = b.add(c0, const(i64, TOKEN_CHUNK))
        call(c0, b.select(b.icmp_signed("<", c1, t1), c1, t1))


def _export_prompt_q_part(m: ir.Module, name: str, tile: ir.Function,
                          one: ir.Function) -> None:
    """`name(i64* args, part, n_parts)`: a prompt's product on integer dot products as a
    team job: args are (w, w_stride, xq, ldq, y, ldy, n_tok, tiled,
    n_rows, n_blocks, group_rows, align), the arrays as raw addresses. The part takes its
    share of the rows (`emit_part_rows`); its tokens [0, tiled) go through `tile` a TOKEN_CHUNK
    at a time, the rest through `one`."""
    fn = ir.Function(m, ir.FunctionType(void, [ptr(i64), i64, i64]), name)
    argv, part, n_parts = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    w, ws, xq, ldq, y, ldy, ntok, tiled, n_rows, nb, group, align = [
        b.load(b.gep(argv, [const(i64, k)])) for k in range(12)]
    r0, r1 = emit_part_rows(b, n_rows, align, part, n_parts)
    w, xq = b.inttoptr(w, ptr(i8)), b.inttoptr(xq, ptr(i8))
    y = b.inttoptr(y, ptr(f32))
    _token_chunks(b, const(i64, 0), tiled, lambda c0, c1: b.call(
        tile, [w, ws, xq, ldq, y, ldy, c0, c1, r0, r1, nb, group]))
    with b.if_then(b.icmp_signed("<", tiled, ntok)):
        b.call(one, [w, ws, xq, ldq, y, ldy, tiled, ntok, r0, r1, nb, group])
    b.ret_void()


def _export_prompt_part(m: ir.Module, name: str, gemm: ir.Function) -> None:
    """`name(i64* args, part, n_parts)`: a prompt's product over float kernels (`gemm`) as a
    team job: args are (w, w_stride, x, ldx, y, ldy, n_tok, n_rows, n_blocks, group_rows,
    scratch, scratch_floats, align), raw addresses; part k works in its own scratch, at
    scratch + k * scratch_floats floats."""
    fn = ir.Function(m, ir.FunctionType(void, [ptr(i64), i64, i64]), name)
    argv, part, n_parts = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    w, ws, x, ldx, y, ldy, ntok, n_rows, nb, group, scratch, per, align = [
        b.load(b.gep(argv, [const(i64, k)])) for k in range(13)]
    r0, r1 = emit_part_rows(b, n_rows, align, part, n_parts)
    w, x, y = b.inttoptr(w, ptr(i8)), b.inttoptr(x, ptr(f32)), b.inttoptr(y, ptr(f32))
    s = b.gep(b.inttoptr(scratch, ptr(f32)), [b.mul(part, per)])
    with b.if_then(b.icmp_signed("<", r0, r1)):
        _token_chunks(b, const(i64, 0), ntok, lambda c0, c1: b.call(
            gemm, [w, ws, x, ldx, y, ldy, c0, c1, r0, r1, nb, s, group]))
    b.ret_void()


def build_module(t: GGMLType) -> ir.Module:
    """`gemv_<t>` and `gemm_<t>` for weight type `t`; their array arguments are ndarray
    objects (see `_export`); `gemv<T>_<t>_part`, the same gemv as a team job; and where the
    type has an integer view, `gemvq_<t>_part` (see `_build_gemvq`)."""
    blk, vw = _blocks(t), LANES
    m = ir.Module(name=f"matmul_{t.name.lower()}")
    name = t.name.lower()
    groups = _int_groups(t)
    if groups is not None:
        build = _build_gemmq_k if quant.get(t).int_superblock else _build_gemmq
        one = build(m, f"gemmq1_{name}", blk, groups, 1)
        # (IQ4_NL: ggml's one-token vec_dot sums in another order than its prompt kernel)
        if getattr(quant.get(t), "int_dot_pairs", False):
            _export_q_part(m, f"gemvq_{name}_part",
                           _build_gemvq_pairs(m, f"gemvq_{name}", blk, groups))
        else:
            _export_q_part(m, f"gemvq_{name}_part", one)
        tile = build(m, f"gemmq_{name}", blk, groups, _q_tile(t))
        _export_prompt_q_part(m, f"gemmq_{name}_ppart", tile, one)
        if quant.get(t).int_superblock and quant.get(t).int_tiled:  # its tiled order
            # (a type whose tiled kernel reads its blocks otherwise has a view of its own)
            tiled = getattr(quant.get(t), "emit_int_superblock_tiled", groups)
            impls = [_build_gemmq_k(m, kname, blk, tiled, T, tiled=True)
                     for T, kname in ((Q_TILE_K, f"gemmqt_{name}"), (1, f"gemmqt1_{name}"))]
            _export_prompt_q_part(m, f"gemmqt_{name}_ppart", *impls)
    for T in GEMV_TOKENS:
        if T == 1 and _vec_dot_order(t):
            impl = _build_gemv_vec_dot(m, f"gemv{T}_{name}", t, vw)
        else:
            impl = _build_gemv(m, f"gemv{T}_{name}", blk, vw, T)
        _export_part(m, f"gemv{T}_{name}_part", impl, _gemv_rows(blk) if T == 1 else 1)
    rounding = t if _gemm_rounds(t) else None
    _export_prompt_part(m, f"gemm_{name}_ppart", _build_gemm(m, f"gemm_{name}", blk, vw,
                                                             rounding))
    return m


def _array_data_offset() -> int:
    """Where an ndarray object keeps its data pointer: right after the object header
    (`PyArrayObject_fields.data`). Checked against `ndarray.ctypes` once."""
    off = object.__basicsize__
    probe = np.empty(3)
    raw = ctypes.string_at(id(probe) + off, ctypes.sizeof(ctypes.c_void_p))
    if int.from_bytes(raw, sys.byteorder) != probe.ctypes.data:  # pragma: no cover
        raise RuntimeError("unexpected ndarray object layout")
    return off


ARRAY_DATA_OFFSET = _array_data_offset()

_I64, _A = ctypes.c_int64, ctypes.py_object
_PART_SIG = ctypes.CFUNCTYPE(None, ctypes.c_void_p, _I64, _I64)
_ACT_SIG = ctypes.CFUNCTYPE(None, _A, _I64, _I64, _A)


# -- Python side -----------------------------------------------------------------------------


class _Plan:
    """What `matmul` needs per weight type: layout, accepted dtypes, compiled kernels."""

    def __init__(self, t: GGMLType):
        info = quant.get(t).info
        self.t, self.name = t, t.name
        self.block, self.type_size = info.block_size, info.type_size
        self.dtypes = (np.dtype(np.uint8),)
        if t in _FLOAT_TYPES:
            self.dtypes += (np.dtype(_FLOAT_TYPES[t]),)
        self.vblock = _blocks(t).size  # floats per block the kernels walk
        name = t.name.lower()
        sigs = {f"gemv{T}_{name}_part": _PART_SIG for T in GEMV_TOKENS}
        self.act = quant.get(t).activation_type  # x is rounded to this first
        self.int_dot = _int_groups(t) is not None and self.act in _Q8_KINDS
        self.tiled = self.int_dot and quant.get(t).int_superblock and quant.get(t).int_tiled
        if self.int_dot:
            sigs |= {f"gemvq_{name}_part": _PART_SIG, f"gemmq_{name}_ppart": _PART_SIG}
        if self.tiled:
            sigs |= {f"gemmqt_{name}_ppart": _PART_SIG}
        mod = compile_kernels(lambda: build_module(t), {**sigs, f"gemm_{name}_ppart": _PART_SIG},
                              key=f"kernels.build_module:{t.name}")
        addr = lambda k: ctypes.cast(mod[k], ctypes.c_void_p).value  # noqa: E731
        # prompt products as team jobs, by address (see `prompt_job`)
        self.gemm_ppart = addr(f"gemm_{name}_ppart")
        self.gemmq_ppart = addr(f"gemmq_{name}_ppart") if self.int_dot else 0
        self.gemmqt_ppart = addr(f"gemmqt_{name}_ppart") if self.tiled else 0
        # team jobs are run by address, from compiled code
        self.gemv_part = {T: ctypes.cast(mod[f"gemv{T}_{name}_part"], ctypes.c_void_p).value
                          for T in GEMV_TOKENS}
        if self.int_dot:
            self.gemvq_part = ctypes.cast(mod[f"gemvq_{name}_part"], ctypes.c_void_p).value
            self.q_tile = _q_tile(t)

    def weight(self, w) -> np.ndarray:
        """`w` checked: 2-D, an accepted dtype, whole blocks per row, contiguous rows (copied
        only when they are not)."""
        if not isinstance(w, np.ndarray) or w.ndim != 2:
            raise UserError(f"{self.name} weight must be a 2-D array of rows, got "
                            f"{getattr(w, 'shape', type(w).__name__)}")
        if w.dtype not in self.dtypes:
            want = " or ".join(d.name for d in self.dtypes[::-1])
            raise UserError(f"{self.name} weight must be {want} (raw bytes), got {w.dtype}")
        if (w.shape[1] * w.itemsize) % self.type_size:
            raise UserError(f"{self.name} rows are whole blocks of {self.type_size} bytes, "
                            f"got rows of {w.shape[1] * w.itemsize} bytes")
        if w.strides[1] != w.itemsize and w.shape[1] > 1:
            w = np.ascontiguousarray(w)
        return w


def _env_int(name: str, default: int) -> int:
    """An environment switch read as C's atoi reads it (leading digits, else 0)."""
    value = os.environ.get(name)
    if value is None:
        return default
    digits = re.match(r"\s*[+-]?\d+", value)
    return int(digits[0]) if digits else 0


_PLANS: dict = {}
_plans_lock = threading.Lock()


def _plan(wtype) -> _Plan:
    """The plan for `wtype` (a GGMLType, its id or its name), compiled on first use."""
    p = _PLANS.get(wtype)
    if p is not None:
        return p
    try:
        t = GGMLType[wtype.upper()] if isinstance(wtype, str) else GGMLType(wtype)
    except (ValueError, KeyError, AttributeError):
        raise UserError(f"unknown tensor type {wtype!r}") from None
    if t not in SUPPORTED_TYPES:
        raise UserError(f"matmul over {t.name} weights is not supported yet")
    with _plans_lock:
        p = _PLANS.get(t) or _Plan(t)
        _PLANS[t] = _PLANS[wtype] = p
    return p


_tls = threading.local()


def _scratch(n: int) -> np.ndarray:
    """A per-thread float32 buffer of at least n elements, reused across calls."""
    buf = getattr(_tls, "scratch", None)
    if buf is None or buf.size < n:
        buf = _tls.scratch = np.empty(max(n, 1 << 14), np.float32)
    return buf


def _min_rows(work_per_row: int) -> int:
    return -(-MIN_WORK_PER_THREAD // max(1, work_per_row))


def _prepare(w, wtype, x, out):
    """Checked operands of one product: (plan, w, x, y, ldy, n_tok, n_in, n_out)."""
    p = _PLANS.get(wtype) or _plan(wtype)
    if not (type(w) is np.ndarray and w.ndim == 2 and w.dtype in p.dtypes
            and w.strides[1] == w.itemsize and not (w.shape[1] * w.itemsize) % p.type_size):
        w = p.weight(w)
    n_out = w.shape[0]
    n_in = w.shape[1] * w.itemsize // p.type_size * p.block
    if type(x) is not np.ndarray or x.dtype != np.float32 or not x.flags.c_contiguous:
        x = np.ascontiguousarray(x, np.float32)
    if x.ndim == 1:
        n_tok, shape = 1, (n_out,)
    elif x.ndim == 2:
        n_tok, shape = x.shape[0], (x.shape[0], n_out)
    else:
        raise UserError(f"x must be (n_tok, n_in) or (n_in,), got shape {x.shape}")
    if x.shape[-1] != n_in:
        if x.shape[-1] % p.block:
            raise UserError(f"{p.name} weights need n_in a multiple of {p.block}, "
                            f"got {x.shape[-1]}")
        raise UserError(f"x has {x.shape[-1]} features but the {p.name} weight rows hold {n_in}")
    if out is None:
        y = np.empty(shape, np.float32)
        ldy = n_out
    else:
        if out.shape != shape or out.dtype != np.float32 or out.strides[-1] != 4 or (
                out.ndim == 2 and out.strides[0] % 4):
            raise UserError(f"out must be float32 of shape {shape} with contiguous rows, "
                            f"got {out.dtype} {out.shape}")
        y = out
        ldy = out.strides[0] // 4 if out.ndim == 2 else n_out
    return p, w, x, y, ldy, n_tok, n_in, n_out


def _special(p, w, x, y, n_tok, n_in, n_out) -> bool:
    """The degenerate shapes, done here; False for the ones the kernels take."""
    if n_tok == 0 or n_out == 0:
        return True
    if n_in == 0:
        y[...] = 0
        return True
    if n_in % FLOAT_GROUP:  # float weights of an odd width: numpy on converted rows
        y[...] = round_activations(x, p.act) @ get_rows(w, p.t, np.arange(n_out)).T
        return True
    return False


@cache
def _act_kernels() -> dict:
    """The rounding kernel of each kind (keyed by its GGMLType) and "xq_float"."""
    kinds = _Q8_KINDS + _HALF_KINDS
    names = [f"round_{k.name.lower()}" for k in kinds] + ["xq_float"]
    parts = [f"round_{k.name.lower()}_part" for k in kinds]
    mod = compile_kernels(build_activation_module,
                          {**dict.fromkeys(names, _ACT_SIG), **dict.fromkeys(parts, _PART_SIG)},
                          key="kernels.build_activation_module")
    return {"xq_float": mod["xq_float"], **{k: mod[f"round_{k.name.lower()}"] for k in kinds},
            **{("part", k): ctypes.cast(mod[f"round_{k.name.lower()}_part"],
                                        ctypes.c_void_p).value for k in kinds}}


def round_job(kind: GGMLType, x: int, n_tok: int, n_in: int, out: int,
              threads: int) -> list[int]:
    """The job record (fn, parts, args) that rounds x (raw address, n_tok rows of n_in
    floats) to `kind` into `out` (the integer form for the Q8 kinds, float32 for F16/BF16)."""
    row = xq_row_bytes(n_in) if kind in _Q8_KINDS else 4 * n_in
    parts = row_parts(n_tok, threads, (1 << 15) // n_in)
    return [_act_kernels()["part", kind], parts, x, n_tok, n_in, out, row]


def round_q8(x: np.ndarray, kind: GGMLType, out: np.ndarray | None = None) -> np.ndarray:
    """x (float32, (n_tok, n_in) or (n_in,), contiguous) rounded to `kind` (Q8_0, Q8_1 or
    Q8_K) as llama.cpp's CPU backend rounds it, in the integer kernels' form: uint8
    (n_tok, xq_row_bytes(n_in))."""
    x2 = x.reshape(-1, x.shape[-1])
    n_tok, n_in = x2.shape
    if n_in % (QK_K if kind == GGMLType.Q8_K else Q8_GROUP):
        raise UserError(f"{kind.name} rounds rows of whole blocks, got {n_in} values")
    if out is None:
        out = np.empty((n_tok, xq_row_bytes(n_in)), np.uint8)
    if n_tok == 1:
        _act_kernels()[kind](x2, 1, n_in, out)
    else:
        run_jobs([round_job(kind, data_address(x2), n_tok, n_in, data_address(out),
                            default_threads())])
    return out


def data_address(a: np.ndarray) -> int:
    """The address of an array's data (through the array interface: `.ctypes` costs more
    and makes a reference cycle)."""
    return a.__array_interface__["data"][0]


def xq_float(xq: np.ndarray, n_in: int) -> np.ndarray:
    """The values the rounded rows `xq` (from `round_q8`) stand for: float32 (n_tok, n_in)."""
    y = np.empty((xq.shape[0], n_in), np.float32)
    _act_kernels()["xq_float"](xq, xq.shape[0], n_in, y)
    return y


def round_activations(x: np.ndarray, kind: GGMLType | None) -> np.ndarray:
    """x as a product with a weight whose `activation_type` is `kind` sees it: float32, the
    same shape. F16/BF16 round to nearest even, as ggml's conversions do."""
    x = np.ascontiguousarray(x, np.float32)
    if kind in _Q8_KINDS:
        return xq_float(round_q8(x, kind), x.shape[-1]).reshape(x.shape)
    if kind in _HALF_KINDS:
        y = np.empty_like(x)
        _act_kernels()[kind](x, 1, x.size, y)
        return y
    return x


def _xq(p: _Plan, x: np.ndarray, n_in: int) -> np.ndarray:
    """x (one token) rounded for the integer kernels, in this thread's buffer for its kind."""
    bufs = getattr(_tls, "xq", None)
    if bufs is None:
        bufs = _tls.xq = {}
    buf = bufs.get(p.act)
    if buf is None or buf.size < xq_row_bytes(n_in):
        buf = bufs[p.act] = np.empty((1, max(xq_row_bytes(n_in), 1 << 12)), np.uint8)
    return round_q8(x, p.act, buf[:, :xq_row_bytes(n_in)])


def _x_for(p: _Plan, x: np.ndarray, n_in: int, seen: dict, int_path: bool) -> np.ndarray:
    """x as the product over `p`'s weights takes it (rounded once per kind for the products
    of one x, in `seen`)."""
    key = (p.act, int_path)
    r = seen.get(key)
    if r is None:
        r = seen[key] = _xq(p, x, n_in) if int_path else round_activations(x, p.act)
    return r


TINYBLAS_ROWS = 4  # llamafile's tinyBLAS takes float weights of a multiple of 4 rows


def _vec_dot_rows(p: _Plan, n_out: int) -> bool:
    """Float weights of a row count tinyBLAS does not take: llama.cpp's CPU backend then
    computes every token with vec_dot, as our one-token kernel does (a pass over W a token)."""
    return n_out % TINYBLAS_ROWS != 0 and _vec_dot_order(p.t)


@dataclass(frozen=True)
class Route:
    """How a product over a weight takes its tokens, as llama.cpp's CPU backend would:
    `gemv`, the decode kernels (a pass over W a token, or a few tokens) rather than the
    prompt's tiles; x rounded first to `x_kind` (None: taken as it is), into `round_q8`'s
    integer rows when `int_x` (else floats); `repacked`, W interleaved as ggml repacks it."""

    gemv: bool
    x_kind: GGMLType | None
    int_x: bool
    repacked: bool


def route(p: _Plan, n_tok: int, n_out: int) -> Route:
    """The route of a product of `n_tok` tokens over the `n_out` rows of `p`'s weight (what
    `matmul` runs, and what a batch program lays out)."""
    gemv = (n_tok == 1 or (n_tok <= GEMV_TOKENS[-1] and not p.int_dot)
            or _vec_dot_rows(p, n_out))
    if p.int_dot:  # (their gemv is one token's: a few tokens' and vec_dot rows are floats')
        return Route(gemv, p.act, True, repack.repacked(p.t, n_out))
    rounded = p.act in _Q8_KINDS or (p.act in _HALF_KINDS and (gemv or not _gemm_rounds(p.t)))
    return Route(gemv, p.act if rounded else None, False, False)


def _add_gemv(jobs: JobTable, p: _Plan, w, x, y, ldy, n_tok, n_in, n_out, threads,
              seen: dict) -> None:
    """Post one decode product (n_tok <= GEMV_TOKENS[-1]) as a team job: a part per
    MIN_WORK_PER_PART of work, at most two per thread (parts are taken first come, first
    served, which evens out a slow thread). `seen` holds x rounded as the weights' types
    need it (shared by the products of one x)."""
    T = 1 if n_tok == 1 or _vec_dot_rows(p, n_out) else GEMV_TOKENS[-1]
    parts = n_out * n_in * (1 + n_tok // 2) // MIN_WORK_PER_PART
    parts = max(1, min(parts, 2 * threads if threads > 1 else 1, n_out))
    if T == 1 and p.int_dot:
        xq = _x_for(p, x, n_in, seen, True)
        part = repack.gemv_part(p.t) if repack.repacked(p.t, n_out) else p.gemvq_part
        jobs.add(part, parts, id(w), w.strides[0], id(xq), id(y), n_out,
                 n_in // p.vblock)
        return
    x = _x_for(p, x, n_in, seen, False)
    jobs.add(p.gemv_part[T], parts, id(w), w.strides[0], id(x), n_in, id(y), ldy, n_tok,
             n_out, n_in // p.vblock)


def matmul(w: np.ndarray, wtype: GGMLType, x: np.ndarray, threads: int | None = None,
           out: np.ndarray | None = None) -> np.ndarray:
    """y = x @ W.T : `w` is the weight as stored in GGUF, rows of raw bytes (n_out, row_bytes)
    as a uint8 array (a zero-copy view into the memory-mapped file: it is not copied), or a
    float32/float16 (n_out, n_in) array for F32/F16 weights (BF16 as uint16 raw bits); `x`
    float32 (n_tok, n_in) (or (n_in,) -> returns (n_out,)). Returns float32 (n_tok, n_out)."""
    p, w, x, y, ldy, n_tok, n_in, n_out = _prepare(w, wtype, x, out)
    if _special(p, w, x, y, n_tok, n_in, n_out):
        return y
    threads = threads or default_threads()
    r = route(p, n_tok, n_out)
    if r.gemv:
        jobs = job_table()
        seen: dict = {}
        _add_gemv(jobs, p, w, x, y, ldy, n_tok, n_in, n_out, threads, seen)
        jobs.run(threads)
        return y

    if r.int_x:
        xq = round_q8(x, r.x_kind)
        if r.repacked:  # llama.cpp's repacked weights: its order there
            repack.matmul(w, p.t, xq, y, ldy, n_tok, n_in, n_out, threads)
        else:
            run_jobs([prompt_job(p, w, data_address(xq), xq.shape[1], data_address(y), ldy,
                                 n_tok, n_in, n_out, threads)], threads)
        return y
    x = round_activations(x, r.x_kind)  # (None: the float kernels round x as they pack it)
    run_jobs([prompt_job(p, w, data_address(x), n_in, data_address(y), ldy, n_tok, n_in,
                         n_out, threads)], threads)
    return y


def prompt_job(p: _Plan, w: np.ndarray, x: int, ldx: int, y: int, ldy: int, n_tok: int,
               n_in: int, n_out: int, threads: int, scratch: np.ndarray | None = None
               ) -> list[int]:
    """The job record (fn, parts, args) of a prompt's product over `w` (not repacked): `x`
    the address of the tokens as the kernels take them (`round_q8`'s rows, `ldx` bytes
    apart, for integer dot products; else float32 rows of `ldx` floats, rounded as
    `_gemm_rounds` says), `y` of the output rows (`ldy` floats apart). A float product's
    parts work in `scratch` (float32, `prompt_scratch_floats` a part), by default this
    thread's, which must then stay unused until the job is run."""
    ws, nb = w.strides[0], n_in // p.vblock
    parts = row_parts(n_out, threads, _min_rows(n_in * (2 + n_tok // 2)), ROW_ALIGN)
    if p.int_dot:
        return [_gemmq_part(p, n_tok, n_out), parts, data_address(w), ws, x, ldx, y, ldy,
                n_tok, n_tok - _q_rest(p, n_tok), n_out, nb,
                max(1, L2_BUDGET // 2 // ws), ROW_ALIGN]
    per = prompt_scratch_floats(p, n_in)
    if scratch is None:
        scratch = _scratch(per * parts)
    elif scratch.dtype != np.float32 or scratch.size < per * parts:
        raise ValueError(f"a product of {n_in} inputs needs {per * parts} floats of scratch")
    return [p.gemm_ppart, parts, data_address(w), ws, x, ldx, y, ldy, n_tok, n_out, nb,
            _gemm_group(), data_address(scratch), per, ROW_ALIGN]


def prompt_scratch_floats(p: _Plan, n_in: int) -> int:
    """Floats of scratch each part of a float prompt product needs (whole cache lines)."""
    return -(-gemm_scratch_floats(n_in, p.vblock, _gemm_group(), _k_block(p.t)) // 16) * 16


# llama.cpp's CPU backend sends a product over K-quant weights (not repacked) with this many
# tokens or more to its tiled kernel (`ggml-cpu/tiled/`), which sums in another float order
# than vec_dot; False: vec_dot's order for every token count. Read from llama.cpp's own
# switch, so that GGML_CPU_TILED_MM=0 gives both tools the same run.
PROMPT_TILED = _env_int("GGML_CPU_TILED_MM", 1) != 0
TILED_MIN_TOKENS = 8


def _prompt_order(p: _Plan, n_tok: int, n_out: int) -> str:
    """The kernel whose float order llama.cpp's CPU backend gives a product of `n_tok`
    tokens over `n_out` rows of p's weights: "tiled" or "vec_dot"."""
    if p.tiled and PROMPT_TILED and n_tok >= TILED_MIN_TOKENS:
        return "tiled"
    return "vec_dot"


def _q_rest(p: _Plan, n_tok: int) -> int:
    """Tokens past the last whole tile of a prompt's integer product that go one at a time:
    the legacy types' tile kernel takes a short last tile itself (repeating its last token);
    the K-quants' takes whole tiles only, and one-token calls do the rest (as do the legacy
    types' for a remainder of at most Q_TILE_REST tokens, where a whole tile would cost
    more)."""
    rest = n_tok % p.q_tile
    return rest if quant.get(p.t).int_superblock or rest <= Q_TILE_REST else 0


def _gemmq_part(p: _Plan, n_tok: int, n_out: int) -> int:
    """The prompt job of an integer product: token tiles of `p.q_tile`, rows in blocks that
    stay in L2 while TOKEN_CHUNK tokens go by, in the order of the kernel llama.cpp would
    run (`_prompt_order`) for all of its tokens."""
    return p.gemmqt_ppart if _prompt_order(p, n_tok, n_out) == "tiled" else p.gemmq_ppart


def matmuls(weights: list[tuple[np.ndarray, GGMLType]], x: np.ndarray,
            threads: int | None = None) -> list[np.ndarray]:
    """`[matmul(w, t, x) for w, t in weights]`; when decoding, in one hand-off to the
    threads (the Q, K, V or gate and up products of a layer read the same x)."""
    threads = threads or default_threads()
    n_tok = x.shape[0] if x.ndim == 2 else 1
    if (n_tok > GEMV_TOKENS[-1] or len(weights) > MAX_JOBS
            or (n_tok > 1 and any(_plan(t).int_dot for _, t in weights))):
        return [matmul(w, t, x, threads) for w, t in weights]
    jobs, ys, seen = job_table(), [], {}
    for w, t in weights:
        p, w, xx, y, ldy, n_tok, n_in, n_out = _prepare(w, t, x, None)
        if not _special(p, w, xx, y, n_tok, n_in, n_out):
            _add_gemv(jobs, p, w, xx, y, ldy, n_tok, n_in, n_out, threads, seen)
            ys.append((y, w, xx))  # the arrays stay alive until the jobs have run
        else:
            ys.append((y,))
    jobs.run(threads)
    return [r[0] for r in ys]


def quantizes_activations(wtype: GGMLType) -> bool:
    """Whether one-token products over `wtype` run on integer dot products (x rounded to
    the type's `activation_type` in the integer form); every product rounds x the same way."""
    return _plan(wtype).int_dot


def get_rows(w: np.ndarray, wtype: GGMLType, ids: np.ndarray) -> np.ndarray:
    """Embedding lookup: rows `ids` of the weight, dequantized: float32 (len(ids), n_in)."""
    p = _plan(wtype)
    w = p.weight(w)
    n_in = w.shape[1] * w.itemsize // p.type_size * p.block
    ids = np.asarray(ids).reshape(-1)
    if ids.size and (ids.min() < -w.shape[0] or ids.max() >= w.shape[0]):
        raise UserError(f"row id out of range for a weight of {w.shape[0]} rows")
    rows = w[ids]  # only the rows asked for are copied
    if rows.dtype == np.float32:
        return rows
    if rows.dtype == np.float16:
        return rows.astype(np.float32)
    return quant.get(p.t).dequantize(rows.view(np.uint8)).reshape(len(ids), n_in)


class Products:
    """One-token products of a fixed input `x` into fixed outputs `ys`, posted once and run
    again for every token: when decoding, a layer's weights and buffers never move, so
    what `matmuls` works out per call (checks, plans, rounding buffers, the job table) is
    done here once. `run()` rounds x as the weights need it and computes every y."""

    def __init__(self, weights: list[tuple[np.ndarray, GGMLType]], x: np.ndarray,
                 ys: list[np.ndarray], threads: int | None = None):
        if x.ndim != 1 or len(ys) != len(weights):
            raise ValueError("Products takes one token's x and an output per weight")
        self.threads = threads or default_threads()
        self.x = x
        self.table = JobTable()
        self.keep: list = [x, ys]  # every array the jobs read by address stays alive
        # first which roundings the products need (the kinds, and integer or float form),
        # then this object's own buffer for each: `_add_gemv` finds them in `seen`
        probe: dict = {}
        self.rounds: list[tuple[GGMLType | None, bool, np.ndarray]] = []
        seen: dict = {}
        for (w, t), y in zip(weights, ys):
            p, w, xx, y, ldy, n_tok, n_in, n_out = _prepare(w, t, x, y)
            if _special(p, w, xx, y, n_tok, n_in, n_out):
                raise ValueError(f"no one-token kernel for a {p.name} weight of {w.shape}")
            _add_gemv(self.table, p, w, xx, y, ldy, 1, n_in, n_out, self.threads, probe)
            self.table.n = 0
            for key in probe.keys() - seen.keys():
                act, int_path = key
                if int_path:
                    buf = np.empty((1, xq_row_bytes(n_in)), np.uint8)
                elif act in _Q8_KINDS or act in _HALF_KINDS:
                    buf = np.empty_like(x)
                else:
                    buf = x  # the float kernels read x as it is
                seen[key] = buf
                self.rounds.append((act, int_path, buf))
            self.keep.append(w)
        for (w, t), y in zip(weights, ys):
            p, w, xx, y, ldy, n_tok, n_in, n_out = _prepare(w, t, x, y)
            _add_gemv(self.table, p, w, xx, y, ldy, 1, n_in, n_out, self.threads, seen)
        self.n_jobs, self.table.n = self.table.n, 0
        self.keep.append(self.rounds)

    def run(self) -> None:
        x, n_in = self.x, self.x.shape[0]
        for act, int_path, buf in self.rounds:
            if int_path or act in _HALF_KINDS:
                _act_kernels()[act](x, 1, n_in, buf)
            elif buf is not x:
                buf[...] = round_activations(x, act)
        team(self.threads).run(self.table.addr, self.n_jobs)
