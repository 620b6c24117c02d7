"""llama.cpp's CPU element-wise steps, compiled where numpy's float functions are not
ggml's: SwiGLU with ggml's vectorised exp (`ggml_v_expf`, the same emitter the attention
kernel uses), so the activations that the next product rounds to 8 bits are ggml's bits;
and llama-perplexity's softmax sums (libm's expf of each logit, summed in double in order)."""

from __future__ import annotations

import ctypes
from functools import cache

import numpy as np
from llvmlite import ir

from ..jit import compile_kernels, parallel_rows
from ..jit.builders import const, f32, f64, for_range, i16, i64, ptr, void
from .attention import emit_v_expf
from .kernels import _export, _internal

AVX_FLOATS = 8  # ggml's vector width on AVX2: the last n % 8 of a row take libm's expf
MIN_VALUES = 1 << 15  # per thread: fewer are not worth a hand-off


def _build_swiglu(m: ir.Module) -> None:
    """swiglu(g, u, y, r0, r1, n): y = silu(g) * u in rows [r0, r1) of n (arrays passed as
    ndarray objects), silu(x) = x / (1 + e^-x): ggml_vec_swiglu_f32 on AVX2 (ggml_v_expf
    for whole vectors of 8, expf for the tail)."""
    fn = _internal(m, "swiglu", [ptr(f32), ptr(f32), ptr(f32), i64, i64, i64])
    g, u, y, r0, r1, n = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    expf = ir.Function(m, ir.FunctionType(f32, [f32]), "expf")
    c0 = const(i64, 0)
    whole = b.mul(b.sdiv(n, const(i64, AVX_FLOATS)), const(i64, AVX_FLOATS))
    one = ir.Constant(f32, 1.0)

    def step(i, exp):
        x = b.load(b.gep(g, [i]))
        e = exp(b.fsub(ir.Constant(f32, 0.0), x))
        b.store(b.fmul(b.fdiv(x, b.fadd(one, e)), b.load(b.gep(u, [i]))), b.gep(y, [i]))

    with for_range(b, r0, r1, name="r") as r:
        base = b.mul(r, n)
        with for_range(b, c0, whole, name="i") as i:
            step(b.add(base, i), lambda v: emit_v_expf(b, v))
        with for_range(b, whole, n, name="t") as i:
            step(b.add(base, i), lambda v: b.call(expf, [v]))
    b.ret_void()
    _export(m, "swiglu", fn)


def _build_max_sum_exp(m: ir.Module) -> None:
    """max_sum_exp(x, top, total, n_rows, n): per row of n logits, top = the largest and
    total = Σ expf(x - top) in double, term by term in order, as llama-perplexity sums its
    softmax (libm's expf: the same function its build calls)."""
    fn = ir.Function(m, ir.FunctionType(void, [ptr(f32), ptr(f32), ptr(f64), i64, i64]),
                     "max_sum_exp")
    x, top, total, n_rows, n = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    expf = m.globals.get("expf") or ir.Function(m, ir.FunctionType(f32, [f32]), "expf")
    c0 = const(i64, 0)
    with for_range(b, c0, n_rows, name="r") as r:
        row = b.gep(x, [b.mul(r, n)])
        hi = b.alloca(f32)
        b.store(b.load(row), hi)
        with for_range(b, const(i64, 1), n, name="i") as i:
            v, h = b.load(b.gep(row, [i])), b.load(hi)
            b.store(b.select(b.fcmp_ordered(">", v, h), v, h), hi)
        h = b.load(hi)
        acc = b.alloca(f64)
        b.store(ir.Constant(f64, 0.0), acc)
        with for_range(b, c0, n, name="j") as j:
            e = b.call(expf, [b.fsub(b.load(b.gep(row, [j])), h)])
            b.store(b.fadd(b.load(acc), b.fpext(e, f64)), acc)
        b.store(h, b.gep(top, [r]))
        b.store(b.load(acc), b.gep(total, [r]))
    b.ret_void()


def _emit_row_width(b: ir.IRBuilder, n: ir.Value) -> ir.Value:
    """`row_width(n)` in IR: the words of a base row for n logits."""
    c2 = const(i64, 2)
    return b.add(b.mul(b.sdiv(b.add(n, const(i64, 1)), c2), c2), const(i64, 4))


def _build_kld_sums(m: ir.Module) -> None:
    """kld_sums(x, base, norm, out, n_rows, n): per row of n logits x and its base row (the
    uint16 words of llama-perplexity's base file: scale and min_log_prob as two floats, then
    the codes), with norm = top + log Σ exp of x: out[0] = Σ p_base (log p_base - log p) in
    double over the entries whose base log-prob is above -16, in order (libm's expf, float
    arithmetic unfused, as llama-perplexity computes it), out[1] = the first index of the
    base's largest log-prob. `out` holds two doubles a row."""
    fn = ir.Function(m, ir.FunctionType(void, [ptr(f32), ptr(i16), ptr(f32), ptr(f64), i64,
                                               i64]), "kld_sums")
    x, base, norm, out, n_rows, n = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    expf = m.globals.get("expf") or ir.Function(m, ir.FunctionType(f32, [f32]), "expf")
    c0 = const(i64, 0)
    words = _emit_row_width(b, n)
    acc, best, where = b.alloca(f64), b.alloca(f32), b.alloca(i64)
    with for_range(b, c0, n_rows, name="r") as r:
        row, xr = b.gep(base, [b.mul(r, words)]), b.gep(x, [b.mul(r, n)])
        head = b.bitcast(row, ptr(f32))
        scale, low = b.load(head), b.load(b.gep(head, [const(i64, 1)]))
        codes = b.gep(row, [const(i64, 4)])
        top = b.load(b.gep(norm, [r]))
        b.store(ir.Constant(f64, 0.0), acc)
        b.store(ir.Constant(f32, float("-inf")), best)
        b.store(c0, where)
        with for_range(b, c0, n, name="i") as i:
            q = b.uitofp(b.load(b.gep(codes, [i])), f32)
            lp = b.fadd(b.fmul(scale, q), low)
            better = b.or_(b.icmp_signed("==", i, c0), b.fcmp_ordered(">", lp, b.load(best)))
            b.store(b.select(better, lp, b.load(best)), best)
            b.store(b.select(better, i, b.load(where)), where)
            with b.if_then(b.fcmp_ordered(">", lp, ir.Constant(f32, -16.0))):
                p = b.call(expf, [lp])
                term = b.fmul(p, b.fadd(b.fsub(lp, b.load(b.gep(xr, [i]))), top))
                b.store(b.fadd(b.load(acc), b.fpext(term, f64)), acc)
        o = b.gep(out, [b.mul(r, const(i64, 2))])
        b.store(b.load(acc), o)
        b.store(b.sitofp(b.load(where), f64), b.gep(o, [const(i64, 1)]))
    b.ret_void()


def _build_kld_codes(m: ir.Module) -> None:
    """kld_codes(x, low, inv, out, n_rows, n): the codes of a base row as llama-perplexity
    writes them: round-half-even(inv * (x - low)) where x > low, else 0, into the uint16
    words after each row's two header floats (same row layout as kld_sums)."""
    fn = ir.Function(m, ir.FunctionType(void, [ptr(f32), ptr(f32), ptr(f32), ptr(i16), i64,
                                               i64]), "kld_codes")
    x, low, inv, out, n_rows, n = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    c0 = const(i64, 0)
    words = _emit_row_width(b, n)
    roundeven = m.globals.get("llvm.roundeven.f32") or ir.Function(
        m, ir.FunctionType(f32, [f32]), "llvm.roundeven.f32")
    with for_range(b, c0, n_rows, name="r") as r:
        xr, codes = b.gep(x, [b.mul(r, n)]), b.gep(out, [b.add(b.mul(r, words), const(i64, 4))])
        lo, k = b.load(b.gep(low, [r])), b.load(b.gep(inv, [r]))
        with for_range(b, c0, n, name="i") as i:
            v = b.load(b.gep(xr, [i]))
            q = b.fptosi(b.call(roundeven, [b.fmul(k, b.fsub(v, lo))]), ir.IntType(32))
            q = b.select(b.fcmp_ordered(">", v, lo), b.trunc(q, i16), const(i16, 0))
            b.store(q, b.gep(codes, [i]))
    b.ret_void()


def _build_rms_norm(m: ir.Module) -> None:
    """rms_norm(x, w, y, r0, r1, n, eps): y = x * (1 / sqrtf(mean + eps)) * w in rows
    [r0, r1) of n (arrays passed as ndarray objects), as ggml's rms_norm then its mul: the
    float squares summed in double in order, the mean back in float, x scaled, then times
    the weight."""
    fn = _internal(m, "rms_norm", [ptr(f32), ptr(f32), ptr(f32), i64, i64, i64, f32])
    x, w, y, r0, r1, n, eps = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    sqrtf = m.globals.get("llvm.sqrt.f32") or ir.Function(m, ir.FunctionType(f32, [f32]),
                                                         "llvm.sqrt.f32")
    c0 = const(i64, 0)
    acc = b.alloca(f64)
    with for_range(b, r0, r1, name="r") as r:
        xr, yr = b.gep(x, [b.mul(r, n)]), b.gep(y, [b.mul(r, n)])
        b.store(ir.Constant(f64, 0.0), acc)
        with for_range(b, c0, n, name="i") as i:
            v = b.load(b.gep(xr, [i]))
            b.store(b.fadd(b.load(acc), b.fpext(b.fmul(v, v), f64)), acc)
        mean = b.fptrunc(b.fdiv(b.load(acc), b.sitofp(n, f64)), f32)
        scale = b.fdiv(ir.Constant(f32, 1.0), b.call(sqrtf, [b.fadd(mean, eps)]))
        with for_range(b, c0, n, name="j") as j:
            v = b.fmul(b.load(b.gep(xr, [j])), scale)
            b.store(b.fmul(v, b.load(b.gep(w, [j]))), b.gep(yr, [j]))
    b.ret_void()
    _export(m, "rms_norm", fn)


def _build_soft_max(m: ir.Module) -> None:
    """soft_max(x, _, y, r0, r1, n): in rows [r0, r1) of n (ndarray objects), y = e^(x -
    max) / Σ, as ggml_soft_max computes it after its scale and mask: the max in order,
    ggml_v_expf 8 at a time with each vector's lanes added in AVX2's tree (upper half onto
    lower, then movehl, then movehdup) and the vector sums added in double, libm's expf for
    the tail, then y times the float of 1 / Σ (computed in double)."""
    fn = _internal(m, "soft_max", [ptr(f32), ptr(f32), ptr(f32), i64, i64, i64])
    x, _, y, r0, r1, n = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    expf = m.globals.get("expf") or ir.Function(m, ir.FunctionType(f32, [f32]), "expf")
    c0 = const(i64, 0)
    top, acc = b.alloca(f32), b.alloca(f64)
    whole = b.mul(b.sdiv(n, const(i64, AVX_FLOATS)), const(i64, AVX_FLOATS))
    with for_range(b, r0, r1, name="r") as r:
        xr, yr = b.gep(x, [b.mul(r, n)]), b.gep(y, [b.mul(r, n)])
        b.store(ir.Constant(f32, float("-inf")), top)
        with for_range(b, c0, n, name="m") as i:  # MAX(max, x): the larger, max on ties
            v, t = b.load(b.gep(xr, [i])), b.load(top)
            b.store(b.select(b.fcmp_ordered(">", t, v), t, v), top)
        mx = b.load(top)
        b.store(ir.Constant(f64, 0.0), acc)
        with for_range(b, c0, whole, AVX_FLOATS, name="v") as i0:
            e = []
            for lane in range(AVX_FLOATS):
                at = b.add(i0, const(i64, lane))
                e.append(emit_v_expf(b, b.fsub(b.load(b.gep(xr, [at])), mx)))
                b.store(e[-1], b.gep(yr, [at]))
            s = b.fadd(b.fadd(b.fadd(e[0], e[4]), b.fadd(e[2], e[6])),
                       b.fadd(b.fadd(e[1], e[5]), b.fadd(e[3], e[7])))
            b.store(b.fadd(b.load(acc), b.fpext(s, f64)), acc)
        with for_range(b, whole, n, name="t") as i:
            e = b.call(expf, [b.fsub(b.load(b.gep(xr, [i])), mx)])
            b.store(e, b.gep(yr, [i]))
            b.store(b.fadd(b.load(acc), b.fpext(e, f64)), acc)
        inv = b.fptrunc(b.fdiv(ir.Constant(f64, 1.0), b.load(acc)), f32)
        with for_range(b, c0, n, name="s") as i:
            p = b.gep(yr, [i])
            b.store(b.fmul(b.load(p), inv), p)
    b.ret_void()
    _export(m, "soft_max", fn)


def _build_tanh(m: ir.Module) -> None:
    """tanh(x, _, y, r0, r1, n): y = libm's tanhf(x) in rows [r0, r1) of n, as ggml_tanh."""
    fn = _internal(m, "tanh", [ptr(f32), ptr(f32), ptr(f32), i64, i64, i64])
    x, _, y, r0, r1, n = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    tanhf = m.globals.get("tanhf") or ir.Function(m, ir.FunctionType(f32, [f32]), "tanhf")
    with for_range(b, b.mul(r0, n), b.mul(r1, n), name="i") as i:
        b.store(b.call(tanhf, [b.load(b.gep(x, [i]))]), b.gep(y, [i]))
    b.ret_void()
    _export(m, "tanh", fn)


_SIG = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 3, ctypes.c_int64, ctypes.c_int64)
_A3 = [ctypes.py_object] * 3  # ndarray objects
_SIG_GLU = ctypes.CFUNCTYPE(None, *_A3, *[ctypes.c_int64] * 3)
_SIG_NORM = ctypes.CFUNCTYPE(None, *_A3, *[ctypes.c_int64] * 3, ctypes.c_float)
_SIG4 = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 4, ctypes.c_int64, ctypes.c_int64)


@cache
def _kernels() -> dict:
    def build() -> ir.Module:
        m = ir.Module(name="ops")
        for step in (_build_swiglu, _build_max_sum_exp, _build_kld_sums, _build_kld_codes,
                     _build_rms_norm, _build_soft_max, _build_tanh):
            step(m)
        return m

    return compile_kernels(build, key="ops", signatures={
        "swiglu": _SIG_GLU, "max_sum_exp": _SIG, "kld_sums": _SIG4, "kld_codes": _SIG4,
        "rms_norm": _SIG_NORM, "soft_max": _SIG_GLU, "tanh": _SIG_GLU})


def swiglu(gate: np.ndarray, up: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """silu(gate) * up, as llama.cpp's CPU computes it (float32, gate's shape); into `out`
    (contiguous float32, that shape) when given."""
    g = np.ascontiguousarray(gate, np.float32)
    u = np.ascontiguousarray(up, np.float32)
    if g.shape != u.shape:
        raise ValueError(f"swiglu of {g.shape} and {u.shape}")
    y = _out(out, g)
    n = max(g.shape[-1] if g.ndim else 1, 1)
    _by_rows(_kernels()["swiglu"], g.size // n, n, g, u, y)
    return y


def tanh(x: np.ndarray) -> np.ndarray:
    """libm's tanhf of every element (ggml_tanh on the CPU), float32, x's shape."""
    x = np.ascontiguousarray(x, np.float32)
    y = np.empty_like(x)
    n = max(x.shape[-1] if x.ndim else 1, 1)
    _by_rows(_kernels()["tanh"], x.size // n, n, x, x, y)
    return y


def soft_max(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """ggml's soft_max of each row of x (the last axis), float32, after its scale and mask
    (apply those first: x * scale + mask, masked entries -inf); into `out` when given."""
    x = np.ascontiguousarray(x, np.float32)
    y = _out(out, x)
    n = max(x.shape[-1] if x.ndim else 1, 1)
    _by_rows(_kernels()["soft_max"], x.size // n, n, x, x, y)
    return y


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float, out: np.ndarray | None = None
             ) -> np.ndarray:
    """ggml's rms_norm of each row of x (the last axis) times the weight w (one value per
    column), in float32 with x's shape; into `out` when given (it may be x itself)."""
    x = np.ascontiguousarray(x, np.float32)
    wt = np.ascontiguousarray(w, np.float32)
    n = x.shape[-1]
    if wt.shape != (n,):
        raise ValueError(f"rms_norm of rows of {n} with a weight of shape {wt.shape}")
    y = _out(out, x)
    _by_rows(_kernels()["rms_norm"], x.size // max(n, 1), n, x, wt, y, eps)
    return y


def _out(out: np.ndarray | None, like: np.ndarray) -> np.ndarray:
    if out is None:
        return np.empty_like(like)
    if out.shape != like.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be contiguous float32 {like.shape}, got {out.dtype} "
                         f"{out.shape}")
    return out


def _by_rows(fn, n_rows: int, n: int, a, b, y, *extra) -> None:
    """fn(a, b, y, r0, r1, n, *extra) over the rows, split across the threads when they
    are many."""
    if n_rows * n <= MIN_VALUES:
        fn(a, b, y, 0, n_rows, n, *extra)
    else:
        parallel_rows(lambda r0, r1: fn(a, b, y, r0, r1, n, *extra), n_rows,
                      min_rows=max(1, MIN_VALUES // n))


def _row_addresses(*arrays: np.ndarray):
    """row -> the address of that row in each of `arrays` (C-contiguous). Read from the
    array interface, not `.ctypes`: that makes a reference cycle which keeps the array
    (a chunk's logits, tens of MB) alive until the garbage collector next runs."""
    base = [(a.__array_interface__["data"][0], a.strides[0]) for a in arrays]
    return lambda row: [p + row * s for p, s in base]


def max_sum_exp(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of `logits` (n_rows, n_vocab): the top logit (float32) and Σ expf(x - top)
    (float64), as llama-perplexity's softmax computes them; rows split across the threads."""
    x = np.ascontiguousarray(logits, np.float32)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"max_sum_exp takes (n_rows, n_vocab) logits, got {x.shape}")
    n_rows, n = x.shape
    top, total = np.empty(n_rows, np.float32), np.empty(n_rows, np.float64)
    fn = _kernels()["max_sum_exp"]
    at = _row_addresses(x, top, total)
    parallel_rows(lambda a, c: fn(*at(a), c - a, n), n_rows)
    return top, total


def row_width(n_vocab: int) -> int:
    """uint16 words per scored token of a KL-divergence base (llama-perplexity's format):
    two floats, then the codes padded to an even count."""
    return 2 * ((n_vocab + 1) // 2) + 4


def kld_sums(logits: np.ndarray, base_rows: np.ndarray, norm: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the KL-divergence of `logits` (n_rows, n_vocab) from its base row (uint16
    words as in a base file) given norm = top + log Σ exp of the logits (float32), and the
    index of the base's top entry; as llama-perplexity computes them (see kld_sums)."""
    x = np.ascontiguousarray(logits, np.float32)
    rows = np.ascontiguousarray(base_rows, np.uint16)
    nm = np.ascontiguousarray(norm, np.float32)
    n_rows, n = x.shape
    if rows.shape != (n_rows, row_width(n)) or nm.shape != (n_rows,):
        raise ValueError(f"kld_sums of {x.shape} logits, {rows.shape} base rows, {nm.shape}")
    out = np.empty((n_rows, 2), np.float64)
    fn = _kernels()["kld_sums"]
    at = _row_addresses(x, rows, nm, out)
    parallel_rows(lambda a, c: fn(*at(a), c - a, n), n_rows)
    return out[:, 0], out[:, 1].astype(np.int64)


def kld_codes(logits: np.ndarray, low: np.ndarray, inv: np.ndarray, out: np.ndarray) -> None:
    """Fill the codes of base rows `out` (uint16, n_rows x row width) from `logits`, each
    row's lowest kept logit `low` and inverse step `inv` (float32; see kld_codes)."""
    x = np.ascontiguousarray(logits, np.float32)
    lo, k = np.ascontiguousarray(low, np.float32), np.ascontiguousarray(inv, np.float32)
    n_rows, n = x.shape
    if out.shape != (n_rows, row_width(n)) or not out.flags.c_contiguous:
        raise ValueError(f"kld_codes into {out.shape} rows for {x.shape} logits")
    fn = _kernels()["kld_codes"]
    at = _row_addresses(x, lo, k, out)
    parallel_rows(lambda a, c: fn(*at(a), c - a, n), n_rows)
