"""Q8_K: 256 int8 levels with a float32 d, plus the sums of each 16 levels (for dot
products).

Block (292 bytes): d (float32), qs[256] (int8), bsums[16] (int16). Weight w = d * qs[w].
An all-zero block is written as 292 zero bytes (ggml leaves its bsums untouched).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir

from ...gguf import GGMLType
from ...jit.builders import const, f32, for_range, i8, i16, i32
from ..base import QuantType, register
from ._qx import (
    LANES,
    QK_K,
    V8,
    VF,
    VI,
    emit_fabs,
    emit_nearest_int,
    emit_splat,
    first_absmax,
    intrinsic,
    nearest_int,
    splat,
)

TYPE_SIZE = 292
D, QS, BS = 0, 4, 260


@register
class Q8_K(QuantType):
    type = GGMLType.Q8_K
    weight_type = False  # llama.cpp's activation type for the K-quant products
    n_levels = 256
    has_quantize_kernel = has_dequantize_kernel = True

    # -- numpy ----------------------------------------------------------------------------

    def quantize_blocks_ref(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        nb = x.shape[0]
        amax, mx = first_absmax(x)
        zero = amax == 0
        with np.errstate(all="ignore"):
            iscale = np.float32(-127) / mx
            qs = np.minimum(127, nearest_int(iscale[:, None] * x)).astype(np.int8)
            d = (np.float32(1) / iscale).astype(np.float32)
        bsums = qs.reshape(nb, 16, 16).astype(np.int32).sum(axis=-1).astype(np.int16)
        out = np.empty((nb, TYPE_SIZE), np.uint8)
        out[:, D:QS] = d.reshape(nb, 1).view(np.uint8)
        out[:, QS:BS] = qs.view(np.uint8)
        out[:, BS:] = bsums.view(np.uint8)
        out[zero] = 0
        return out

    def levels_ref(self, q: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(q, np.uint8)
        return q[:, QS:BS].view(np.int8).astype(np.int32) + 128

    def dequantize_blocks_ref(self, q: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(q, np.uint8)
        d = q[:, D:QS].copy().view(np.float32)  # (n, 1)
        return d * q[:, QS:BS].view(np.int8).astype(np.float32)

    # -- IR -------------------------------------------------------------------------------

    def emit_quantize_block(self, b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> None:
        c = lambda v: const(i32, v)  # noqa: E731
        xv = b.bitcast(x, VF.as_pointer())
        # ggml's first-maximum scan: lane k sees weights k, k+16, ... in order; the winner
        # is the earliest weight among the lanes whose maximum is the overall one.
        amax, mx, first = splat(VF, 0.0), splat(VF, 0.0), splat(VI, 0)
        for chunk in range(QK_K // LANES):
            v = b.load(b.gep(xv, [c(chunk)]), align=4)
            ax = emit_fabs(b, v)
            up = b.fcmp_ordered(">", ax, amax)
            amax = b.select(up, ax, amax)
            mx = b.select(up, v, mx)
            first = b.select(up, splat(VI, chunk * LANES), first)
        top = const(f32, 0.0)
        for s in [b.extract_element(amax, c(k)) for k in range(LANES)]:
            top = b.select(b.fcmp_ordered(">", s, top), s, top)
        lane_ids = ir.Constant(VI, [ir.Constant(i32, k) for k in range(LANES)])
        idx = b.select(b.fcmp_ordered("==", amax, emit_splat(b, top)),
                       b.add(first, lane_ids), splat(VI, QK_K))
        umin = intrinsic(b, "llvm.vector.reduce.umin.v16i32", i32, [VI])
        mx = b.load(b.gep(x, [b.call(umin, [idx])]))

        with b.if_else(b.fcmp_ordered("==", top, const(f32, 0.0))) as (zero, normal):
            with zero:
                with for_range(b, c(0), c(TYPE_SIZE), name="z") as j:
                    b.store(const(i8, 0), b.gep(y, [j]))
            with normal:
                iscale = b.fdiv(const(f32, -127.0), mx)
                siscale = emit_splat(b, iscale)
                qsp = b.bitcast(b.gep(y, [c(QS)]), V8.as_pointer())
                bsp = b.bitcast(b.gep(y, [c(BS)]), i16.as_pointer())
                radd = intrinsic(b, "llvm.vector.reduce.add.v16i32", i32, [VI])
                for chunk in range(QK_K // LANES):
                    v = b.load(b.gep(xv, [c(chunk)]), align=4)
                    q = emit_nearest_int(b, b.fmul(siscale, v))
                    q = b.trunc(b.select(b.icmp_signed(">", q, splat(VI, 127)),
                                         splat(VI, 127), q), V8)
                    b.store(q, b.gep(qsp, [c(chunk)]), align=1)
                    s = b.call(radd, [b.sext(q, VI)])
                    b.store(b.trunc(s, i16), b.gep(bsp, [c(chunk)]), align=1)
                d = b.fdiv(const(f32, 1.0), iscale)
                b.store(d, b.bitcast(b.gep(y, [c(D)]), f32.as_pointer()), align=1)

    def emit_dequantize_block(self, b: ir.IRBuilder, y: ir.Value, x: ir.Value) -> None:
        c = lambda v: const(i32, v)  # noqa: E731
        d = b.load(b.bitcast(b.gep(y, [c(D)]), f32.as_pointer()), align=1)
        with for_range(b, c(0), c(QK_K), name="o") as o:
            q = b.load(b.gep(y, [b.add(o, c(QS))]))
            b.store(b.fmul(d, b.sitofp(q, f32)), b.gep(x, [o]))
