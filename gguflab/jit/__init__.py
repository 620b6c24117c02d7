"""The llvmlite layer: build IR once, compile it for the host CPU (cached on disk) or emit
PTX for NVIDIA GPUs, and call it from Python without the GIL."""

from __future__ import annotations

import numpy as np

from .builders import Target
from .core import cache_dir, compile_kernels, emit_ptx, host_cpu
from .floats import build_half_module, half_kernels
from .parallel import default_threads, parallel_rows

__all__ = [
    "Target",
    "cache_dir",
    "compile_kernels",
    "emit_ptx",
    "host_cpu",
    "build_half_module",
    "half_kernels",
    "default_threads",
    "parallel_rows",
    "f32_to_f16",
    "f16_to_f32",
]


def _convert(
    src: np.ndarray,
    in_dtype: str,
    out_dtype: str,
    kernel_index: int,
    threads: int | None,
    hw: bool | None,
) -> np.ndarray:
    src = np.ascontiguousarray(src, dtype=in_dtype)
    out = np.empty(src.shape, dtype=out_dtype)
    kernel = half_kernels(hw)[kernel_index]
    flat_in, flat_out = src.reshape(-1), out.reshape(-1)
    si, so = flat_in.itemsize, flat_out.itemsize
    base_in, base_out = flat_in.ctypes.data, flat_out.ctypes.data
    parallel_rows(
        lambda a, b: kernel(base_in + a * si, base_out + a * so, b - a),
        flat_in.size,
        threads,
        min_rows=1 << 16,
    )
    return out


def f32_to_f16(x: np.ndarray, threads: int | None = None, hw: bool | None = None) -> np.ndarray:
    """fp32 -> fp16 (as uint16 bits), round to nearest even, compiled."""
    return _convert(x, "<f4", "<u2", 0, threads, hw)


def f16_to_f32(x: np.ndarray, threads: int | None = None, hw: bool | None = None) -> np.ndarray:
    """fp16 bits (uint16 or float16) -> fp32, compiled."""
    if x.dtype == np.float16:
        x = x.view(np.uint16)
    return _convert(x, "<u2", "<f4", 1, threads, hw)
