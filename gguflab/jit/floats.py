"""IR emitters for fp16 <-> fp32 with ggml's rounding (round to nearest even), and the
row-conversion kernels built from them for the CPU and for NVPTX.

Where the target converts in hardware (x86 F16C, every CUDA GPU) the emitters use LLVM's
`fptrunc`/`fpext`; elsewhere an integer formulation with the same results, so no
compiler-rt helper is ever needed at run time.
"""

from __future__ import annotations

import ctypes
from functools import cache

from llvmlite import ir

from .builders import Target, const, elementwise_kernel, f16, f32, i16, i32, ptr
from .core import compile_kernels, host_cpu


def hardware_half(target: Target) -> bool:
    return target == Target.NVPTX or host_cpu().has("f16c")


def emit_f32_to_f16(b: ir.IRBuilder, x: ir.Value, hw: bool) -> ir.Value:
    """fp32 -> fp16 bits (i16), round to nearest even. NaN becomes the canonical quiet NaN
    (sign kept, payload dropped), as ggml's portable conversion does."""
    c = lambda v: const(i32, v)  # noqa: E731
    bits = b.bitcast(x, i32)
    sign = b.and_(bits, c(0x80000000))
    f = b.xor(bits, sign)
    is_nan = b.icmp_unsigned(">", f, c(0x7F800000))
    if hw:
        h = b.bitcast(b.fptrunc(x, f16), i16)
        return b.select(is_nan, b.trunc(b.or_(c(0x7E00), b.lshr(sign, c(16))), i16), h)
    big = b.select(is_nan, c(0x7E00), c(0x7C00))
    # subnormal halves: let the FPU round by adding a magic number
    magic = c(126 << 23)
    sub = b.sub(b.bitcast(b.fadd(b.bitcast(f, f32), b.bitcast(magic, f32)), i32), magic)
    # normal halves: rebias the exponent and round the mantissa to even
    odd = b.and_(b.lshr(f, c(13)), c(1))
    norm = b.lshr(b.add(b.add(f, c(((15 - 127) << 23) + 0xFFF)), odd), c(13))
    o = b.select(
        b.icmp_unsigned(">=", f, c(143 << 23)),
        big,
        b.select(b.icmp_unsigned("<", f, c(113 << 23)), sub, norm),
    )
    return b.trunc(b.or_(o, b.lshr(sign, c(16))), i16)


def emit_f16_to_f32(b: ir.IRBuilder, h: ir.Value, hw: bool) -> ir.Value:
    """fp16 bits (i16) -> fp32, exact."""
    if hw:
        return b.fpext(b.bitcast(h, f16), f32)
    c = lambda v: const(i32, v)  # noqa: E731
    w = b.zext(h, i32)
    o = b.add(b.shl(b.and_(w, c(0x7FFF)), c(13)), c((127 - 15) << 23))
    exp = b.and_(w, c(0x7C00))
    infnan = b.add(o, c((128 - 16) << 23))
    magic = c(113 << 23)
    tiny = b.bitcast(b.fsub(b.bitcast(b.add(o, c(1 << 23)), f32), b.bitcast(magic, f32)), i32)
    o = b.select(
        b.icmp_unsigned("==", exp, c(0x7C00)),
        infnan,
        b.select(b.icmp_unsigned("==", exp, c(0)), tiny, o),
    )
    o = b.or_(o, b.shl(b.and_(w, c(0x8000)), c(16)))
    return b.bitcast(o, f32)


def build_half_module(target: Target, hw: bool | None = None) -> ir.Module:
    """`f32_to_f16(const float*, uint16*, n)` and `f16_to_f32(const uint16*, float*, n)`."""
    hw = hardware_half(target) if hw is None else hw
    m = ir.Module(name="half")

    def to_half(b, args, i):
        src, dst = args
        b.store(emit_f32_to_f16(b, b.load(b.gep(src, [i])), hw), b.gep(dst, [i]))

    def to_float(b, args, i):
        src, dst = args
        b.store(emit_f16_to_f32(b, b.load(b.gep(src, [i])), hw), b.gep(dst, [i]))

    elementwise_kernel(m, "f32_to_f16", [ptr(f32), ptr(i16)], target, to_half)
    elementwise_kernel(m, "f16_to_f32", [ptr(i16), ptr(f32)], target, to_float)
    return m


_SIG = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


@cache
def half_kernels(hw: bool | None = None):
    """Compiled host kernels: (f32_to_f16, f16_to_f32), each `(src_ptr, dst_ptr, n)`."""
    mod = compile_kernels(
        build_half_module(Target.CPU, hw), {"f32_to_f16": _SIG, "f16_to_f32": _SIG}
    )
    return mod["f32_to_f16"], mod["f16_to_f32"]


def load_f16(b: ir.IRBuilder, base: ir.Value, offset: int, target: Target = Target.CPU) -> ir.Value:
    """The fp16 at byte `offset` of the i8* `base`, as a float."""
    p = b.bitcast(b.gep(base, [const(i32, offset)]), ptr(i16))
    return emit_f16_to_f32(b, b.load(p, align=2), hardware_half(target))


def store_f16(b: ir.IRBuilder, v: ir.Value, base: ir.Value, offset: int,
              target: Target = Target.CPU) -> None:
    """`v` rounded to fp16 (ggml's rounding), stored at byte `offset` of `base`."""
    p = b.bitcast(b.gep(base, [const(i32, offset)]), ptr(i16))
    b.store(emit_f32_to_f16(b, v, hardware_half(target)), p, align=2)
