"""One ggml type's arithmetic, the way every family module writes it.

A `QuantType` gives
- the numpy reference (`quantize_blocks_ref` / `dequantize_blocks_ref`): the spec, kept in
  llama.cpp's float operation order so that it is bit-exact with `quantize_row_*_ref`;
- the llvmlite kernels (`emit_quantize_block` / `emit_dequantize_block`): IR for one block,
  which this base class wraps into loops over blocks for the CPU (and NVPTX), compiles,
  and runs on all cores with the GIL released;
- `levels_ref`: the quantized level of every weight, for the `hist:` histograms;
- `emit_int_groups` (where the type has one): its blocks as groups of 32 small integers with
  a float scale and offset, which the runner's decode kernel dots with Q8 activations in
  integer arithmetic;
- facts the rest of gguflab derives from the registry: `weight_type` (a type model weights
  are stored in, as opposed to Q8_1/Q8_K, which only hold activations), `file_type` (the
  `general.file_type` llama.cpp guesses for a file mostly of this type), `uses_imatrix`.

Adding a type is one module that defines its class with `@register`, and one import line in
its family's package: the quantizer, the runner (CPU and GPU), the pipeline and the test
battery (`tests/test_quant_types.py`) pick it up from the registry.

`quantize` / `dequantize` are what callers use: compiled when the family has a kernel,
the reference otherwise.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from llvmlite import ir

from ..errors import UserError
from ..gguf import GGMLType, LlamaFileType, TypeInfo, type_info
from ..jit import compile_kernels, parallel_rows
from ..jit.builders import Target, alloca_entry, elementwise_kernel, f32, for_range, i8, i64, ptr

HIST_BINS = 16  # old llama.cpp printed 16 bins of quantized levels per tensor

_KERNEL_SIG = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
_IMATRIX_SIG = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                ctypes.c_int64, ctypes.c_int64)
MIN_ELEMENTS_PER_THREAD = 1 << 16  # smaller slices cost more in hand-off than they save


@dataclass(frozen=True)
class IntGroup:
    """32 weights of a block as integers: w = scale * q + offset (per weight, with `halves`
    as integer factors of q on each half of the group where the type has them)."""

    q: ir.Value  # <32 x i8> levels
    signed: bool  # levels are i8 (else u8 below 128)
    scale: ir.Value | None  # f32 (None in a super-block: its `d` is the float scale)
    offset: ir.Value | None  # f32, or None for symmetric types
    halves: ir.Value | None = None  # <16 x i16>: integer scale of each pair of levels, or 1


@dataclass(frozen=True)
class IntSuperBlock:
    """A K-quant super-block of 256 weights as ggml's AVX2 `vec_dot_<t>_q8_K` takes it: 8
    groups of 32 levels, each pair of levels with its integer sub-scale (`IntGroup.halves`),
    summed in 8 i32 lanes over the whole super-block and turned into floats once (times
    d * dx). The mins, where the type has them, dot Q8_K's sums of 16 (`bsums`) with the
    16 integer factors `mins` (vpmaddwd: 8 i32 lanes), and `fold` says how ggml adds that in:
    "sub" off the integer lanes (Q6_K's -32), "acc" into the float lanes first (Q2_K), "acc4"
    into a separate 4-lane float sum (Q4_K), "scalar" into a float scalar (Q5_K); the float
    factor of the last three is -dx * dmin."""

    group: Callable[[int], IntGroup]  # emits group g (0..7) when asked: one live at a time
    d: ir.Value  # f32
    mins: ir.Value | None = None  # <16 x i16> (a factor per 16 of x) or <8 x i16> (per 32)
    dmin: ir.Value | None = None  # f32
    fold: str | None = None
    # IQ1_M's delta: a second integer sum (group g's +-1 a weight with its sub-scales) into
    # 8 float lanes of its own (times d * dx), whose total is added times `factor2` at the end
    group2: Callable[[int], IntGroup] | None = None
    factor2: float = 0.0


class QuantType:
    """Subclasses set `type` (and `n_levels` for integer quants) and implement the rest."""

    type: GGMLType
    n_levels: int | None = None  # distinct quantized values per weight (None: float types)
    # llama.cpp's quantizer for this type takes importance weights (an imatrix row), and
    # whether it refuses to run without them (`ggml_quantize_requires_imatrix`)
    uses_imatrix: bool = False
    requires_imatrix: bool = False
    weight_type: bool = True  # False for the activation-only types (Q8_1, Q8_K)
    # what llama.cpp's CPU backend rounds the other operand of a product with this weight to
    # before it multiplies (its `vec_dot_type`): Q8_0, Q8_1 or Q8_K for the quantized types,
    # the weight's own type for F16/BF16, F32 for F32; None for the activation-only types
    activation_type: GGMLType | None = None

    @property
    def file_type(self) -> LlamaFileType | None:
        """The file type llama.cpp's loader guesses for a file mostly of this type (its
        `MOSTLY_<type>`, the `_M` mix for the K types that have S/M/L, `ALL_F32`)."""
        for key in (f"MOSTLY_{self.name}", f"MOSTLY_{self.name}_M", f"MOSTLY_{self.name}_MOE",
                    f"ALL_{self.name}"):
            if key in LlamaFileType.__members__:
                return LlamaFileType[key]
        return None

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

    def quantize_rows_ref(self, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        """float32 rows (n_rows, n_per_row) -> uint8 (n_rows, row_bytes), as llama.cpp's
        `quantize_<t>(src, dst, nrows, n_per_row, imatrix)` computes them. `imatrix` is one
        importance weight per column (n_per_row,) or None. Types whose quantizer needs the
        whole row (or the weights) override this; the default is block by block."""
        if imatrix is not None and self.uses_imatrix:
            raise NotImplementedError(f"no importance-weighted quantizer for {self.name}")
        n_rows, n = x.shape
        bs = self.info.block_size
        out = self.quantize_blocks_ref(x.reshape(-1, bs))
        return out.reshape(n_rows, self.info.row_bytes(n))

    def levels_ref(self, q: np.ndarray) -> np.ndarray | None:
        """Integer level in [0, n_levels) of each weight, (n_blocks, block_size); None for
        float types."""
        return None

    # -- kernels (IR for one block) -------------------------------------------------------

    int_dot = False  # the type has `emit_int_groups` (or `emit_int_superblock`)
    int_superblock = False  # its integer view is `emit_int_superblock` (the K-quants)
    # (int_superblock types) llama.cpp's tiled kernel (`ggml-cpu/tiled/`) takes its prompts
    int_tiled = True

    def emit_int_groups(self, b: ir.IRBuilder, src: ir.Value) -> list[IntGroup]:
        """The block at `src` (i8*) as its groups of 32 integer levels, in order (x86 AVX2:
        the runner dots them with `vpmaddubsw`)."""
        raise NotImplementedError

    def emit_int_superblock(self, b: ir.IRBuilder, src: ir.Value) -> IntSuperBlock:
        """The K-quant block at `src` (i8*) as ggml's AVX2 dot product with Q8_K reads it."""
        raise NotImplementedError

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
                 reference: bool = False, imatrix: np.ndarray | None = None) -> np.ndarray:
        """float32 rows (..., n_per_row) -> uint8 rows (..., row_bytes). `imatrix`: one
        importance weight per column, used by the types whose quantizer takes it (ignored
        by the others, as in llama.cpp)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        n_per_row = x.shape[-1]
        if imatrix is not None and not self.uses_imatrix:
            imatrix = None
        if imatrix is not None or self.row_quantizer:
            if imatrix is not None:
                imatrix = np.ascontiguousarray(imatrix, np.float32).reshape(-1)
                if imatrix.size != n_per_row:
                    raise UserError(f"{self.name}: importance matrix has {imatrix.size} "
                                    f"columns, the rows have {n_per_row}")
            elif self.requires_imatrix:
                raise UserError(f"{self.name} needs an importance matrix (--imatrix)")
            self._blocks(n_per_row)
            rows = x.reshape(-1, n_per_row)
            return self.quantize_rows(rows, imatrix, threads, reference).reshape(
                *x.shape[:-1], self.info.row_bytes(n_per_row))
        nb = self._blocks(n_per_row) * (x.size // n_per_row if n_per_row else 0)
        out = np.empty((*x.shape[:-1], self.info.row_bytes(n_per_row)), np.uint8)
        blocks_in = x.reshape(nb, self.info.block_size)
        blocks_out = out.reshape(nb, self.info.type_size)
        if reference or not self.has_quantize_kernel:
            blocks_out[...] = self.quantize_blocks_ref(blocks_in)
            return out
        self._run(f"quantize_{self.name.lower()}", blocks_in, blocks_out, threads)
        return out

    # True where the unweighted quantizer also needs whole rows (it goes through
    # `quantize_rows` rather than block by block)
    row_quantizer = False

    def quantize_rows(self, x: np.ndarray, imatrix: np.ndarray | None, threads: int | None,
                      reference: bool) -> np.ndarray:
        """The row path of `quantize` (weighted, or a row quantizer): the compiled
        importance-weighted kernel where the type has one, else the reference; a type with
        another compiled row path overrides it."""
        if reference or imatrix is None or not self.has_imatrix_kernel:
            return self.quantize_rows_ref(x, imatrix)
        x = np.ascontiguousarray(x, np.float32)
        imatrix = np.ascontiguousarray(imatrix, np.float32)
        n_rows, n = x.shape
        out = np.empty((n_rows, self.info.row_bytes(n)), np.uint8)
        if n_rows == 0 or n == 0:
            return out
        kernel = self._imatrix_kernel
        x0, y0, xs, ys = x.ctypes.data, out.ctypes.data, x.strides[0], out.strides[0]
        qw = imatrix.ctypes.data
        parallel_rows(lambda a, b: kernel(x0 + a * xs, y0 + a * ys, qw, b - a, n), n_rows,
                      threads, min_rows=max(1, MIN_ELEMENTS_PER_THREAD // 4 // n))
        return out

    # -- the importance-weighted kernel (IR for one block, given its weights) -------------

    has_imatrix_kernel = False
    # consecutive blocks one `emit_quantize_block_imatrix` quantizes (a type that runs
    # blocks in SIMD lanes sets more; a row's last, partial group goes through a
    # zero-padded copy)
    imatrix_group = 1

    def emit_imatrix_row_setup(self, b: ir.IRBuilder, x: ir.Value, n: ir.Value) -> object:
        """Whatever the blocks of the row of `n` (i64) floats at `x` share (the legacy
        types' sigma2); handed to `emit_quantize_block_imatrix`."""
        return None

    def emit_quantize_block_imatrix(self, b: ir.IRBuilder, x: ir.Value, y: ir.Value,
                                    qw: ir.Value, row: object) -> None:
        """Quantize the block (the `imatrix_group` blocks) at `x` with the importance
        weights at `qw` (its columns of the imatrix) into `y`, as llama.cpp's
        `quantize_row_<t>_impl` does."""
        raise NotImplementedError

    def row_modules(self) -> dict[str, ir.Module]:
        """The IR of every row kernel the type compiles besides `build_module`'s (the
        weighted quantizer, a row quantizer), by name: what the cross-target check compares
        across CPUs. Types with their own row kernels add theirs."""
        return {"imatrix": self.build_imatrix_module()} if self.has_imatrix_kernel else {}

    @cached_property
    def _imatrix_kernel(self):
        name = f"quantize_imatrix_{self.name.lower()}"
        return compile_kernels(self.build_imatrix_module(), {name: _IMATRIX_SIG})[name]

    def build_imatrix_module(self) -> ir.Module:
        """`quantize_imatrix_<t>(float *x, u8 *y, float *qw, i64 n_rows, i64 n_per_row)`."""
        name = f"quantize_imatrix_{self.name.lower()}"
        m = ir.Module(name=name)
        fn = ir.Function(m, ir.FunctionType(ir.VoidType(), [ptr(f32), ptr(i8), ptr(f32), i64,
                                                            i64]), name)
        for a in fn.args[:3]:
            a.add_attribute("noalias")
        x, y, qw, n_rows, n = fn.args
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        bs, ts, g = self.info.block_size, self.info.type_size, self.imatrix_group
        nb = b.sdiv(n, i64(bs))
        full = b.mul(b.sdiv(nb, i64(g)), i64(g))
        if g > 1:  # the zero-padded group at the end of a row
            xpad = alloca_entry(b, f32, g * bs, name="xpad")
            qpad = alloca_entry(b, f32, g * bs, name="qpad")
            ypad = alloca_entry(b, i8, g * ts, name="ypad")
        with for_range(b, i64(0), n_rows, name="row") as r:
            xr = b.gep(x, [b.mul(r, n)])
            yr = b.gep(y, [b.mul(r, b.mul(nb, i64(ts)))])
            setup = self.emit_imatrix_row_setup(b, xr, n)
            with for_range(b, i64(0), full, g, name="blk") as i:
                self.emit_quantize_block_imatrix(b, b.gep(xr, [b.mul(i, i64(bs))]),
                                                 b.gep(yr, [b.mul(i, i64(ts))]),
                                                 b.gep(qw, [b.mul(i, i64(bs))]), setup)
            if g > 1:
                tail = b.mul(b.sub(nb, full), i64(bs))
                with b.if_then(b.icmp_signed(">", tail, i64(0))):
                    at = b.mul(full, i64(bs))
                    with for_range(b, i64(0), i64(g * bs), name="pad") as j:
                        inside = b.icmp_signed("<", j, tail)
                        k = b.select(inside, b.add(at, j), i64(0))
                        zero = ir.Constant(f32, 0.0)
                        b.store(b.select(inside, b.load(b.gep(xr, [k])), zero),
                                b.gep(xpad, [j]))
                        b.store(b.select(inside, b.load(b.gep(qw, [k])), zero),
                                b.gep(qpad, [j]))
                    self.emit_quantize_block_imatrix(b, xpad, ypad, qpad, setup)
                    out = b.gep(yr, [b.mul(full, i64(ts))])
                    with for_range(b, i64(0), b.mul(b.sub(nb, full), i64(ts)), name="cp") as j:
                        b.store(b.load(b.gep(ypad, [j])), b.gep(out, [j]))
        b.ret_void()
        return m

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


def rows_by_blocks(x: np.ndarray, imatrix: np.ndarray | None, block_size: int,
                   type_size: int, quantize, chunk: int) -> np.ndarray:
    """A row reference built from a block quantizer that takes each block's importance
    weights: `quantize(blocks, weights or None)` on `chunk` blocks at a time (bounding the
    memory of a vectorised search); the imatrix row gives every row's blocks their columns."""
    x = np.ascontiguousarray(x, np.float32)
    n_rows, n = x.shape
    nb = n // block_size
    blocks = x.reshape(n_rows * nb, block_size)
    out = np.empty((n_rows * nb, type_size), np.uint8)
    imx = None if imatrix is None else np.ascontiguousarray(imatrix, np.float32).reshape(
        nb, block_size)
    for s in range(0, n_rows * nb, chunk):
        e = min(s + chunk, n_rows * nb)
        im = None if imx is None else imx[np.arange(s, e) % nb].reshape(-1)
        out[s:e] = quantize(blocks[s:e], im)
    return out.reshape(n_rows, -1)


REGISTRY: dict[GGMLType, QuantType] = {}


def weight_types() -> tuple[GGMLType, ...]:
    """The types a model's weights can be stored in and run from (a dequantize kernel, or
    F32), in ggml's numbering."""
    return tuple(sorted(
        (t for t, q in REGISTRY.items()
         if q.weight_type and (q.has_dequantize_kernel or t == GGMLType.F32)),
        key=int))


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
