"""A decoding step as one compiled call.

Decoding a small model is mostly hand-offs: SmolLM2-135M makes about 300 products, norms,
rotations and cache writes a token, each a few microseconds of arithmetic. Called one by
one from Python, the calls and the waits between them cost more than the arithmetic, and
the other threads idle meanwhile. A `Program` is the step written out once: phases of team
jobs (`jit.parallel`), each finished before the next begins, the serial pieces between
them (norms, RoPE, the cache writes, rounding x for the next products) as lists of steps
one thread runs. Per token only the words that depend on the position change: `run(p0=...)`
writes them (each `base + mult * value`) and hands the whole step to the team.

The steps call the same compiled functions the general route calls, so the bits are the
same (tested against `Model.forward`'s general route).
"""

from __future__ import annotations

import ctypes
from functools import cache

import numpy as np
from llvmlite import ir

from ..jit import compile_kernels
from ..jit.builders import Target, const, f32, for_range, i64, ptr, void
from ..jit.floats import emit_f16_to_f32, emit_f32_to_f16, hardware_half
from ..jit.parallel import JOB_ARGS, JOB_WORDS, STEP_ARGS, Team, emit_part_rows, steps_part
from . import ops


class Program:
    """Phases of jobs run in order by a thread team. Build it with `parallel` (a job table)
    and `step` (a serial step, gathered with the steps around it into one one-part job);
    `where`s returned by both name a word that `vary` makes depend on a variable."""

    def __init__(self):
        self._phases: list[list[list[int]]] = []  # each: job records (JOB_WORDS ints)
        self._serial: list[list[list[int]] | None] = []  # a phase's steps, if serial
        self._vary: dict[str, list[tuple[tuple[int, ...], int, int]]] = {}
        self.keep: list = []  # what the words point at stays alive with the program
        self._words: np.ndarray | None = None

    def parallel(self, records: np.ndarray | list[list[int]]) -> tuple[int, int]:
        """A phase of these job records (fn, parts, args: at most JOB_WORDS words each, the
        args not given 0): returns its index."""
        recs = [list(map(int, r)) + [0] * (JOB_WORDS - len(r)) for r in records]
        if any(len(r) != JOB_WORDS for r in recs):
            raise ValueError(f"a job record is at most {JOB_WORDS} words")
        self._phases.append(recs)
        self._serial.append(None)
        return len(self._phases) - 1, 0

    def job(self, fn: int, parts: int, *args: int) -> tuple[int, int]:
        """A phase of one job: `where` of its first argument word is (phase, 0) + (2 + k)."""
        if len(args) > JOB_ARGS:
            raise ValueError(f"a job takes at most {JOB_ARGS} arguments")
        return self.parallel([[fn, parts, *args, *(0,) * (JOB_ARGS - len(args))]])

    def step(self, fn: int, *args: int) -> tuple[int, int]:
        """A serial step after what came before; returns (phase, step index)."""
        if len(args) > STEP_ARGS:
            raise ValueError(f"a step takes at most {STEP_ARGS} arguments")
        if not self._serial or self._serial[-1] is None:
            self._phases.append([])
            self._serial.append([])
        steps = self._serial[-1]
        steps.append([fn, *args, *(0,) * (STEP_ARGS - len(args))])
        return len(self._phases) - 1, len(steps) - 1

    def vary(self, var: str, where: tuple[int, int], word: int, base: int = 0,
             mult: int = 1) -> None:
        """Word `word` of the record or step at `where` becomes base + mult * var on each
        run (for a job record: word 2 is its first argument; for a step: word 1); a word
        varied by several variables is the sum of their terms."""
        self._vary.setdefault(var, []).append((where, word, base, mult))

    def build(self) -> Program:
        """Lay the program out in one array of words: the phase table, the job records,
        the step lists; after this, `run`."""
        n_ph = len(self._phases)
        n_rec = sum(max(1, len(r)) if s is None else 1
                    for r, s in zip(self._phases, self._serial))
        n_steps = sum(1 + len(s) * (1 + STEP_ARGS) for s in self._serial if s is not None)
        words = np.zeros(2 * n_ph + n_rec * JOB_WORDS + n_steps, np.int64)
        addr = words.ctypes.data
        at_rec = 2 * n_ph
        at_step = at_rec + n_rec * JOB_WORDS
        where: dict[tuple[int, int], int] = {}  # (phase, record or step) -> word index
        for k, (recs, steps) in enumerate(zip(self._phases, self._serial)):
            words[2 * k] = addr + 8 * at_rec
            if steps is None:
                words[2 * k + 1] = len(recs)
                for j, rec in enumerate(recs):
                    where[k, j] = at_rec
                    words[at_rec:at_rec + JOB_WORDS] = rec
                    at_rec += JOB_WORDS
            else:
                words[2 * k + 1] = 1
                words[at_rec:at_rec + 3] = [steps_part(), 1, addr + 8 * at_step]
                at_rec += JOB_WORDS
                words[at_step] = len(steps)
                at_step += 1
                for j, st in enumerate(steps):
                    where[k, j] = at_step
                    words[at_step:at_step + 1 + STEP_ARGS] = st
                    at_step += 1 + STEP_ARGS
        self._words, self._n_phases = words, n_ph
        bases: dict[int, int] = {}  # each varied word: the sum of its terms' bases
        self._patches = {}
        for var, items in self._vary.items():
            idx = [where[w] + word for w, word, _, _ in items]
            if len(set(idx)) < len(idx):
                raise ValueError(f"a word varies twice by {var!r}")
            for i, (_, _, b, _) in zip(idx, items):
                bases[i] = bases.get(i, 0) + b
            self._patches[var] = (np.array(idx, np.int64),
                                  np.array([m for _, _, _, m in items], np.int64))
        self._bases = (np.array(list(bases), np.int64), np.array(list(bases.values()), np.int64))
        return self

    def run(self, team: Team, **values: int) -> None:
        """Set the varying words from `values` (every variable `vary` named) and run the
        phases on `team`."""
        words = self._words
        words[self._bases[0]] = self._bases[1]
        for var, (idx, mult) in self._patches.items():
            words[idx] += mult * values[var]
        team.run_program(words.ctypes.data, self._n_phases)


# -- the serial steps' own kernels: plain pointers and integers only (see STEP_ARGS) --------


def _build(m: ir.Module) -> None:
    ops._build_rms_norm(m)
    ops._build_swiglu(m)
    # rms_norm_steps(x, w, y, n_rows, n, eps bits): ops.rms_norm over whole rows
    fn = ir.Function(m, ir.FunctionType(void, [i64] * 6), "rms_norm_step")
    x, w, y, rows, n, eps = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    impl = m.globals["rms_norm.impl"]
    p = lambda v: b.inttoptr(v, ptr(f32))  # noqa: E731
    b.call(impl, [p(x), p(w), p(y), const(i64, 0), rows, n,
                  b.bitcast(b.trunc(eps, ir.IntType(32)), f32)])
    b.ret_void()
    # swiglu_step(g, u, y, n)
    fn = ir.Function(m, ir.FunctionType(void, [i64] * 4), "swiglu_step")
    g, u, y, n = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    b.call(m.globals["swiglu.impl"], [p(g), p(u), p(y), const(i64, 0), const(i64, 1), n])
    b.ret_void()
    # add_step(a, c, y, n): y = a + c, float32
    fn = ir.Function(m, ir.FunctionType(void, [i64] * 4), "add_step")
    a, c, y, n = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    with for_range(b, const(i64, 0), n) as i:
        b.store(b.fadd(b.load(b.gep(p(a), [i])), b.load(b.gep(p(c), [i]))),
                b.gep(p(y), [i]))
    b.ret_void()
    # geglu_step(g, u, y, n, table): y = gelu(g) * u, GELU as ggml's CPU looks it up (see
    # model.gelu_ggml): `table` (65536 floats) at g's fp16 bits, 0 from -10 down, g from 10 up
    fn = ir.Function(m, ir.FunctionType(void, [i64] * 5), "geglu_step")
    g, u, y, n, table = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    hw = hardware_half(Target.CPU)
    with for_range(b, const(i64, 0), n) as i:
        x = b.load(b.gep(p(g), [i]))
        bits = b.zext(emit_f32_to_f16(b, x, hw), i64)
        v = b.load(b.gep(p(table), [bits]))
        v = b.select(b.fcmp_ordered(">=", x, ir.Constant(f32, 10.0)), x, v)
        v = b.select(b.fcmp_ordered("<=", x, ir.Constant(f32, -10.0)), ir.Constant(f32, 0.0), v)
        b.store(b.fmul(v, b.load(b.gep(p(u), [i]))), b.gep(p(y), [i]))
    b.ret_void()
    # store_f16_step(x, dst, n_rows, n, dst_stride, x_stride): rows of x (n floats each,
    # x_stride apart; 0: n) rounded to fp16 (nearest even, as numpy's astype) and stored as
    # float32 into rows dst_stride floats apart: a KV cache column
    fn = ir.Function(m, ir.FunctionType(void, [i64] * 6), "store_f16_step")
    x, dst, rows, n, stride, xs = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    hw = hardware_half(Target.CPU)
    xs = b.select(b.icmp_signed("==", xs, const(i64, 0)), n, xs)
    with for_range(b, const(i64, 0), rows, name="r") as r:
        src = b.gep(p(x), [b.mul(r, xs)])
        out = b.gep(p(dst), [b.mul(r, stride)])
        with for_range(b, const(i64, 0), n, name="i") as i:
            h = emit_f32_to_f16(b, b.load(b.gep(src, [i])), hw)
            b.store(emit_f16_to_f32(b, h, hw), b.gep(out, [i]))
    b.ret_void()


    # bias_step(x, c, y, rows, n): y = x + c, c (n floats) added to each of the rows
    fn = ir.Function(m, ir.FunctionType(void, [i64] * 5), "bias_step")
    x, c, y, rows, n = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    with for_range(b, const(i64, 0), rows, name="r") as r:
        o = b.mul(r, n)
        with for_range(b, const(i64, 0), n, name="i") as i:
            at = b.add(o, i)
            b.store(b.fadd(b.load(b.gep(p(x), [at])), b.load(b.gep(p(c), [i]))),
                    b.gep(p(y), [at]))
    b.ret_void()
    # keys_t_step(k, kt, n_kv, hd, hstride, t, tpad): a layer's keys (n_kv heads, hstride
    # floats apart, rows of hd) transposed into kt (n_kv, hd, tpad) as the tiled attention
    # reads them: positions [0, t), zeros on to tpad
    fn = ir.Function(m, ir.FunctionType(void, [i64] * 7), "keys_t_step")
    k, kt, n_kv, hd, hs, t, tpad = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    zero = ir.Constant(f32, 0.0)
    with for_range(b, const(i64, 0), n_kv, name="j") as j:
        src = b.gep(p(k), [b.mul(j, hs)])
        dst = b.gep(p(kt), [b.mul(b.mul(j, hd), tpad)])
        with for_range(b, const(i64, 0), t, name="s") as s:
            row = b.gep(src, [b.mul(s, hd)])
            with for_range(b, const(i64, 0), hd, name="d") as d:
                b.store(b.load(b.gep(row, [d])), b.gep(dst, [b.add(b.mul(d, tpad), s)]))
        with for_range(b, const(i64, 0), hd, name="d") as d:
            with for_range(b, t, tpad, name="s") as s:
                b.store(zero, b.gep(dst, [b.add(b.mul(d, tpad), s)]))
    b.ret_void()
    # rows_part(args, part, n_parts): a step over rows as a team job. args: fn, n_rows, align,
    # unit, then three (address, byte stride a row) pairs, then up to four more words; the
    # part calls fn(a0 + r0 * s0, a1 + r0 * s1, a2 + r0 * s2, (r1 - r0) * unit, w0, w1, w2,
    # w3) for its rows [r0, r1) (even shares cut at multiples of align)
    fn = ir.Function(m, ir.FunctionType(void, [ptr(i64), i64, i64]), "rows_part")
    argv, part, n_parts = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    a = [b.load(b.gep(argv, [const(i64, k)])) for k in range(14)]
    target, n_rows, align, unit = a[:4]

    r0, r1 = emit_part_rows(b, n_rows, align, part, n_parts)
    call = b.inttoptr(target, ptr(ir.FunctionType(void, [i64] * 8)))
    with b.if_then(b.icmp_signed("<", r0, r1)):
        b.call(call, [*(b.add(a[4 + 2 * q], b.mul(r0, a[5 + 2 * q])) for q in range(3)),
                      b.mul(b.sub(r1, r0), unit), *a[10:14]])
    b.ret_void()


STEPS = ("rms_norm_step", "swiglu_step", "geglu_step", "add_step", "store_f16_step",
         "bias_step", "keys_t_step", "rows_part")


@cache
def kernels() -> dict[str, int]:
    """The steps' kernels by name: their addresses."""
    def build() -> ir.Module:
        m = ir.Module(name="program_steps")
        _build(m)
        return m

    sig = ctypes.CFUNCTYPE(None)
    mod = compile_kernels(build, key="program.steps", signatures=dict.fromkeys(STEPS, sig))
    return {name: ctypes.cast(mod[name], ctypes.c_void_p).value for name in STEPS}


@cache
def _store_fn():
    return ctypes.CFUNCTYPE(None, *[ctypes.c_int64] * 6)(kernels()["store_f16_step"])


def store_f16(x: np.ndarray, cache: np.ndarray, p0: int) -> None:
    """x (n, n_kv, head_dim) float32 rounded to fp16 into a layer's cache (n_kv, n_ctx,
    head_dim; float32 holding fp16 values) at positions p0 .. p0 + n - 1."""
    n, n_kv, hd = x.shape
    if (cache.dtype != np.float32 or not cache.flags.c_contiguous or cache.shape[0] != n_kv
            or cache.shape[2] != hd or not 0 <= p0 <= cache.shape[1] - n):
        raise ValueError(f"{x.shape} at {p0} into a cache of {cache.shape} {cache.dtype}")
    x = np.ascontiguousarray(x, np.float32)
    fn = _store_fn()
    for j in range(n_kv):  # a head's new rows are consecutive cells
        fn(x[0, j].ctypes.data if n else 0, cache[j, p0].ctypes.data if n else 0, n, hd, hd,
           n_kv * hd)


def rows_job(fn: int, n_rows: int, rows: list[tuple[int, int]], more: tuple[int, ...] = (),
             unit: int = 1, parts: int = 1, align: int = 1) -> list[int]:
    """The job record that runs step `fn` over `n_rows` rows in `parts` parts: `rows` are up
    to three (address, bytes a row) pairs, each advanced to a part's first row (a stride of
    0 for what every row shares), then the part's rows times `unit`, then `more` (see
    `rows_part`)."""
    if len(rows) > 3 or len(more) > 4:
        raise ValueError("a rows job takes three row pointers and four more words")
    ptrs = [w for r in (*rows, *[(0, 0)] * (3 - len(rows))) for w in r]
    return [kernels()["rows_part"], max(1, min(parts, n_rows)), fn, n_rows, align, unit,
            *ptrs, *more, *(0,) * (4 - len(more))]


def f32_bits(v: float) -> int:
    return int(np.array([v], np.float32).view(np.int32)[0])
