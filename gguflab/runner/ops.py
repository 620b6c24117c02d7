"""llama.cpp's CPU element-wise steps, compiled where numpy's float functions are not
ggml's: SwiGLU with ggml's vectorised exp (`ggml_v_expf`, the same emitter the attention
kernel uses), so the activations that the next product rounds to 8 bits are ggml's bits."""

from __future__ import annotations

import ctypes
from functools import cache

import numpy as np
from llvmlite import ir

from ..jit import compile_kernels
from ..jit.builders import const, f32, for_range, i64, ptr, void
from .attention import emit_v_expf

AVX_FLOATS = 8  # ggml's vector width on AVX2: the last n % 8 of a row take libm's expf


def _build_swiglu(m: ir.Module) -> None:
    """swiglu(g, u, y, n_rows, n): y = silu(g) * u per row of n, silu(x) = x / (1 + e^-x):
    ggml_vec_swiglu_f32 on AVX2 (ggml_v_expf for whole vectors of 8, expf for the tail)."""
    fn = ir.Function(m, ir.FunctionType(void, [ptr(f32), ptr(f32), ptr(f32), i64, i64]),
                     "swiglu")
    g, u, y, n_rows, n = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    expf = ir.Function(m, ir.FunctionType(f32, [f32]), "expf")
    c0 = const(i64, 0)
    whole = b.mul(b.sdiv(n, const(i64, AVX_FLOATS)), const(i64, AVX_FLOATS))
    one = ir.Constant(f32, 1.0)

    def step(i, exp):
        x = b.load(b.gep(g, [i]))
        e = exp(b.fsub(ir.Constant(f32, 0.0), x))
        b.store(b.fmul(b.fdiv(x, b.fadd(one, e)), b.load(b.gep(u, [i]))), b.gep(y, [i]))

    with for_range(b, c0, n_rows, name="r") as r:
        base = b.mul(r, n)
        with for_range(b, c0, whole, name="i") as i:
            step(b.add(base, i), lambda v: emit_v_expf(b, v))
        with for_range(b, whole, n, name="t") as i:
            step(b.add(base, i), lambda v: b.call(expf, [v]))
    b.ret_void()


_SIG = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 3, ctypes.c_int64, ctypes.c_int64)


@cache
def _kernels() -> dict:
    m = ir.Module(name="ops")
    _build_swiglu(m)
    return compile_kernels(m, {"swiglu": _SIG})


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """silu(gate) * up, as llama.cpp's CPU computes it (float32, gate's shape)."""
    g = np.ascontiguousarray(gate, np.float32)
    u = np.ascontiguousarray(up, np.float32)
    if g.shape != u.shape:
        raise ValueError(f"swiglu of {g.shape} and {u.shape}")
    y = np.empty_like(g)
    n = g.shape[-1] if g.ndim else 1
    _kernels()["swiglu"](g.ctypes.data, u.ctypes.data, y.ctypes.data, g.size // max(n, 1), n)
    return y
