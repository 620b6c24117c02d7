"""RoPE as llama.cpp's CPU computes it (ggml's `rope` op), to the bit.

ggml builds a table per position: the angle of pair i is the position times
theta_scale = powf(freq_base, -2/n_dims) applied i times in float (a float recurrence, not
pos * base^(-2i/d)), divided by the pair's frequency factor, scaled by freq_scale (YaRN: mixed
with the unscaled angle by a ramp, one FMA), then libm's sincosf, times the attention factor.
The rotation is compiled by GCC with FMA contraction: out0 = fma(x0, cos, -(x1 * sin)),
out1 = fma(x0, sin, x1 * cos). Both are emitted here as the same float operations, so the
rotated q and k (and the keys the cache stores) are ggml's bits."""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass
from functools import cache

import numpy as np
from llvmlite import ir

from ..jit import compile_kernels
from ..jit.builders import alloca_entry, const, f32, for_range, i64, intrinsic, ptr, void


@dataclass(frozen=True)
class RopeParams:
    """The arguments llama.cpp passes to ggml_rope_ext for a layer (float32 values)."""

    n_dims: int  # rotated dims of a head (the rest pass through)
    neox: bool  # pairs (i, i + n_dims/2); else adjacent pairs (2i, 2i + 1)
    freq_base: float
    freq_scale: float = 1.0
    ext_factor: float = 0.0  # YaRN's mix of extrapolated rotation
    attn_factor: float = 1.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    n_ctx_orig: int = 0
    factors: tuple[float, ...] | None = None  # per pair: the angle divided by it


@cache
def _libm() -> ctypes.CDLL:
    lib = ctypes.CDLL(ctypes.util.find_library("m"))
    lib.logf.restype, lib.logf.argtypes = ctypes.c_float, [ctypes.c_float]
    return lib


def logf(x: float) -> np.float32:
    """libm's logf (the one llama.cpp calls), not numpy's."""
    return np.float32(_libm().logf(float(x)))


def yarn_attn_factor(freq_scale: float, rope_attn_factor: float) -> float:
    """The attention factor llama.cpp's context passes with YaRN (ext_factor != 0): its
    mscale for 1 / freq_scale, divided by the 1 + 0.1 ln(factor) that ggml's rope multiplies
    back in, times the file's rope attention factor; float steps as llama-context.cpp's."""
    one, tenth = np.float32(1), np.float32(0.1)
    factor = one / np.float32(freq_scale)
    m = one if factor <= one else tenth * logf(factor) + one
    m = m * (one / (one + tenth * logf(factor)))
    return float(m * np.float32(rope_attn_factor))


def _build_cache(m: ir.Module) -> None:
    """rope_cache(pos, n, n_dims, ff, fparams, n_ctx_orig, out): out[t, 2i], out[t, 2i + 1] =
    cos, sin of pair i at pos[t] as ggml_rope_cache_init (rope_yarn per pair, sin_sign 1);
    fparams = freq_base, freq_scale, ext_factor, attn_factor, beta_fast, beta_slow."""
    fn = ir.Function(m, ir.FunctionType(void, [ptr(i64), i64, i64, ptr(f32), ptr(f32), i64,
                                               ptr(f32)]), "rope_cache")
    pos, n, n_dims, ff, fp, n_ctx_orig, out = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    fty = ir.FunctionType(f32, [f32])
    logf_, floorf, ceilf = (ir.Function(m, fty, s) for s in ("logf", "floorf", "ceilf"))
    powf = ir.Function(m, ir.FunctionType(f32, [f32, f32]), "powf")
    sincosf = ir.Function(m, ir.FunctionType(void, [f32, ptr(f32), ptr(f32)]), "sincosf")
    s_ptr, c_ptr = alloca_entry(b, f32, name="s"), alloca_entry(b, f32, name="c")

    def c(v):
        return ir.Constant(f32, v)

    base, fs, ext, attn, beta_fast, beta_slow = (b.load(b.gep(fp, [const(i64, k)]))
                                                 for k in range(6))
    nd = b.sitofp(n_dims, f32)
    theta_scale = b.call(powf, [base, b.fdiv(c(-2.0), nd)])

    # ggml_rope_yarn_corr_dims: the pairs where the ramp starts and ends
    def corr_dim(n_rot):
        turn = b.fmul(b.fmul(n_rot, c(2.0)), c(float(np.float32(np.pi))))
        ratio = b.fdiv(b.sitofp(n_ctx_orig, f32), turn)
        return b.fdiv(b.fmul(nd, b.call(logf_, [ratio])),
                      b.fmul(c(2.0), b.call(logf_, [base])))

    start, end = b.call(floorf, [corr_dim(beta_fast)]), b.call(ceilf, [corr_dim(beta_slow)])
    low = b.select(b.fcmp_ordered(">", c(0.0), start), c(0.0), start)
    top = b.fsub(nd, c(1.0))
    high = b.select(b.fcmp_ordered("<", top, end), top, end)
    span = b.fsub(high, low)
    span = b.select(b.fcmp_ordered(">", c(0.001), span), c(0.001), span)
    with_ext = b.fcmp_unordered("!=", ext, c(0.0))
    # rope_yarn's magnitude: times 1 + 0.1 logf(1 / freq_scale) (one FMA) with YaRN
    yarn_m = b.fmul(intrinsic(b, "llvm.fma.f32", f32,
                              [c(float(np.float32(0.1))), b.call(logf_, [b.fdiv(c(1.0), fs)]),
                               c(1.0)]), attn)
    mscale = b.select(with_ext, yarn_m, attn)
    half = b.sdiv(n_dims, const(i64, 2))
    with for_range(b, const(i64, 0), n, name="t") as t:
        row = b.gep(out, [b.mul(t, n_dims)])
        theta0 = b.sitofp(b.load(b.gep(pos, [t])), f32)
        pre = b.block
        cond = b.append_basic_block("i.cond")
        body = b.append_basic_block("i.body")
        done = b.append_basic_block("i.end")
        b.branch(cond)
        b.position_at_end(cond)
        i = b.phi(i64, name="i")
        theta = b.phi(f32, name="theta")
        i.add_incoming(const(i64, 0), pre)
        theta.add_incoming(theta0, pre)
        b.cbranch(b.icmp_signed("<", i, half), body, done)
        b.position_at_end(body)
        extrap = b.fdiv(theta, b.load(b.gep(ff, [i])))
        interp = b.fmul(fs, extrap)
        # the ramp: 1 - clamp((i - low) / span, 0, 1), then YaRN's mix of the two angles
        y = b.fdiv(b.fsub(b.sitofp(i, f32), low), span)
        y = b.select(b.fcmp_ordered("<", y, c(0.0)), c(0.0), y)
        y = b.select(b.fcmp_ordered(">", y, c(1.0)), c(1.0), y)
        mix = b.fmul(b.fsub(c(1.0), y), ext)
        mixed = intrinsic(b, "llvm.fma.f32", f32,
                          [interp, b.fsub(c(1.0), mix), b.fmul(extrap, mix)])
        angle = b.select(with_ext, mixed, interp)
        b.call(sincosf, [angle, s_ptr, c_ptr])
        b.store(b.fmul(b.load(c_ptr), mscale), b.gep(row, [b.mul(i, const(i64, 2))]))
        b.store(b.fmul(b.load(s_ptr), mscale),
                b.gep(row, [b.add(b.mul(i, const(i64, 2)), const(i64, 1))]))
        i.add_incoming(b.add(i, const(i64, 1)), b.block)
        theta.add_incoming(b.fmul(theta, theta_scale), b.block)
        b.branch(cond)
        b.position_at_end(done)
    b.ret_void()


def _build_rotate(m: ir.Module) -> None:
    """rope_rotate(x, y, table, n_tok, n_head, head_dim, n_dims, neox): every head of every
    token rotated by its token's row of the table, as ggml's rotate_pairs compiled with FMA;
    dims past n_dims copied."""
    fn = ir.Function(m, ir.FunctionType(void, [ptr(f32), ptr(f32), ptr(f32)] + [i64] * 5),
                     "rope_rotate")
    x, y, table, n_tok, n_head, hd, n_dims, neox = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    half = b.sdiv(n_dims, const(i64, 2))
    is_neox = b.icmp_signed("!=", neox, const(i64, 0))
    stride = b.select(is_neox, const(i64, 1), const(i64, 2))  # where pair i's first dim is
    offset = b.select(is_neox, half, const(i64, 1))  # its partner, that far on
    fma = "llvm.fma.f32"
    with for_range(b, const(i64, 0), n_tok, name="t") as t:
        cs = b.gep(table, [b.mul(t, n_dims)])
        with for_range(b, const(i64, 0), n_head, name="h") as h:
            at = b.mul(b.add(b.mul(t, n_head), h), hd)
            src, dst = b.gep(x, [at]), b.gep(y, [at])
            with for_range(b, const(i64, 0), half, name="i") as i:
                cos = b.load(b.gep(cs, [b.mul(i, const(i64, 2))]))
                sin = b.load(b.gep(cs, [b.add(b.mul(i, const(i64, 2)), const(i64, 1))]))
                a = b.mul(i, stride)
                p = b.add(a, offset)
                x0, x1 = b.load(b.gep(src, [a])), b.load(b.gep(src, [p]))
                b.store(intrinsic(b, fma, f32, [x0, cos, b.fneg(b.fmul(x1, sin))]),
                        b.gep(dst, [a]))
                b.store(intrinsic(b, fma, f32, [x0, sin, b.fmul(x1, cos)]), b.gep(dst, [p]))
            with for_range(b, n_dims, hd, name="j") as j:
                b.store(b.load(b.gep(src, [j])), b.gep(dst, [j]))
    b.ret_void()


_P = ctypes.c_void_p
_SIGS = {
    "rope_cache": ctypes.CFUNCTYPE(None, _P, ctypes.c_int64, ctypes.c_int64, _P, _P,
                                   ctypes.c_int64, _P),
    "rope_rotate": ctypes.CFUNCTYPE(None, _P, _P, _P, *[ctypes.c_int64] * 5),
}


def _build_module() -> ir.Module:
    m = ir.Module(name="rope")
    _build_cache(m)
    _build_rotate(m)
    return m


@cache
def _kernels():
    return compile_kernels(_build_module, _SIGS, key="rope")


def rope_table(p: RopeParams, pos: np.ndarray) -> np.ndarray:
    """(len(pos), n_dims) float32: cos and sin of each pair, interleaved, at each position,
    as ggml_rope_cache_init fills its cache."""
    if p.n_dims % 2 or p.n_dims <= 0:
        raise ValueError(f"RoPE over {p.n_dims} dims: needs an even number")
    pos = np.ascontiguousarray(pos, np.int64)
    half = p.n_dims // 2
    ff = np.ones(half, np.float32) if p.factors is None else np.asarray(p.factors, np.float32)
    if ff.size != half:
        raise ValueError(f"RoPE factors for {ff.size} pairs, need {half}")
    fparams = np.array([p.freq_base, p.freq_scale, p.ext_factor, p.attn_factor, p.beta_fast,
                        p.beta_slow], np.float32)
    out = np.empty((len(pos), p.n_dims), np.float32)
    _kernels()["rope_cache"](pos.ctypes.data, len(pos), p.n_dims, ff.ctypes.data,
                             fparams.ctypes.data, p.n_ctx_orig, out.ctypes.data)
    return out


def rope_rotate(x: np.ndarray, table: np.ndarray, n_dims: int, neox: bool,
                out: np.ndarray | None = None) -> np.ndarray:
    """x (n_tok, n_head, head_dim) rotated by `table` (n_tok, n_dims) from rope_table; into
    `out` (contiguous float32, x's shape, not x) when given."""
    x = np.ascontiguousarray(x, np.float32)
    n_tok, n_head, hd = x.shape
    if table.shape != (n_tok, n_dims) or n_dims > hd:
        raise ValueError(f"RoPE table {table.shape} for x {x.shape} over {n_dims} dims")
    table = np.ascontiguousarray(table, np.float32)
    if out is None:
        y = np.empty_like(x)
    elif out.shape != x.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be contiguous float32 {x.shape}, got {out.dtype} "
                         f"{out.shape}")
    else:
        y = out
    _kernels()["rope_rotate"](x.ctypes.data, y.ctypes.data, table.ctypes.data, n_tok,
                              n_head, hd, n_dims, int(neox))
    return y


def rope(x: np.ndarray, pos: np.ndarray, p: RopeParams) -> np.ndarray:
    """ggml_rope_ext(x, pos, factors, ...) on x (n_tok, n_head, head_dim) at positions pos."""
    return rope_rotate(x, rope_table(p, pos), p.n_dims, p.neox)
