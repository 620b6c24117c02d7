"""One ggml type's arithmetic, the way every family module writes it.

A `QuantType` gives
- the numpy reference (`quantize_blocks_ref` / `dequantize_blocks_ref`): the spec, kept in
  llama.cpp's float operation order so that it is bit-exact with `quantize_row_*_ref`;
- the llvmlite kernels (`emit_quantize_block` / `emit_dequantize_block`): IR for one block,
  which this base class wraps into loops over blocks for the CPU (and NVPTX), compiles,
  and runs on all cores with the GIL released;
- `levels_ref`: the quantized level of every weight, for the `hist:` histograms.

`quantize` / `dequantize` are what callers use: compiled when the family has a kernel,
the reference otherwise.
"""

from __future__ import annotations

import ctypes
from functools import cached_property

import numpy as np
from llvmlite import ir

from ..errors import UserError
from ..gguf import GGMLType, TypeInfo, type_info
from ..jit import compile_kernels, parallel_rows
from ..jit.builders import Target, elementwise_kernel, f32, i8, ptr

HIST_BINS = 16  # old llama.cpp printed 16 bins of quantized levels per tensor

_KERNEL_SIG = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
MIN_ELEMENTS_PER_THREAD = 1 << 16  # smaller slices cost more in hand-off than they save


class QuantType:
    """Subclasses set `type` (and `n_levels` for integer quants) and implement the rest."""

    type: GGMLType
    n_levels: int | None = None  # distinct quantized values per weight (None: float types)

    @cached_property
    def info(self) -> TypeInfo:
        return type_info(self.type)

    @property
    def name(self) -> str:
        return self.type.name

    # -- the spec (numpy) -----------------------------------------------------------------

    def quantize_blocks_ref(self, x: np.ndarray) -> np.ndarray:
        """float32 (n_blocks, block_size) -> uint8 (n_blocks, type_size)."""
        raise NotImplementedError(f"no quantizer for {self.name}")

    def dequantize_blocks_ref(self, q: np.ndarray) -> np.ndarray:
        """uint8 (n_blocks, type_size) -> float32 (n_blocks, block_size)."""
        raise NotImplementedError(f"no dequantizer for {self.name}")

    def levels_ref(self, q: np.ndarray) -> np.ndarray | None:
        """Integer level in [0, n_levels) of each weight, (n_blocks, block_size); None for
        float types."""
        return None

    # -- kernels (IR for one block) -------------------------------------------------------

    has_quantize_kernel = False
    has_dequantize_kernel = False

    def emit_quantize_block(self, b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> None:
        """Quantize the block of `block_size` floats at `x` into `type_size` bytes at `y`."""
        raise NotImplementedError

    def emit_dequantize_block(self, b: ir.IRBuilder, y: ir.Value, x: ir.Value) -> None:
        """Dequantize the block of `type_size` bytes at `y` into floats at `x`."""
        raise NotImplementedError

    def build_module(self, target: Target) -> ir.Module:
        """`quantize_<t>(float *x, u8 *y, i64 n_blocks)` and `dequantize_<t>(u8 *y, float *x,
        i64 n_blocks)` for the kernels this type has."""
        m = ir.Module(name=self.name.lower())
        bs, ts = self.info.block_size, self.info.type_size
        if self.has_quantize_kernel:

            def q(b, args, i):
                x, y = args
                self.emit_quantize_block(b, b.gep(x, [b.mul(i, i.type(bs))]),
                                         b.gep(y, [b.mul(i, i.type(ts))]))

            elementwise_kernel(m, f"quantize_{self.name.lower()}", [ptr(f32), ptr(i8)], target, q)
        if self.has_dequantize_kernel:

            def dq(b, args, i):
                y, x = args
                self.emit_dequantize_block(b, b.gep(y, [b.mul(i, i.type(ts))]),
                                           b.gep(x, [b.mul(i, i.type(bs))]))

            elementwise_kernel(m, f"dequantize_{self.name.lower()}", [ptr(i8), ptr(f32)], target, dq)
        return m

    @cached_property
    def _kernels(self):
        sigs = {}
        if self.has_quantize_kernel:
            sigs[f"quantize_{self.name.lower()}"] = _KERNEL_SIG
        if self.has_dequantize_kernel:
            sigs[f"dequantize_{self.name.lower()}"] = _KERNEL_SIG
        return compile_kernels(self.build_module(Target.CPU), sigs) if sigs else None

    # -- what callers use -----------------------------------------------------------------

    def _blocks(self, n_per_row: int) -> int:
        try:
            return self.info.row_bytes(n_per_row) // self.info.type_size
        except ValueError as e:
            raise UserError(str(e)) from None

    def quantize(self, x: np.ndarray, threads: int | None = None,
                 reference: bool = False) -> np.ndarray:
        """float32 rows (..., n_per_row) -> uint8 rows (..., row_bytes)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        n_per_row = x.shape[-1]
        nb = self._blocks(n_per_row) * (x.size // n_per_row if n_per_row else 0)
        out = np.empty((*x.shape[:-1], self.info.row_bytes(n_per_row)), np.uint8)
        blocks_in = x.reshape(nb, self.info.block_size)
        blocks_out = out.reshape(nb, self.info.type_size)
        if reference or not self.has_quantize_kernel:
            blocks_out[...] = self.quantize_blocks_ref(blocks_in)
            return out
        self._run(f"quantize_{self.name.lower()}", blocks_in, blocks_out, threads)
        return out

    def dequantize(self, q: np.ndarray, threads: int | None = None,
                   reference: bool = False) -> np.ndarray:
        """Rows of raw bytes (..., row_bytes) -> float32 rows (..., n_per_row). Arrays of
        another dtype (bf16 as uint16, say) are taken as their bytes."""
        q = np.ascontiguousarray(q)
        if q.dtype != np.uint8:
            q = q.view(np.uint8)
        bs, ts = self.info.block_size, self.info.type_size
        if q.shape[-1] % ts:
            raise UserError(f"{self.name} rows are whole blocks of {ts} bytes, got {q.shape[-1]}")
        nb = q.size // ts
        out = np.empty((*q.shape[:-1], q.shape[-1] // ts * bs), np.float32)
        blocks_in = q.reshape(nb, ts)
        blocks_out = out.reshape(nb, bs)
        if reference or not self.has_dequantize_kernel:
            blocks_out[...] = self.dequantize_blocks_ref(blocks_in)
            return out
        self._run(f"dequantize_{self.name.lower()}", blocks_in, blocks_out, threads)
        return out

    def _run(self, name: str, src: np.ndarray, dst: np.ndarray, threads: int | None) -> None:
        kernel = self._kernels[name]
        s0, d0 = src.ctypes.data, dst.ctypes.data
        ss, ds = src.strides[0], dst.strides[0]
        parallel_rows(lambda a, b: kernel(s0 + a * ss, d0 + a * ds, b - a), src.shape[0],
                      threads, min_rows=max(1, MIN_ELEMENTS_PER_THREAD // self.info.block_size))

    def histogram(self, q: np.ndarray) -> np.ndarray | None:
        """Counts of quantized levels in HIST_BINS bins (None for float types)."""
        if self.n_levels is None:
            return None
        levels = self.levels_ref(np.ascontiguousarray(q, np.uint8).reshape(-1, self.info.type_size))
        if levels is None:
            return None
        bins = levels.reshape(-1).astype(np.int64) * HIST_BINS // self.n_levels
        return np.bincount(bins, minlength=HIST_BINS)[:HIST_BINS]


REGISTRY: dict[GGMLType, QuantType] = {}


def register(cls: type[QuantType]) -> type[QuantType]:
    """Class decorator: one instance per ggml type, looked up by `get`."""
    REGISTRY[cls.type] = cls()
    return cls


def get(t: GGMLType | int | str) -> QuantType:
    """The arithmetic for type `t`; a UserError naming the type when there is none yet."""
    if isinstance(t, str):
        from ..gguf import type_by_name

        t = type_by_name(t)
    try:
        t = GGMLType(t)
        return REGISTRY[t]
    except (ValueError, KeyError):
        name = t.name if isinstance(t, GGMLType) else str(t)
        raise UserError(f"tensor type {name} is not supported by gguflab yet") from None
