"""IQ1_S and IQ1_M: groups of 8 weights on a 2048-point ternary grid (values -1, 0, 1) plus a
shift of +-1/8, a 3-bit scale per 32 (IQ1_S) or 16 (IQ1_M) weights.

IQ1_S block (50 bytes): fp16 d, 32 low bytes of 11-bit grid indices, then per 32 weights a
little-endian u16: 4 x 3 high index bits, the scale s in bits 12-14 and the shift sign in
bit 15; x = d*(2s + 1)*(g + shift).
IQ1_M block (56 bytes): 32 low index bytes, 16 bytes each holding two groups' 3 high bits
and shift signs (bits 3 and 7), 8 bytes of 3-bit scales per 16 weights whose top nibbles of
the four u16 words together hold the fp16 d.

The search (ggml's `quantize_row_iq1_s_impl` / `quantize_row_iq1_m_impl`): sort the weights
of a sub-block, try every split of the sorted values into the three levels (and both
shifts), keep the best weighted fit; groups of 8 off the grid then move to their nearest
precomputed neighbour.

`search_iq1_s_ref` / `search_iq1_m_ref` are the numpy spec; `build_iq1_quantizer` is the same
search compiled (scalar IR in ggml's float order), which `quantize` runs on all cores.
"""

from __future__ import annotations

import ctypes
from functools import cached_property

import numpy as np
from llvmlite import ir

from ...errors import UserError
from ...gguf import GGMLType
from ...jit import compile_kernels
from ...jit.builders import Target, const, f32, for_range, i8, i16, i32, i64, ptr
from ...jit.floats import emit_f16_to_f32, emit_f32_to_f16, hardware_half, store_f16
from ..base import IntGroup, IntSuperBlock, QuantType, register, rows_by_blocks
from ..floats import f16_from_f32_ref
from ..kquants._qkx2 import nearest_int_ref
from . import _intdot
from .grids_iq1 import Iq1Grid, iq1s_grid
from .grids_iq3 import flat_neighbours
from .iq3 import ScalarOps, emit_load_u8, grid_table, run_row_kernel, seq_sum

F32 = np.float32
QK = 256
CHUNK_BLOCKS = 128  # super-blocks the reference searches at once
FLT_MAX = F32(np.finfo(np.float32).max)
DELTA = F32(0.125)  # IQ1S_DELTA = IQ1M_DELTA
X_P = np.array([-1 + 0.125, 0.125, 1 + 0.125], F32)  # the three values with shift +1/8
X_M = np.array([-1 - 0.125, -0.125, 1 - 0.125], F32)


# -- numpy: the search ------------------------------------------------------------------------


def row_weights(x: np.ndarray, imatrix: np.ndarray | None, sub: int) -> np.ndarray:
    """ggml's per-weight importance on (nb, 256) super-blocks -> (nb*256/sub, sub)."""
    nb = x.shape[0]
    xb = x.reshape(-1, sub)
    if imatrix is None:
        return xb * xb
    sigma2 = np.repeat(F32(2) * seq_sum(x * x) / F32(QK), QK // sub)
    return imatrix.reshape(-1, sub) * np.sqrt(sigma2[:, None] + xb * xb).reshape(nb * QK // sub,
                                                                                 sub)


def pick_best(sumqx: np.ndarray, sumq2: np.ndarray, scale: np.ndarray):
    """ggml's running `if (sumq2 > 0 && sumqx*sumqx > best*sumq2)` over the candidates
    (S, C) in order, best starting at -FLT_MAX. Returns (candidate (S,) or -1, scale)."""
    S, C = sumqx.shape
    best = np.full(S, -FLT_MAX, F32)
    pick = np.full(S, -1)
    for c in range(C):
        qx, q2 = sumqx[:, c], sumq2[:, c]
        better = (q2 > 0) & (qx * qx > best * q2)
        if better.any():
            scale = np.where(better, qx / q2, scale)
            best = np.where(better, scale * qx, best)
            pick = np.where(better, c, pick)
    return pick, scale


def split_levels(order: np.ndarray, i1: np.ndarray, i2: np.ndarray) -> np.ndarray:
    """Levels 0/1/2 of each weight from the split points of its rank in `order` (S, n)."""
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(order.shape[1])[None, :], axis=1)
    return (rank >= i1[:, None]).astype(np.int64) + (rank >= i2[:, None])


def ternary_index(L: np.ndarray) -> np.ndarray:
    """Levels (..., 8) -> l0 + 3*l1 + ... + 3**7*l7."""
    return (L.astype(np.int64) * 3 ** np.arange(8)).sum(axis=-1)


def best_neighbour(grid: Iq1Grid, t: np.ndarray, x: np.ndarray, w: np.ndarray,
                   scale: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """ggml's iq1_find_best_neighbour2: for ternary points t (G,) off the grid, values x and
    weights w (G, 8), scale (G,), level values xx (G, 3): the first neighbour with the least
    weighted squared error."""
    cand = grid.neighbours[t]
    lv = grid.levels[np.maximum(cand, 0)].astype(np.int64)  # (G, K, 8)
    d2 = np.zeros(cand.shape, F32)
    for i in range(8):
        q = np.take_along_axis(xx, lv[..., i], axis=1)
        diff = scale[:, None] * q - x[:, i, None]
        d2 = d2 + w[:, i, None] * diff * diff
    # none below FLT_MAX (non-finite input, where ggml aborts): the first neighbour
    d2 = np.where((cand >= 0) & (d2 < FLT_MAX), d2, np.inf)
    return np.take_along_axis(cand, np.argmin(d2, axis=1)[:, None], axis=1)[:, 0]


def snap_groups(grid: Iq1Grid, L: np.ndarray, xb: np.ndarray, w: np.ndarray,
                scale: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Grid index of each group of 8 of levels L (S, n): where off the grid, the best
    neighbour. xx: (S, n/8, 3) level values per group. Returns (index (S, n/8), all on)."""
    S, n = L.shape
    t = ternary_index(L.reshape(S, n // 8, 8))
    gi = grid.map[t]
    s, k = np.nonzero(gi < 0)
    if s.size:
        gi = gi.copy()
        gi[s, k] = best_neighbour(grid, t[s, k], xb.reshape(S, -1, 8)[s, k],
                                  w.reshape(S, -1, 8)[s, k], scale[s], xx[s, k])
    return gi, (grid.map[t] >= 0).all(axis=1)


def refit(grid: Iq1Grid, gi: np.ndarray, xb: np.ndarray, w: np.ndarray,
          xx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sum w*q*x and sum w*q*q over each sub-block, q the value of each weight's level."""
    S = gi.shape[0]
    lv = grid.levels[gi].reshape(S, -1).astype(np.int64)
    q = np.take_along_axis(np.repeat(xx, 8, axis=1), lv[..., None], axis=2)[..., 0]
    sumqx = np.zeros(S, F32)
    sumq2 = np.zeros(S, F32)
    for i in range(lv.shape[1]):
        sumqx = sumqx + w[:, i] * q[:, i] * xb[:, i]
        sumq2 = sumq2 + w[:, i] * q[:, i] * q[:, i]
    return sumqx, sumq2


def sorted_sums(xb: np.ndarray, w: np.ndarray):
    """Stable ascending order of each sub-block's values (ggml's qsort on glibc is a merge
    sort) and the weights and values in that order."""
    order = np.argsort(xb, axis=1, kind="stable")
    return order, np.take_along_axis(w, order, axis=1), np.take_along_axis(xb, order, axis=1)


def pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(i1, i2) for i1 <= i2 <= n in ggml's loop order."""
    i1, i2 = np.triu_indices(n + 1)
    return i1, i2


def search_iq1_s_ref(x: np.ndarray, imatrix: np.ndarray, grid: Iq1Grid):
    """Per 32 weights of (nb, 256) super-blocks: (grid index (S, 4), scale (S,), shift (S,)
    in {+1, -1}, skipped (S,)), S = 8*nb."""
    xb = x.reshape(-1, 32)
    S = xb.shape[0]
    with np.errstate(all="ignore"):
        w = row_weights(x, imatrix, 32)
        mx = np.abs(xb).max(axis=1)
        order, ws, xs = sorted_sums(xb, w)
        sumx = np.zeros((S, 33), F32)
        sumw = np.zeros((S, 33), F32)
        for j in range(32):
            sumx[:, j + 1] = sumx[:, j] + ws[:, j] * xs[:, j]
            sumw[:, j + 1] = sumw[:, j] + ws[:, j]
        i1, i2 = pairs(32)
        cands_x, cands_2 = [], []
        a, b_, c = sumx[:, i1] - sumx[:, :1], sumx[:, i2] - sumx[:, i1], sumx[:, 32:] - sumx[:, i2]
        wa, wb, wc = sumw[:, i1] - sumw[:, :1], sumw[:, i2] - sumw[:, i1], sumw[:, 32:] - sumw[:, i2]
        for xv in (X_P, X_M):
            cands_x.append(a * xv[0] + b_ * xv[1] + c * xv[2])
            cands_2.append(wa * xv[0] * xv[0] + wb * xv[1] * xv[1] + wc * xv[2] * xv[2])
        # candidates in ggml's order: each split with +1/8, then with -1/8
        sumqx = np.stack(cands_x, axis=2).reshape(S, -1)
        sumq2 = np.stack(cands_2, axis=2).reshape(S, -1)
        pick, scale = pick_best(sumqx, sumq2, mx.copy())
        skipped = (mx < F32(1e-12)) | (pick < 0)
        p = np.maximum(pick, 0)
        shift = np.where(p % 2 == 0, 1, -1)
        L = split_levels(order, i1[p // 2], i2[p // 2])
        flip = scale < 0
        L = np.where(flip[:, None], 2 - L, L)
        scale = np.where(flip, -scale, scale)
        shift = np.where(flip, -shift, shift)
        xx = np.where((shift == 1)[:, None, None], X_P, X_M)
        xx = np.broadcast_to(xx, (S, 4, 3))
        gi, on = snap_groups(grid, L, xb, w, scale, xx)
        sx, s2 = refit(grid, gi, xb, w, xx)
        scale = np.where(~on & (sx > 0) & (s2 > 0), sx / s2, scale)
        scale = np.where(skipped, F32(0), scale).astype(F32)
        shift = np.where(skipped, 1, shift)
        gi = np.where(skipped[:, None], 0, gi)
    return gi, scale, shift, skipped


def search_iq1_m_ref(x: np.ndarray, imatrix: np.ndarray | None, grid: Iq1Grid):
    """Per 16 weights of (nb, 256) super-blocks: (grid index (S, 2), scale (S,), shift kind
    k (S,): bit 1 = first group -1/8, bit 0 = second group -1/8, weights (S, 16)), S = 16*nb."""
    xb = x.reshape(-1, 16)
    S = xb.shape[0]
    with np.errstate(all="ignore"):
        w = row_weights(x, imatrix, 16)
        mx = np.abs(xb).max(axis=1)
        order, ws, xs = sorted_sums(xb, w)
        half = order >= 8
        px = np.zeros((2, S, 17), F32)
        pw = np.zeros((2, S, 17), F32)
        for j in range(16):
            for h in range(2):
                inh = half[:, j] == h
                px[h, :, j + 1] = np.where(inh, px[h, :, j] + ws[:, j] * xs[:, j], px[h, :, j])
                pw[h, :, j + 1] = np.where(inh, pw[h, :, j] + ws[:, j], pw[h, :, j])
        p2, m2 = X_P[2], X_M[2]
        cp1 = X_P[0] * X_P[0] - X_P[1] * X_P[1]
        cp2 = X_P[1] * X_P[1] - X_P[2] * X_P[2]
        cm1 = X_M[0] * X_M[0] - X_M[1] * X_M[1]
        cm2 = X_M[1] * X_M[1] - X_M[2] * X_M[2]
        i1, i2 = pairs(16)
        qx_p, qx_m, q2_p, q2_m = [], [], [], []
        for h in range(2):
            txs, tws = px[h, :, 16:], pw[h, :, 16:]
            sx = px[h][:, i1] + px[h][:, i2]
            qx_p.append(txs * p2 - sx)
            qx_m.append(txs * m2 - sx)
            q2_p.append(tws * p2 * p2 + pw[h][:, i1] * cp1 + pw[h][:, i2] * cp2)
            q2_m.append(tws * m2 * m2 + pw[h][:, i1] * cm1 + pw[h][:, i2] * cm2)
        sumqx = np.stack([qx_p[0] + qx_p[1], qx_p[0] + qx_m[1], qx_m[0] + qx_p[1],
                          qx_m[0] + qx_m[1]], axis=2).reshape(S, -1)
        sumq2 = np.stack([q2_p[0] + q2_p[1], q2_p[0] + q2_m[1], q2_m[0] + q2_p[1],
                          q2_m[0] + q2_m[1]], axis=2).reshape(S, -1)
        pick, scale = pick_best(sumqx, sumq2, mx.copy())
        skipped = (mx < F32(1e-7)) | (pick < 0)
        p = np.maximum(pick, 0)
        kind = p % 4
        L = split_levels(order, i1[p // 4], i2[p // 4])
        flip = scale < 0
        L = np.where(flip[:, None], 2 - L, L)
        scale = np.where(flip, -scale, scale)
        kind = np.where(flip, 3 - kind, kind)
        xx = group_values(kind)
        gi, on = snap_groups(grid, L, xb, w, scale, xx)
        sx, s2 = refit(grid, gi, xb, w, xx)
        scale = np.where(~on & (sx > 0) & (s2 > 0), sx / s2, scale)
        scale = np.where(skipped, F32(0), scale).astype(F32)
        kind = np.where(skipped, 0, kind)
        gi = np.where(skipped[:, None], 0, gi)
    return gi, scale, kind, w


def group_values(kind: np.ndarray) -> np.ndarray:
    """(S,) shift kinds -> (S, 2, 3) level values of the two groups of 8."""
    first = np.where((kind < 2)[:, None], X_P, X_M)
    second = np.where((kind % 2 == 0)[:, None], X_P, X_M)
    return np.stack([first, second], axis=1)


# -- IR: dequantization -----------------------------------------------------------------------


def emit_grid_values(b: ir.IRBuilder, index: list[ir.Value]) -> ir.Value:
    """The 8 values (-1, 0, 1) of each grid point index[k] (i32), as <8n x float>."""
    words = iq1s_grid().packed()
    table = grid_table(b, "gguflab_iq1s_grid", words, i64)
    vt = ir.VectorType(i64, len(index))
    v = ir.Constant(vt, ir.Undefined)
    for k, ix in enumerate(index):
        w = b.load(b.gep(table, [const(i32, 0), ix], inbounds=True), align=8)
        v = b.insert_element(v, w, const(i32, k))
    n = 8 * len(index)
    return b.sitofp(b.bitcast(v, ir.VectorType(i8, n)), ir.VectorType(f32, n))


def emit_store_group(b: ir.IRBuilder, vals: ir.Value, deltas: list[ir.Value], dl: list[ir.Value],
                     x: ir.Value, offset: int) -> None:
    """x[offset + i] = dl[g] * (vals[i] + deltas[g]) for groups g of 8."""
    n = vals.type.count
    vf = ir.VectorType(f32, n)
    vi = ir.VectorType(i32, n)

    def spread(scalars):
        v = ir.Constant(ir.VectorType(f32, len(scalars)), ir.Undefined)
        for k, s in enumerate(scalars):
            v = b.insert_element(v, s, const(i32, k))
        return b.shuffle_vector(v, v, ir.Constant(vi, [e // 8 for e in range(n)]))

    y = b.fmul(spread(dl), b.fadd(vals, spread(deltas)))
    b.store(y, b.bitcast(b.gep(x, [const(i32, offset)]), vf.as_pointer()), align=4)


def emit_delta(b: ir.IRBuilder, negative: ir.Value) -> ir.Value:
    return b.select(negative, const(f32, -0.125), const(f32, 0.125))


def emit_u16(b: ir.IRBuilder, y: ir.Value, offset: int) -> ir.Value:
    p = b.bitcast(b.gep(y, [const(i32, offset)]), i16.as_pointer())
    return b.zext(b.load(p, align=1), i32)


# -- the types --------------------------------------------------------------------------------


class _Iq1(QuantType):
    n_levels = 3  # the ternary level of each weight
    uses_imatrix = True
    activation_type = GGMLType.Q8_K
    row_quantizer = True
    has_dequantize_kernel = True

    def quantize_blocks_ref(self, x: np.ndarray) -> np.ndarray:
        return self.quantize_rows_ref(np.asarray(x, F32).reshape(1, -1), None).reshape(
            -1, self.info.type_size)

    def quantize_rows_ref(self, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        if imatrix is None and self.requires_imatrix:
            raise UserError(f"{self.name} needs an importance matrix (--imatrix)")
        return rows_by_blocks(x, imatrix, QK, self.info.type_size,
                              self._quantize_super_blocks, CHUNK_BLOCKS)

    def row_modules(self) -> dict[str, ir.Module]:
        return {"rows": build_iq1_quantizer(self.type == GGMLType.IQ1_M)}

    @cached_property
    def _row_kernel(self):
        name = f"quantize_{self.name.lower()}"
        return compile_kernels(build_iq1_quantizer(self.type == GGMLType.IQ1_M),
                               {name: _ROWS_SIG})[name]

    @cached_property
    def _tables(self) -> tuple[np.ndarray, ...]:
        return iq1_tables()

    def quantize_rows(self, x: np.ndarray, imatrix: np.ndarray | None, threads: int | None,
                      reference: bool) -> np.ndarray:
        if reference or (imatrix is None and self.requires_imatrix):
            return self.quantize_rows_ref(x, imatrix)
        return run_row_kernel(self._row_kernel, self._tables, x, imatrix,
                              self.info.row_bytes(x.shape[1]), threads)

    def levels_ref(self, q: np.ndarray) -> np.ndarray:
        return iq1s_grid().levels[self._indices(np.ascontiguousarray(q, np.uint8))].reshape(
            -1, 256)


@register
class IQ1_S(_Iq1):
    type = GGMLType.IQ1_S
    requires_imatrix = True

    def _quantize_super_blocks(self, x: np.ndarray, imatrix: np.ndarray) -> np.ndarray:
        nb = x.shape[0]
        gi, scale, shift, _ = search_iq1_s_ref(x, imatrix, iq1s_grid())
        qs = (gi & 255).astype(np.uint8).reshape(nb, 32)
        qh = ((gi >> 8) << (3 * np.arange(4))).sum(axis=1).reshape(nb, 8)
        scale = scale.reshape(nb, 8)
        with np.errstate(all="ignore"):
            max_scale = scale.max(axis=1)
            d = max_scale / F32(15)
            dh = f16_from_f32_ref(d * F32(1.125))
            id_ = F32(1) / d
            ls = np.clip(nearest_int_ref(F32(0.5) * (id_[:, None] * scale - F32(1))), 0, 7)
        ls = ls | np.where(shift.reshape(nb, 8) == -1, 8, 0)
        zero = max_scale == 0
        qh = np.where(zero[:, None], qh, qh | (ls << 12)).astype("<u2")
        dh = np.where(zero, 0, dh).astype("<u2")
        return np.concatenate([dh.view(np.uint8).reshape(nb, 2), qs,
                               qh.view(np.uint8).reshape(nb, 16)], axis=1)

    def _qh(self, q: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(q[:, 34:50]).view("<u2").astype(np.int64)  # (nb, 8)

    def _indices(self, q: np.ndarray) -> np.ndarray:
        qs = q[:, 2:34].reshape(-1, 8, 4).astype(np.int64)
        return qs | (((self._qh(q)[:, :, None] >> (3 * np.arange(4))) & 7) << 8)

    def dequantize_blocks_ref(self, q: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(q, np.uint8)
        nb = q.shape[0]
        d = q[:, 0:2].copy().view("<f2").astype(F32)  # (nb, 1)
        qh = self._qh(q)
        g = (iq1s_grid().levels[self._indices(q)].astype(F32) - F32(1)).reshape(nb, 8, 32)
        with np.errstate(all="ignore"):
            dl = d * (2 * ((qh >> 12) & 7) + 1).astype(F32)
            delta = np.where(qh & 0x8000, -DELTA, DELTA)
            y = dl[:, :, None] * (g + delta[:, :, None])
        return y.reshape(nb, 256)

    def emit_dequantize_block(self, b: ir.IRBuilder, y: ir.Value, x: ir.Value) -> None:
        d = emit_f16_to_f32(b, b.load(b.bitcast(y, i16.as_pointer()), align=1),
                            hardware_half(Target.CPU))
        for ib in range(8):
            qh = emit_u16(b, y, 34 + 2 * ib)
            s = b.and_(b.lshr(qh, const(i32, 12)), const(i32, 7))
            dl = b.fmul(d, b.sitofp(b.add(b.shl(s, const(i32, 1)), const(i32, 1)), f32))
            delta = emit_delta(b, b.icmp_unsigned("!=", b.and_(qh, const(i32, 0x8000)),
                                                  const(i32, 0)))
            index = []
            for k in range(4):
                hi = b.shl(b.and_(b.lshr(qh, const(i32, 3 * k)), const(i32, 7)), const(i32, 8))
                index.append(b.or_(emit_load_u8(b, y, 2 + 4 * ib + k), hi))
            emit_store_group(b, emit_grid_values(b, index), [delta] * 4, [dl] * 4, x, 32 * ib)

    int_dot = int_superblock = True

    def _int_groups(self, b: ir.IRBuilder, src: ir.Value, tiled: bool):
        table = grid_table(b, "gguflab_iq1s_grid", iq1s_grid().packed(), i64)
        c = lambda v: const(i32, v)  # noqa: E731

        def fields(g: int):
            qh = emit_u16(b, src, 34 + 2 * g)
            index = [b.or_(emit_load_u8(b, src, 2 + 4 * g + k),
                           b.shl(b.and_(b.lshr(qh, c(3 * k)), c(7)), c(8))) for k in range(4)]
            f = _intdot.odd_factor(b, b.and_(b.lshr(qh, c(12)), c(7)))
            neg = b.icmp_unsigned("!=", b.and_(qh, c(0x8000)), c(0))
            return _intdot.grid_bytes(b, table, index), f, neg

        def group(g: int) -> IntGroup:
            q, f, neg = fields(g)
            if tiled:  # 8 * grid + delta, the delta +-1
                delta = b.select(neg, ir.Constant(i8, -1), ir.Constant(i8, 1))
                q = b.add(b.shl(q, _intdot.splat_i8(b, ir.Constant(i8, 3))),
                          _intdot.splat_i8(b, delta))
            return IntGroup(q, True, None, None, _intdot.pair_factors(b, f))

        d = emit_f16_to_f32(b, b.load(b.bitcast(src, i16.as_pointer()), align=1),
                            hardware_half(Target.CPU))
        if tiled:
            return IntSuperBlock(group, b.fmul(d, const(f32, 0.125)))
        mins = ir.Constant(ir.VectorType(i16, 16), ir.Undefined)
        for g in range(8):
            _, f, neg = fields(g)
            m = b.select(neg, b.sub(ir.Constant(i16, 0), f), f)
            for h in range(2):
                mins = b.insert_element(mins, m, c(2 * g + h))
        return IntSuperBlock(group, d, mins, b.fmul(d, const(f32, -0.125)), "scalar")

    def emit_int_superblock(self, b: ir.IRBuilder, src: ir.Value) -> IntSuperBlock:
        """As ggml's AVX2 `vec_dot_iq1_s_q8_K` reads a block: per 32 weights 4 grid points of
        8 values -1, 0, 1 (the 11-bit index of each: a byte of qs, 3 bits of qh) and the
        factor 2s + 1, their sum in 8 i32 lanes times d * dx; the delta +-1/8 through Q8_K's
        sums of 16 (times +-(2s + 1)), into a float scalar by d * dx, its 1/8 taken into
        that factor (ggml: off the scalar's total; exact, a power of two)."""
        return self._int_groups(b, src, False)

    def emit_int_superblock_tiled(self, b: ir.IRBuilder, src: ir.Value) -> IntSuperBlock:
        """As ggml's tiled kernel unpacks a block: per weight 8 * grid value + delta (+-1),
        the factor 2s + 1 per 32, d the fp16 scale times 1/8; no mins."""
        return self._int_groups(b, src, True)


@register
class IQ1_M(_Iq1):
    type = GGMLType.IQ1_M

    def _quantize_super_blocks(self, x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        grid = iq1s_grid()
        nb = x.shape[0]
        gi, scale, kind, w = search_iq1_m_ref(x, imatrix, grid)
        qs = (gi & 255).astype(np.uint8).reshape(nb, 32)
        qh = ((gi[:, 0] >> 8) | ((gi[:, 1] >> 8) << 4)).reshape(nb, 16)
        scale = scale.reshape(nb, 16)
        sc = np.zeros((nb, 4), np.int64)
        with np.errstate(all="ignore"):
            max_scale = scale.max(axis=1)
            d = max_scale / F32(15)
            id_ = F32(1) / d
            ls = np.clip(nearest_int_ref(F32(0.5) * (id_[:, None] * scale - F32(1))), 0, 7)
            sc = (ls.reshape(nb, 4, 4) << (3 * np.arange(4))).sum(axis=2)
            masks = np.array([0x00, 0x80, 0x08, 0x88])[kind].reshape(nb, 16)
            # the super-block scale: the best fit of the whole block at these levels
            xv = group_values(kind)  # (S, 2, 3)
            lv = grid.levels[gi].astype(np.int64)  # (S, 2, 8)
            q = np.take_along_axis(xv, lv, axis=2).reshape(nb, 256)
            q = q * np.repeat((2 * ls + 1).astype(F32).reshape(nb, 16), 16, axis=1)
            xb, wb = x.reshape(nb, 256), w.reshape(nb, 256)
            sumqx = np.zeros(nb, F32)
            sumq2 = np.zeros(nb, F32)
            for i in range(256):
                sumqx = sumqx + wb[:, i] * q[:, i] * xb[:, i]
                sumq2 = sumq2 + wb[:, i] * q[:, i] * q[:, i]
            d = np.where(sumq2 > 0, sumqx / sumq2, d)
            s = f16_from_f32_ref(d * F32(1.1125)).astype(np.int64)
        sc[:, 0] |= (s & 0x000F) << 12
        sc[:, 1] |= (s & 0x00F0) << 8
        sc[:, 2] |= (s & 0x0F00) << 4
        sc[:, 3] |= s & 0xF000
        zero = max_scale == 0
        sc = np.where(zero[:, None], 0, sc).astype("<u2")
        qh = np.where(zero[:, None], qh, qh | masks).astype(np.uint8)
        return np.concatenate([qs, qh, sc.view(np.uint8).reshape(nb, 8)], axis=1)

    def _indices(self, q: np.ndarray) -> np.ndarray:
        qs = q[:, 0:32].reshape(-1, 16, 2).astype(np.int64)
        qh = q[:, 32:48].astype(np.int64)
        hi = np.stack([qh & 7, (qh >> 4) & 7], axis=2)
        return qs | (hi << 8)

    def dequantize_blocks_ref(self, q: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(q, np.uint8)
        nb = q.shape[0]
        sc = np.ascontiguousarray(q[:, 48:56]).view("<u2").astype(np.int64)  # (nb, 4)
        dbits = ((sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0xF0) | ((sc[:, 2] >> 4) & 0xF00)
                 | (sc[:, 3] & 0xF000)).astype(np.uint16)
        d = dbits.view(np.float16).astype(F32)
        s3 = (sc[:, :, None] >> (3 * np.arange(4))) & 7  # (nb, 4, 4): per 16 weights
        qh = q[:, 32:48].astype(np.int64)
        neg = np.stack([qh & 0x08, qh & 0x80], axis=2).reshape(nb, 32) != 0
        g = (iq1s_grid().levels[self._indices(q)].astype(F32) - F32(1)).reshape(nb, 32, 8)
        with np.errstate(all="ignore"):
            dl = d[:, None] * (2 * s3.reshape(nb, 16) + 1).astype(F32)
            delta = np.where(neg, -DELTA, DELTA)
            y = np.repeat(dl, 2, axis=1)[:, :, None] * (g + delta[:, :, None])
        return y.reshape(nb, 256)

    def emit_dequantize_block(self, b: ir.IRBuilder, y: ir.Value, x: ir.Value) -> None:
        sc = [emit_u16(b, y, 48 + 2 * i) for i in range(4)]
        bits = b.or_(b.or_(b.lshr(sc[0], const(i32, 12)),
                           b.and_(b.lshr(sc[1], const(i32, 8)), const(i32, 0xF0))),
                     b.or_(b.and_(b.lshr(sc[2], const(i32, 4)), const(i32, 0xF00)),
                           b.and_(sc[3], const(i32, 0xF000))))
        d = emit_f16_to_f32(b, b.trunc(bits, i16), hardware_half(Target.CPU))
        for ib in range(8):
            dl = []
            for h in range(2):
                s = b.and_(b.lshr(sc[ib // 2], const(i32, 6 * (ib % 2) + 3 * h)), const(i32, 7))
                dl.append(b.fmul(d, b.sitofp(b.add(b.shl(s, const(i32, 1)), const(i32, 1)), f32)))
            index, deltas = [], []
            for j in range(2):
                qh = emit_load_u8(b, y, 32 + 2 * ib + j)
                for k in range(2):
                    hi = b.shl(b.and_(b.lshr(qh, const(i32, 4 * k)), const(i32, 7)),
                               const(i32, 8))
                    index.append(b.or_(emit_load_u8(b, y, 4 * ib + 2 * j + k), hi))
                    bit = b.and_(qh, const(i32, 0x08 << (4 * k)))
                    deltas.append(emit_delta(b, b.icmp_unsigned("!=", bit, const(i32, 0))))
            emit_store_group(b, emit_grid_values(b, index), deltas,
                             [dl[0], dl[0], dl[1], dl[1]], x, 32 * ib)

    int_dot = int_superblock = True

    def _int_groups(self, b: ir.IRBuilder, src: ir.Value, tiled: bool) -> IntSuperBlock:
        table = grid_table(b, "gguflab_iq1s_grid", iq1s_grid().packed(), i64)
        c = lambda v: const(i32, v)  # noqa: E731
        sc = [emit_u16(b, src, 48 + 2 * i) for i in range(4)]

        def grid(g: int) -> ir.Value:
            """The grid bytes of group g's 4 points (11-bit indices: qs, and 3 bits of qh)."""
            index = []
            for j in range(2):
                qh = emit_load_u8(b, src, 32 + 2 * g + j)
                for k in range(2):
                    hi = b.shl(b.and_(b.lshr(qh, c(4 * k)), c(7)), c(8))
                    index.append(b.or_(emit_load_u8(b, src, 4 * g + 2 * j + k), hi))
            return _intdot.grid_bytes(b, table, index)

        def deltas_and_factors(g: int) -> tuple[ir.Value, ir.Value]:
            """(<32 x i8> the delta's sign +-1 a grid point, the factors 2s + 1 per 16)."""
            deltas = ir.Constant(ir.VectorType(i8, 4), ir.Undefined)
            for j in range(2):
                qh = emit_load_u8(b, src, 32 + 2 * g + j)
                for k in range(2):
                    neg = b.icmp_unsigned("!=", b.and_(qh, c(0x08 << (4 * k))), c(0))
                    deltas = b.insert_element(deltas, b.select(neg, ir.Constant(i8, -1),
                                                               ir.Constant(i8, 1)),
                                              c(2 * j + k))
            deltas = b.shuffle_vector(deltas, deltas, ir.Constant(
                ir.VectorType(i32, 32), [e // 8 for e in range(32)]))
            f = [_intdot.odd_factor(b, b.and_(b.lshr(sc[g // 2], c(6 * (g % 2) + 3 * h)), c(7)))
                 for h in range(2)]
            return deltas, _intdot.pair_factors(b, *f)

        def group(g: int) -> IntGroup:
            q = grid(g)
            deltas, factors = deltas_and_factors(g)
            if tiled:  # 8 * grid + delta
                q = b.add(b.shl(q, _intdot.splat_i8(b, ir.Constant(i8, 3))), deltas)
            return IntGroup(q, True, None, None, factors)

        def group2(g: int) -> IntGroup:
            deltas, factors = deltas_and_factors(g)
            return IntGroup(deltas, True, None, None, factors)

        bits = b.or_(b.or_(b.lshr(sc[0], c(12)), b.and_(b.lshr(sc[1], c(8)), c(0xF0))),
                     b.or_(b.and_(b.lshr(sc[2], c(4)), c(0xF00)), b.and_(sc[3], c(0xF000))))
        d = emit_f16_to_f32(b, b.trunc(bits, i16), hardware_half(Target.CPU))
        if tiled:
            return IntSuperBlock(group, b.fmul(d, const(f32, 0.125)))
        return IntSuperBlock(group, d, group2=group2, factor2=float(DELTA))

    def emit_int_superblock(self, b: ir.IRBuilder, src: ir.Value) -> IntSuperBlock:
        """As ggml's AVX2 `vec_dot_iq1_m_q8_K` reads a block: per 32 weights 4 grid points
        of 8 values -1, 0, 1 (the 11-bit index of each: a byte of qs, 3 bits of qh) with the
        factors 2s + 1 per 16, in 8 i32 lanes; the delta (+-1 a grid point, its sign in qh)
        dotted with x with the same factors in 8 more; each into float lanes of its own by
        d * dx (d the fp16 scale spread over the four scale words), the totals summed as
        total + 1/8 * total2."""
        return self._int_groups(b, src, False)

    def emit_int_superblock_tiled(self, b: ir.IRBuilder, src: ir.Value) -> IntSuperBlock:
        """As ggml's tiled kernel unpacks a block: per weight 8 * grid value + delta (+-1 a
        grid point), the factors 2s + 1 per 16, d the fp16 scale times 1/8; no mins."""
        return self._int_groups(b, src, True)


# -- IR: the compiled quantizer ---------------------------------------------------------------
#
# ggml's search written out scalar by scalar, in its float operation order (no fast-math):
# the same bytes as the numpy version above, at C speed.

# (x, y, qw or null, n_rows, n_per_row, grid, map, neighbour lists)
_ROWS_SIG = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                             ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                             ctypes.c_void_p)


def _const_table(m: ir.Module, name: str, elem: ir.Type, values) -> ir.GlobalVariable:
    t = ir.ArrayType(elem, len(values))
    g = ir.GlobalVariable(m, t, name)
    g.global_constant, g.linkage = True, "internal"
    g.initializer = ir.Constant(t, [float(v) if elem == f32 else int(v) for v in values])
    return g


def iq1_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the compiled quantizer is handed: the grid (levels as the bytes of a u64), the
    ternary map and the neighbour lists (ggml's layout)."""
    grid = iq1s_grid()
    fmap, lists = flat_neighbours(grid.map, grid.neighbours)
    return np.ascontiguousarray(grid.levels.astype(np.uint8).view("<u8").reshape(-1)), fmap, lists


class _Tables:
    """The tables as IR values: the grid and map as pointers to their arrays (indexed
    [0, i]), the lists as a plain pointer."""

    def __init__(self, b: ir.IRBuilder, grid: ir.Value, fmap: ir.Value, lists: ir.Value):
        m = b.module
        self.grid = b.bitcast(grid, ptr(ir.ArrayType(i64, 2048)))
        self.map = b.bitcast(fmap, ptr(ir.ArrayType(i32, 3**8)))
        self.lists = lists
        self.x_p = m.globals.get("iq1_x_p") or _const_table(m, "iq1_x_p", f32, X_P)
        self.x_m = m.globals.get("iq1_x_m") or _const_table(m, "iq1_x_m", f32, X_M)


def _grid_level(b: ir.IRBuilder, word: ir.Value, j: int) -> ir.Value:
    return b.trunc(b.and_(b.lshr(word, ir.Constant(i64, 8 * j)), ir.Constant(i64, 255)), i32)


def _emit_best_neighbour2(m: ir.Module) -> ir.Function:
    """i32 best(u16 *list, f32 *x, f32 *w, f32 scale, f32 *xx, i8 *L, u64 *grid):
    iq1_find_best_neighbour2."""
    fn = ir.Function(m, ir.FunctionType(i32, [ptr(i16), ptr(f32), ptr(f32), f32, ptr(f32),
                                              ptr(i8), ptr(i64)]), "iq1_best_neighbour")
    fn.linkage = "internal"
    nbr, xv, wv, scale, xx, L, grid = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    o = ScalarOps(b)
    t = _Tables(b, grid, ir.Constant(ptr(i32), None), ir.Constant(ptr(i16), None))
    n = b.zext(o.ld(nbr), i32)
    best = o.var(f32, o.f(FLT_MAX))
    gi = o.var(i32, o.i(-1))
    with for_range(b, o.i(1), b.add(n, o.i(1)), name="j") as j:
        idx = b.zext(o.ld(nbr, j), i32)
        word = b.load(b.gep(t.grid, [o.i(0), idx]))
        d2 = o.f(0.0)
        for i in range(8):
            q = o.ld(xx, _grid_level(b, word, i))
            diff = b.fsub(b.fmul(scale, q), o.ld(xv, i))
            d2 = b.fadd(d2, b.fmul(b.fmul(o.ld(wv, i), diff), diff))
        better = b.fcmp_ordered("<", d2, o.ld(best))
        o.st(b.select(better, d2, o.ld(best)), best)
        o.st(b.select(better, idx, o.ld(gi)), gi)
    g = o.ld(gi)
    g = b.select(b.icmp_signed("<", g, o.i(0)), o.i(0), g)  # ggml aborts here (NaN input)
    word = b.load(b.gep(t.grid, [o.i(0), g]))
    for i in range(8):
        o.st(b.trunc(_grid_level(b, word, i), i8), L, i)
    b.ret(g)
    return fn


def _emit_sort(b: ir.IRBuilder, o: ScalarOps, xb: ir.Value, vals: ir.Value, idx: ir.Value,
               n: int) -> None:
    """vals/idx = xb[0:n] and 0..n-1, sorted ascending by value, ties in index order (a stable
    insertion sort: ggml's qsort is glibc's merge sort)."""
    for j in range(n):
        o.st(o.ld(xb, j), vals, j)
        o.st(o.i(j), idx, j)
    with for_range(b, o.i(1), o.i(n), name="ins") as j:
        key, ki = o.ld(vals, j), o.ld(idx, j)
        k = o.var(i32, b.sub(j, o.i(1)))
        cond_bb = b.append_basic_block("sort.cond")
        body_bb = b.append_basic_block("sort.body")
        end_bb = b.append_basic_block("sort.end")
        b.branch(cond_bb)
        b.position_at_end(cond_bb)
        kk = o.ld(k)
        ok = b.icmp_signed(">=", kk, o.i(0))
        safe = b.select(ok, kk, o.i(0))
        b.cbranch(b.and_(ok, b.fcmp_ordered(">", o.ld(vals, safe), key)), body_bb, end_bb)
        b.position_at_end(body_bb)
        kk = o.ld(k)
        nxt = b.add(kk, o.i(1))
        o.st(o.ld(vals, kk), vals, nxt)
        o.st(o.ld(idx, kk), idx, nxt)
        o.st(b.sub(kk, o.i(1)), k)
        b.branch(cond_bb)
        b.position_at_end(end_bb)
        pos = b.add(o.ld(k), o.i(1))
        o.st(key, vals, pos)
        o.st(ki, idx, pos)


def build_iq1_quantizer(is_m: bool) -> ir.Module:
    """`quantize_<t>(f32 *x, u8 *y, f32 *qw or null, i64 n_rows, i64 n_per_row,
    u64 *grid, i32 *map, u16 *lists)` (the tables of `iq1_tables`)."""
    name = "quantize_iq1_m" if is_m else "quantize_iq1_s"
    bs = 16 if is_m else 32  # weights per scale
    nsub = QK // bs
    ts = 56 if is_m else 50
    m = ir.Module(name=name)
    best_nb = _emit_best_neighbour2(m)
    fn = ir.Function(m, ir.FunctionType(ir.VoidType(), [ptr(f32), ptr(i8), ptr(f32), i64, i64,
                                                        ptr(i64), ptr(i32), ptr(i16)]), name)
    for a in fn.args[:3]:
        a.add_attribute("noalias")
    x, y, qw, n_rows, n, grid_p, map_p, lists_p = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    o = ScalarOps(b)
    t = _Tables(b, grid_p, map_p, lists_p)
    c64 = lambda v: ir.Constant(i64, v)  # noqa: E731
    has_qw = b.icmp_unsigned("!=", qw, ir.Constant(ptr(f32), None))
    nb = b.sdiv(n, c64(QK))
    weight, vals = o.arr(f32, bs), o.arr(f32, bs)
    idx, L = o.arr(i32, bs), o.arr(i8, bs)
    index = o.arr(i32, bs // 8)
    scales, shifts = o.arr(f32, nsub), o.arr(i32, nsub)
    max_scale = o.var(f32, o.f(0))
    p_x = lambda: b.gep(t.x_p, [o.i(0), o.i(0)])  # noqa: E731
    m_x = lambda: b.gep(t.x_m, [o.i(0), o.i(0)])  # noqa: E731

    def weights(xb, qwb_offset, sigma2):
        with b.if_else(has_qw) as (then, otherwise):
            with then:
                qwb = b.gep(qw, [qwb_offset])
                for i in range(bs):
                    v = o.ld(xb, i)
                    o.st(b.fmul(o.ld(qwb, i), o.sqrt(b.fadd(sigma2, b.fmul(v, v)))), weight, i)
            with otherwise:
                for i in range(bs):
                    v = o.ld(xb, i)
                    o.st(b.fmul(v, v), weight, i)

    def group_xx(kind, k):
        """IQ1_M's value table of group k for shift kind `kind`."""
        if k == 0:
            use_p = b.icmp_signed("<", kind, o.i(2))
        else:
            use_p = b.icmp_signed("==", b.and_(kind, o.i(1)), o.i(0))
        return b.select(use_p, p_x(), m_x())

    with for_range(b, c64(0), n_rows, name="row") as r:
        with for_range(b, c64(0), nb, name="blk") as ibl:
            xbl = b.gep(x, [b.add(b.mul(r, n), b.mul(ibl, c64(QK)))])
            yb = b.gep(y, [b.mul(b.add(b.mul(r, nb), ibl), c64(ts))])
            for i in range(ts):
                o.st(ir.Constant(i8, 0), yb, i)
            sumx2 = o.var(f32, o.f(0))
            with for_range(b, o.i(0), o.i(QK), name="sx2") as i:
                v = o.ld(xbl, i)
                o.st(b.fadd(o.ld(sumx2), b.fmul(v, v)), sumx2)
            sigma2 = b.fdiv(b.fmul(o.f(2), o.ld(sumx2)), o.f(QK))
            o.st(o.f(0), max_scale)
            with for_range(b, o.i(0), o.i(nsub), name="ib") as ib:
                xb = b.gep(xbl, [b.mul(ib, o.i(bs))])
                qoff = b.add(b.mul(ibl, c64(QK)), b.sext(b.mul(ib, o.i(bs)), i64))
                weights(xb, qoff, sigma2)
                mx = o.fabs(o.ld(xb, 0))
                for i in range(1, bs):
                    mx = o.fmax(mx, o.fabs(o.ld(xb, i)))
                skipped = o.var(ir.IntType(1), b.fcmp_ordered("<", mx, o.f(1e-7 if is_m
                                                                          else 1e-12)))
                with b.if_then(b.not_(o.ld(skipped))):
                    _emit_sub_block(b, o, t, is_m, bs, xb, mx, weight, vals, idx, L, index,
                                    best_nb, skipped, scales, shifts, max_scale, yb, ib,
                                    p_x, m_x, group_xx)
                with b.if_then(o.ld(skipped)):
                    o.st(o.f(0), scales, ib)
                    o.st(o.i(0 if is_m else 1), shifts, ib)
            ms = o.ld(max_scale)
            with b.if_then(b.fcmp_ordered("!=", ms, o.f(0))):
                d = b.fdiv(ms, o.f(15))
                idv = b.fdiv(o.f(1), d)
                if not is_m:
                    store_f16(b, b.fmul(d, o.f(1.125)), yb, 0)
                    for ib in range(nsub):
                        v = b.fmul(o.f(0.5), b.fsub(b.fmul(idv, o.ld(scales, ib)), o.f(1)))
                        lv = o.clamp(o.nearest_int(v), 7)
                        neg = b.icmp_signed("==", o.ld(shifts, ib), o.i(-1))
                        lv = b.or_(lv, b.select(neg, o.i(8), o.i(0)))
                        p = b.bitcast(o.at(yb, 34 + 2 * ib), ptr(i16))
                        b.store(b.or_(b.load(p, align=1), b.trunc(b.shl(lv, o.i(12)), i16)), p,
                                align=1)
                else:
                    _emit_iq1m_super_scale(b, o, t, xbl, qw, has_qw, ibl, sigma2, idv, d,
                                           scales, shifts, weight, yb, group_xx, weights)
    b.ret_void()
    return m


def _emit_sub_block(b, o, t, is_m, bs, xb, mx, weight, vals, idx, L, index, best_nb, skipped,
                    scales, shifts, max_scale, yb, ib, p_x, m_x, group_xx) -> None:
    """One sub-block's split search, grid snapping and output bytes (ggml's loop body)."""
    _emit_sort(b, o, xb, vals, idx, bs)
    best = o.var(f32, o.f(-FLT_MAX))
    scale = o.var(f32, mx)
    bi1, bi2, bk = o.var(i32, o.i(-1)), o.var(i32, o.i(-1)), o.var(i32, o.i(0 if not is_m
                                                                              else -1))

    def consider(sumqx, sumq2, i1, i2, k):
        better = b.and_(b.fcmp_ordered(">", sumq2, o.f(0)),
                        b.fcmp_ordered(">", b.fmul(sumqx, sumqx), b.fmul(o.ld(best), sumq2)))
        with b.if_then(better):
            sc = b.fdiv(sumqx, sumq2)
            o.st(sc, scale)
            o.st(b.fmul(sc, sumqx), best)
            o.st(i1, bi1)
            o.st(i2, bi2)
            o.st(o.i(k), bk)

    if not is_m:
        sumx, sumw = o.arr(f32, bs + 1), o.arr(f32, bs + 1)
        o.st(o.f(0), sumx, 0)
        o.st(o.f(0), sumw, 0)
        for j in range(bs):
            i = o.ld(idx, j)
            w = o.ld(weight, i)
            o.st(b.fadd(o.ld(sumx, j), b.fmul(w, o.ld(xb, i))), sumx, j + 1)
            o.st(b.fadd(o.ld(sumw, j), w), sumw, j + 1)
        with for_range(b, o.i(0), o.i(bs + 1), name="i1") as i1:
            with for_range(b, i1, o.i(bs + 1), name="i2") as i2:
                sx1, sx2 = o.ld(sumx, i1), o.ld(sumx, i2)
                sw1, sw2 = o.ld(sumw, i1), o.ld(sumw, i2)
                a, a2 = b.fsub(sx1, o.ld(sumx, 0)), b.fsub(sx2, sx1)
                a3 = b.fsub(o.ld(sumx, bs), sx2)
                w1, w2 = b.fsub(sw1, o.ld(sumw, 0)), b.fsub(sw2, sw1)
                w3 = b.fsub(o.ld(sumw, bs), sw2)
                for k, xv in ((1, X_P), (-1, X_M)):
                    c = [o.f(v) for v in xv]
                    sumqx = b.fadd(b.fadd(b.fmul(a, c[0]), b.fmul(a2, c[1])), b.fmul(a3, c[2]))
                    sumq2 = b.fadd(b.fadd(b.fmul(b.fmul(w1, c[0]), c[0]),
                                          b.fmul(b.fmul(w2, c[1]), c[1])),
                                   b.fmul(b.fmul(w3, c[2]), c[2]))
                    consider(sumqx, sumq2, i1, i2, k)
        found = b.icmp_signed("!=", o.ld(bk), o.i(0))
    else:
        px = [o.arr(f32, bs + 1), o.arr(f32, bs + 1)]
        pw = [o.arr(f32, bs + 1), o.arr(f32, bs + 1)]
        for h in range(2):
            o.st(o.f(0), px[h], 0)
            o.st(o.f(0), pw[h], 0)
        for j in range(bs):
            i = o.ld(idx, j)
            second = b.icmp_signed(">=", i, o.i(bs // 2))
            w = o.ld(weight, i)
            wx = b.fmul(w, o.ld(xb, i))
            for h in range(2):
                mine = second if h else b.not_(second)
                o.st(b.select(mine, b.fadd(o.ld(px[h], j), wx), o.ld(px[h], j)), px[h], j + 1)
                o.st(b.select(mine, b.fadd(o.ld(pw[h], j), w), o.ld(pw[h], j)), pw[h], j + 1)
        txs = [o.ld(px[h], bs) for h in range(2)]
        tws = [o.ld(pw[h], bs) for h in range(2)]
        p2, m2 = o.f(X_P[2]), o.f(X_M[2])
        cp1 = o.f(X_P[0] * X_P[0] - X_P[1] * X_P[1])
        cp2 = o.f(X_P[1] * X_P[1] - X_P[2] * X_P[2])
        cm1 = o.f(X_M[0] * X_M[0] - X_M[1] * X_M[1])
        cm2 = o.f(X_M[1] * X_M[1] - X_M[2] * X_M[2])
        with for_range(b, o.i(0), o.i(bs + 1), name="i1") as i1:
            with for_range(b, i1, o.i(bs + 1), name="i2") as i2:
                qx_p, qx_m, q2_p, q2_m = [], [], [], []
                for h in range(2):
                    sx = b.fadd(o.ld(px[h], i1), o.ld(px[h], i2))
                    qx_p.append(b.fsub(b.fmul(txs[h], p2), sx))
                    qx_m.append(b.fsub(b.fmul(txs[h], m2), sx))
                    pw1, pw2 = o.ld(pw[h], i1), o.ld(pw[h], i2)
                    q2_p.append(b.fadd(b.fadd(b.fmul(b.fmul(tws[h], p2), p2), b.fmul(pw1, cp1)),
                                       b.fmul(pw2, cp2)))
                    q2_m.append(b.fadd(b.fadd(b.fmul(b.fmul(tws[h], m2), m2), b.fmul(pw1, cm1)),
                                       b.fmul(pw2, cm2)))
                combos = [(qx_p[0], qx_p[1], q2_p[0], q2_p[1]), (qx_p[0], qx_m[1], q2_p[0], q2_m[1]),
                          (qx_m[0], qx_p[1], q2_m[0], q2_p[1]), (qx_m[0], qx_m[1], q2_m[0], q2_m[1])]
                for k, (a0, a1, c0, c1) in enumerate(combos):
                    consider(b.fadd(a0, a1), b.fadd(c0, c1), i1, i2, k)
        found = b.icmp_signed(">=", o.ld(bk), o.i(0))
    found = b.and_(found, b.and_(b.icmp_signed(">=", o.ld(bi1), o.i(0)),
                                 b.icmp_signed(">=", o.ld(bi2), o.i(0))))
    with b.if_else(found) as (then, otherwise):
        with otherwise:
            o.st(ir.Constant(ir.IntType(1), 1), skipped)
        with then:
            i1, i2 = o.ld(bi1), o.ld(bi2)
            for j in range(bs):
                lv = b.add(b.zext(b.icmp_signed(">=", o.i(j), i1), i32),
                           b.zext(b.icmp_signed(">=", o.i(j), i2), i32))
                o.st(b.trunc(lv, i8), L, o.ld(idx, j))
            sc = o.ld(scale)
            flip = b.fcmp_ordered("<", sc, o.f(0))
            with b.if_then(flip):
                for j in range(bs):
                    o.st(b.sub(ir.Constant(i8, 2), o.ld(L, j)), L, j)
                o.st(b.fneg(sc), scale)
                kind = o.ld(bk)
                o.st(b.sub(o.i(3), kind) if is_m else b.sub(o.i(0), kind), bk)
            kind = o.ld(bk)
            if is_m:
                xxs = [group_xx(kind, 0), group_xx(kind, 1)]
            else:
                xx = b.select(b.icmp_signed("==", kind, o.i(1)), p_x(), m_x())
                xxs = [xx] * (bs // 8)
            sc = o.ld(scale)
            all_on = o.var(ir.IntType(1), ir.Constant(ir.IntType(1), 1))
            for k in range(bs // 8):
                tidx = o.i(0)
                for j in range(8):
                    lv = b.sext(o.ld(L, 8 * k + j), i32)
                    tidx = b.add(tidx, b.mul(lv, o.i(3 ** j)))
                gi0 = b.load(b.gep(t.map, [o.i(0), tidx]))
                o.st(gi0, index, k)
                with b.if_then(b.icmp_signed("<", gi0, o.i(0))):
                    o.st(ir.Constant(ir.IntType(1), 0), all_on)
                    lst = b.gep(t.lists, [b.sub(o.i(-1), gi0)])
                    g = b.call(best_nb, [lst, o.at(xb, 8 * k), o.at(weight, 8 * k), sc, xxs[k],
                                         o.at(L, 8 * k), b.bitcast(t.grid, ptr(i64))])
                    o.st(g, index, k)
            with b.if_then(b.not_(o.ld(all_on))):
                sumqx, sumq2 = o.f(0), o.f(0)
                for k in range(bs // 8):
                    word = b.load(b.gep(t.grid, [o.i(0), o.ld(index, k)]))
                    for j in range(8):
                        w = o.ld(weight, 8 * k + j)
                        q = o.ld(xxs[k], _grid_level(b, word, j))
                        sumqx = b.fadd(sumqx, b.fmul(b.fmul(w, q), o.ld(xb, 8 * k + j)))
                        sumq2 = b.fadd(sumq2, b.fmul(b.fmul(w, q), q))
                ok = b.and_(b.fcmp_ordered(">", sumqx, o.f(0)), b.fcmp_ordered(">", sumq2, o.f(0)))
                with b.if_then(ok):
                    o.st(b.fdiv(sumqx, sumq2), scale)
            if is_m:
                g0, g1 = o.ld(index, 0), o.ld(index, 1)
                o.st(b.trunc(g0, i8), yb, b.mul(ib, o.i(2)))
                o.st(b.trunc(g1, i8), yb, b.add(b.mul(ib, o.i(2)), o.i(1)))
                h = b.or_(b.lshr(g0, o.i(8)), b.shl(b.lshr(g1, o.i(8)), o.i(4)))
                o.st(b.trunc(h, i8), yb, b.add(ib, o.i(32)))
            else:
                h = o.i(0)
                for k in range(4):
                    g = o.ld(index, k)
                    o.st(b.trunc(g, i8), yb, b.add(b.mul(ib, o.i(4)), o.i(2 + k)))
                    h = b.or_(h, b.shl(b.lshr(g, o.i(8)), o.i(3 * k)))
                p = b.bitcast(o.at(yb, b.add(b.mul(ib, o.i(2)), o.i(34))), ptr(i16))
                b.store(b.trunc(h, i16), p, align=1)
            o.st(o.ld(scale), scales, ib)
            o.st(o.ld(bk), shifts, ib)
            o.st(o.fmax(o.ld(max_scale), o.ld(scale)), max_scale)


def _emit_iq1m_super_scale(b, o, t, xbl, qw, has_qw, ibl, sigma2, idv, d, scales, shifts,
                           weight, yb, group_xx, weights) -> None:
    """IQ1_M's block scales, shift bits and the fp16 d spread over the scale words."""
    c64 = lambda v: ir.Constant(i64, v)  # noqa: E731
    sumqx, sumq2 = o.var(f32, o.f(0)), o.var(f32, o.f(0))
    masks = [0x00, 0x80, 0x08, 0x88]
    with for_range(b, o.i(0), o.i(16), name="ib2") as ib:
        v = b.fmul(o.f(0.5), b.fsub(b.fmul(idv, o.ld(scales, ib)), o.f(1)))
        lv = o.clamp(o.nearest_int(v), 7)
        scp = b.bitcast(o.at(yb, b.add(o.i(48), b.mul(b.sdiv(ib, o.i(4)), o.i(2)))), ptr(i16))
        sh = b.mul(b.srem(ib, o.i(4)), o.i(3))
        b.store(b.or_(b.load(scp, align=1), b.trunc(b.shl(lv, sh), i16)), scp, align=1)
        kind = o.ld(shifts, ib)
        mask = o.i(0)
        for kk, mv in enumerate(masks):
            mask = b.select(b.icmp_signed("==", kind, o.i(kk)), o.i(mv), mask)
        qhp = o.at(yb, b.add(ib, o.i(32)))
        qh = b.or_(o.ld(qhp), b.trunc(mask, i8))
        o.st(qh, qhp)
        xb = b.gep(xbl, [b.mul(ib, o.i(16))])
        weights(xb, b.add(b.mul(ibl, c64(QK)), b.sext(b.mul(ib, o.i(16)), i64)), sigma2)
        mult = b.sitofp(b.add(b.shl(lv, o.i(1)), o.i(1)), f32)
        qh32 = b.zext(qh, i32)
        for k in range(2):
            lo = b.zext(o.ld(yb, b.add(b.mul(ib, o.i(2)), o.i(k))), i32)
            gi = b.or_(lo, b.and_(b.shl(qh32, o.i(8 - 4 * k)), o.i(0x700)))
            word = b.load(b.gep(t.grid, [o.i(0), gi]))
            xx = group_xx(kind, k)
            for j in range(8):
                w = o.ld(weight, 8 * k + j)
                q = b.fmul(o.ld(xx, _grid_level(b, word, j)), mult)
                o.st(b.fadd(o.ld(sumqx), b.fmul(b.fmul(w, q), o.ld(xb, 8 * k + j))), sumqx)
                o.st(b.fadd(o.ld(sumq2), b.fmul(b.fmul(w, q), q)), sumq2)
    s2 = o.ld(sumq2)
    dd = b.select(b.fcmp_ordered(">", s2, o.f(0)), b.fdiv(o.ld(sumqx), s2), d)
    s = b.zext(emit_f32_to_f16(b, b.fmul(dd, o.f(1.1125)), hardware_half(Target.CPU)), i32)
    for k, (mask, shift) in enumerate([(0x000F, 12), (0x00F0, 8), (0x0F00, 4), (0xF000, 0)]):
        p = b.bitcast(o.at(yb, 48 + 2 * k), ptr(i16))
        b.store(b.or_(b.load(p, align=1), b.trunc(b.shl(b.and_(s, o.i(mask)), o.i(shift)), i16)),
                p, align=1)
