"""The float types: F32, F16 (round to nearest even), BF16 (ggml's rounding, NaN kept quiet)."""

from __future__ import annotations

import numpy as np
from llvmlite import ir

from ..gguf import GGMLType
from ..jit.builders import Target, const, f32, i16, i32
from ..jit.floats import emit_f16_to_f32, emit_f32_to_f16, hardware_half
from .base import QuantType, register


@register
class F32(QuantType):
    type = GGMLType.F32
    activation_type = GGMLType.F32

    def quantize_blocks_ref(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x, np.float32).view(np.uint8)

    def dequantize_blocks_ref(self, q: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(q).view(np.float32)


def f16_from_f32_ref(x: np.ndarray) -> np.ndarray:
    """ggml's fp32 -> fp16 bits: round to nearest even, NaN -> canonical quiet NaN."""
    x = np.ascontiguousarray(x, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        h = x.astype(np.float16).view(np.uint16)
    sign = (x.view(np.uint32) >> 16).astype(np.uint16) & 0x8000
    return np.where(np.isnan(x), sign | 0x7E00, h).astype(np.uint16)


@register
class F16(QuantType):
    type = GGMLType.F16
    activation_type = GGMLType.F16
    has_quantize_kernel = has_dequantize_kernel = True

    def quantize_blocks_ref(self, x: np.ndarray) -> np.ndarray:
        return f16_from_f32_ref(x).view(np.uint8)

    def dequantize_blocks_ref(self, q: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(q).view(np.float16).astype(np.float32)

    def emit_quantize_block(self, b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> None:
        h = emit_f32_to_f16(b, b.load(x), hardware_half(Target.CPU))
        b.store(h, b.bitcast(y, i16.as_pointer()))

    def emit_dequantize_block(self, b: ir.IRBuilder, y: ir.Value, x: ir.Value) -> None:
        h = b.load(b.bitcast(y, i16.as_pointer()))
        b.store(emit_f16_to_f32(b, h, hardware_half(Target.CPU)), x)


def bf16_from_f32_ref(x: np.ndarray) -> np.ndarray:
    """ggml's fp32 -> bf16: round to nearest even; NaN keeps its top bits and turns quiet."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    nan = ((u >> 16) | 64).astype(np.uint16)
    return np.where((u & 0x7FFFFFFF) > 0x7F800000, nan, rounded)


def emit_f32_to_bf16(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    c = lambda v: const(i32, v)  # noqa: E731
    u = b.bitcast(x, i32)
    rounded = b.lshr(b.add(u, b.add(c(0x7FFF), b.and_(b.lshr(u, c(16)), c(1)))), c(16))
    nan = b.or_(b.lshr(u, c(16)), c(64))
    is_nan = b.icmp_unsigned(">", b.and_(u, c(0x7FFFFFFF)), c(0x7F800000))
    return b.trunc(b.select(is_nan, nan, rounded), i16)


def emit_bf16_to_f32(b: ir.IRBuilder, h: ir.Value) -> ir.Value:
    return b.bitcast(b.shl(b.zext(h, i32), const(i32, 16)), f32)


@register
class BF16(QuantType):
    type = GGMLType.BF16
    activation_type = GGMLType.BF16
    has_quantize_kernel = has_dequantize_kernel = True

    def quantize_blocks_ref(self, x: np.ndarray) -> np.ndarray:
        return bf16_from_f32_ref(x).view(np.uint8)

    def dequantize_blocks_ref(self, q: np.ndarray) -> np.ndarray:
        return (np.ascontiguousarray(q).view(np.uint16).astype(np.uint32) << 16).view(np.float32)

    def emit_quantize_block(self, b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> None:
        b.store(emit_f32_to_bf16(b, b.load(x)), b.bitcast(y, i16.as_pointer()))

    def emit_dequantize_block(self, b: ir.IRBuilder, y: ir.Value, x: ir.Value) -> None:
        b.store(emit_bf16_to_f32(b, b.load(b.bitcast(y, i16.as_pointer()))), x)
