"""IQ2_XXS, IQ2_XS, IQ2_S: the 2-bit i-quants, 8 weights at a time on a lattice.

Each group of 8 weights is stored as an index into a grid of 8-dimensional points (levels
0..2 a coordinate, see `grids_iq2`), 8 signs (7 stored plus even parity for XXS/XS, all 8
for S), and a 4-bit scale per 32 (XXS) or 16 (XS, S) weights on top of a fp16 super-block
scale. A weight dequantizes to d * (0.5 + s) * 0.25 * grid_byte * sign.

Block layouts (256 weights):
- IQ2_XXS (66 bytes): fp16 d; per 32 weights two u32 words: four 8-bit grid indices, then
  four 7-bit sign fields (bits 0..27) and the 4-bit scale (bits 28..31).
- IQ2_XS (74 bytes): fp16 d; 32 u16 = 9-bit grid index | 7-bit signs << 9; 8 bytes of two
  4-bit scales (16 weights each).
- IQ2_S (82 bytes): fp16 d; 32 bytes of grid index low bits, 32 bytes of signs, 8 bytes of
  the index high bits (2 bits a group), 8 bytes of 4-bit scales.

The quantizers (ggml's `quantize_row_iq2_*_impl`) take importance weights; IQ2_XXS and
IQ2_XS refuse to run without them. The numpy reference runs every sub-block of every row at
once: arrays are (sub-block, ...) and each C loop over elements is one numpy op an element,
in the C order, so every float sum rounds as ggml's does.

The compiled quantizer (`has_imatrix_kernel`, and the block kernel of IQ2_S's unweighted
path) is the same algorithm as scalar IR, one function a block; it gives the same bytes as
the reference and runs faster than ggml's C. The dequantizer's IR reads the grid from a
constant table in its module, so the runner (CPU and CUDA) runs these types.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir

from ...errors import UserError
from ...gguf import GGMLType, type_info
from ...jit.builders import (
    Target,
    alloca_entry,
    const,
    f32,
    for_range,
    i1,
    i8,
    i16,
    i32,
    i64,
    load_bytes,
)
from ...jit.floats import emit_f16_to_f32, emit_f32_to_f16, hardware_half
from ..base import IntGroup, IntSuperBlock, QuantType, register
from ..floats import f16_from_f32_ref
from ..kquants._qkx2 import half_bytes, half_ref, nearest_int_ref
from . import _intdot
from .grids_iq2 import LEVEL_BYTES, grid_bytes, grid_levels, search_tables, signs_with_parity

F32 = np.float32
QK_K = 256
_FLT_MAX = F32(np.finfo(np.float32).max)
_EPS = {GGMLType.IQ2_XXS: F32(1e-15), GGMLType.IQ2_XS: F32(1e-15), GGMLType.IQ2_S: F32(1e-8)}


# -- numpy reference --------------------------------------------------------------------------


def _seq_sum(terms: np.ndarray) -> np.ndarray:
    """Sum over the last axis in order from +0.0, like `float s = 0; s += t[i];`."""
    acc = np.zeros(terms.shape[:-1], F32)
    for i in range(terms.shape[-1]):
        acc = acc + terms[..., i]
    return acc


def _make_qp_quants(x: np.ndarray, w: np.ndarray, nmax: int) -> np.ndarray:
    """ggml's make_qp_quants on rows of x (m, n) with weights w: the scale (m,).

    L is kept as ggml stores it (uint8, so a negative level wraps), since the refinement
    reads it back."""
    m, n = x.shape
    fn = F32(nmax)
    mx = np.zeros(m, F32)
    for i in range(n):
        mx = np.where(mx > x[:, i], mx, x[:, i])
    live = mx >= F32(1e-15)
    mx = np.where(live, mx, F32(1))
    iscale = fn / mx
    L = (nearest_int_ref(iscale[:, None] * x) & 0xFF).astype(F32)
    scale = F32(1) / iscale
    diff = x - scale[:, None] * L
    best_mse = _seq_sum(w * diff * diff)
    for s in (-4, -3, -2, -1, 1, 2, 3, 4):
        iscale_is = (F32(0.1) * F32(s) + fn) / mx
        scale_is = F32(1) / iscale_is
        lv = np.minimum(nmax, nearest_int_ref(iscale_is[:, None] * x)).astype(F32)
        diff = x - scale_is[:, None] * lv
        mse = _seq_sum(w * diff * diff)
        better = mse < best_mse
        best_mse = np.where(better, mse, best_mse)
        iscale = np.where(better, iscale_is, iscale)
    lv = np.minimum(nmax, nearest_int_ref(iscale[:, None] * x))
    L = (lv & 0xFF).astype(F32)
    lvf = lv.astype(F32)
    sumlx = _seq_sum(w * x * lvf)
    suml2 = _seq_sum(w * lvf * lvf)
    for _ in range(5):  # a pass that changes nothing leaves the next one nothing to change
        for i in range(n):
            wi, xi, Li = w[:, i], x[:, i], L[:, i]
            slx = sumlx - wi * xi * Li
            sl2 = suml2 - wi * Li * Li
            ok = (slx > 0) & (sl2 > 0)
            with np.errstate(all="ignore"):
                new_l = np.minimum(nmax, nearest_int_ref(xi * sl2 / slx))
            nl = new_l.astype(F32)
            ok &= nl != Li
            slx = slx + wi * xi * nl
            sl2 = sl2 + wi * nl * nl
            ok &= slx * slx * suml2 > sumlx * sumlx * sl2
            L[:, i] = np.where(ok, (new_l & 0xFF).astype(F32), Li)
            sumlx = np.where(ok, slx, sumlx)
            suml2 = np.where(ok, sl2, suml2)
    with np.errstate(all="ignore"):
        out = np.where(suml2 > 0, sumlx / suml2, F32(0))
    return np.where(live, out, F32(0))


def _levels_of(id_: np.ndarray, xval: np.ndarray) -> np.ndarray:
    """nearest_int(0.5*(id*x - 1)) clamped to 0..2, for id (m,) and x (m, g, 8)."""
    with np.errstate(all="ignore"):
        v = F32(0.5) * (id_[:, None, None] * xval - F32(1))
    return np.clip(nearest_int_ref(v), 0, 2)


def _address(levels: np.ndarray) -> np.ndarray:
    return (levels.astype(np.int64) << (2 * np.arange(8))).sum(axis=-1)


class _Search:
    """Grid lookups for one type: snap groups of 8 levels onto the grid the way ggml does
    (`kmap`, then `iq2_find_best_neighbour` over the precomputed neighbours)."""

    def __init__(self, t: GGMLType):
        self.levels = grid_levels(t).astype(np.int32)
        self.odd = (2 * self.levels + 1).astype(F32)  # the quantizer's values 1, 3, 5
        self.tables = search_tables(t)

    def snap(self, levels: np.ndarray, xval: np.ndarray, waux: np.ndarray,
             scale: np.ndarray, mask: np.ndarray | None = None):
        """levels (m, g, 8); xval, waux (m, g, 8); scale (m,). Returns (grid index (m, g),
        on-grid flags (m, g), snapped levels (m, g, 8)). Groups not in `mask` are left as
        they are (index -1)."""
        m, g, _ = levels.shape
        addr = _address(levels)
        gi = self.tables.index[addr]
        on = gi >= 0
        todo = ~on if mask is None else (~on & mask)
        out = levels.copy()
        if todo.any():
            r, c = np.nonzero(todo)
            st = self.tables.start[addr[r, c]]
            cnt = self.tables.flat[st]
            seg = np.repeat(np.arange(r.size), cnt)
            first = np.concatenate([[0], np.cumsum(cnt)[:-1]])
            cand = self.tables.flat[np.repeat(st + 1 - first, cnt) + np.arange(cnt.sum())]
            q = self.odd[cand]  # (T, 8)
            xs, ws = xval[r, c][seg], waux[r, c][seg]
            sc = scale[r][seg]
            d2 = np.zeros(seg.size, F32)
            with np.errstate(all="ignore"):
                for i in range(8):
                    diff = sc * q[:, i] - xs[:, i]
                    d2 = d2 + ws[:, i] * diff * diff
            d2 = np.where(d2 < _FLT_MAX, d2, np.inf)  # `d2 < best_d2` from FLT_MAX
            best = np.minimum.reduceat(d2, first)
            hit = np.flatnonzero(d2 == best[seg])
            _, pick = np.unique(seg[hit], return_index=True)
            found = cand[hit[pick]]
            gi = gi.copy()
            gi[r, c] = found
            out[r, c] = self.levels[found]
        return gi, on, out


def _flip_signs(xb: np.ndarray, weight: np.ndarray, parity: bool):
    """|x| per group of 8 and the sign bits; with `parity`, an odd number of negatives
    keeps the least important one negative so that 7 bits + even parity encode the signs.
    xb, weight (m, g, 8) -> xval (m, g, 8), signs (m, g) int."""
    neg = ~(xb >= 0)
    xval = np.where(neg, -xb, xb)
    bits = neg.astype(np.int64) << np.arange(8)
    s = bits.sum(axis=-1)
    if parity:
        odd = (neg.sum(axis=-1) % 2) == 1
        ax = weight * xb * xb
        imin = np.zeros(ax.shape[:-1], np.int64)
        mn = ax[..., 0]
        for i in range(1, 8):
            lt = ax[..., i] < mn
            mn = np.where(lt, ax[..., i], mn)
            imin = np.where(lt, i, imin)
        sel = odd[..., None] & (np.arange(8) == imin[..., None])
        xval = np.where(sel, -xval, xval)
        s = np.where(odd, s ^ (1 << imin), s) & 127
    return xval, s


def _weighted_scale(weight: np.ndarray, xval: np.ndarray, L: np.ndarray):
    """sumqx, sumq2 over the sub-block for q = 2L+1; weight, xval (m, n), L (m, n)."""
    q = (2 * L + 1).astype(F32)
    return _seq_sum(weight * xval * q), _seq_sum(weight * q * q)


def quantize_iq2_ref(t: GGMLType, x: np.ndarray, qw: np.ndarray | None):
    """The common part of ggml's quantize_row_iq2_{xxs,xs,s}_impl on rows x (rows, n).

    Returns (d fp16 bits (nb,), 4-bit scales (nb, n_sub), grid indices (nb, n_sub, g),
    signs (nb, n_sub, g)) with nb = all super-blocks of all rows, n_sub sub-blocks of
    32 (XXS) or 16 weights, g = groups of 8 in a sub-block."""
    xxs = t == GGMLType.IQ2_XXS
    sub = 32 if xxs else 16
    g = sub // 8
    n_sub = QK_K // sub
    rows, n = x.shape
    xbl = np.ascontiguousarray(x, F32).reshape(-1, QK_K)
    nb = xbl.shape[0]
    m = nb * n_sub
    search = _Search(t)

    sumx2 = _seq_sum(xbl * xbl)
    sigma2 = (F32(2) * sumx2 if t == GGMLType.IQ2_S else sumx2) / F32(QK_K)
    xb = xbl.reshape(nb, n_sub, sub)
    with np.errstate(all="ignore"):
        if qw is not None:
            qwb = np.broadcast_to(np.asarray(qw, F32).reshape(1, n // QK_K, n_sub, sub),
                                  (rows, n // QK_K, n_sub, sub)).reshape(nb, n_sub, sub)
            weight = qwb * np.sqrt(sigma2[:, None, None] + xb * xb)
        else:
            weight = F32(0.25) * sigma2[:, None, None] + xb * xb
    weight = weight.reshape(m, sub)
    waux = np.sqrt(weight).reshape(m, g, 8)
    xg = xb.reshape(m, g, 8)
    xval, signs = _flip_signs(xg, weight.reshape(m, g, 8), parity=t != GGMLType.IQ2_S)
    xv = xval.reshape(m, sub)

    mx = xv[:, 0]
    for i in range(1, sub):
        mx = np.where(mx > xv[:, i], mx, xv[:, i])
    live = ~(mx < _EPS[t])
    mx_safe = np.where(live, mx, F32(1))

    with np.errstate(all="ignore"):
        L = np.zeros((m, g, 8), np.int64)
        on_grid = np.ones((m, g), bool)
        best = np.zeros(m, F32)
        if xxs:
            scale = _make_qp_quants(xv, weight, 4)
            eff_max = scale * F32(3)
            live &= eff_max > 0
            base, steps = np.where(live, eff_max, F32(1)), range(-6, 7)
        else:
            scale = mx_safe / F32(5)
            base, steps = mx_safe, range(-9, 10)
        for s in steps:
            id_ = (F32(5) + F32(s) * F32(0.1)) / base
            this_scale = F32(1) / id_
            lv = _levels_of(id_, xval)
            _, on, lv = search.snap(lv, xval, waux, this_scale)
            sumqx, sumq2 = _weighted_scale(weight, xv, lv.reshape(m, sub))
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            new_scale = sumqx / sumq2
            scale = np.where(better, new_scale, scale)
            best = np.where(better, new_scale * sumqx, best)
            L = np.where(better[:, None, None], lv, L)
            on_grid = np.where(better[:, None], on, on_grid)
        if xxs:
            redo = scale > 0
            group_mask = np.broadcast_to(redo[:, None], (m, g))
        else:
            redo = (~on_grid).any(axis=1) & (scale > 0)
            group_mask = redo[:, None] & ~on_grid
        id_ = F32(1) / np.where(redo, scale, F32(1))
        lv = _levels_of(id_, xval)
        _, _, lv = search.snap(lv, xval, waux, scale, group_mask)
        L = np.where(group_mask[:, :, None], lv, L)
        sumqx, sumq2 = _weighted_scale(weight, xv, L.reshape(m, sub))
        scale = np.where(redo & (sumq2 > 0), sumqx / sumq2, scale)

    negative = scale < 0
    scale = np.where(negative, -scale, scale)
    signs = np.where(negative[:, None], ~signs & (127 if t != GGMLType.IQ2_S else 255), signs)
    gi = search.tables.index[_address(L)]
    if (live & (gi < 0).any(axis=1)).any():
        raise AssertionError(f"{t.name}: a group fell off the grid")  # ggml aborts here
    scale = np.where(live, scale, F32(0))
    gi = np.where(live[:, None], gi, 0)
    signs = np.where(live[:, None], signs, 0)

    scales = scale.reshape(nb, n_sub)
    max_scale = np.zeros(nb, F32)
    for ib in range(n_sub):
        max_scale = np.where(max_scale > scales[:, ib], max_scale, scales[:, ib])
    any_ = max_scale != 0
    d = np.where(any_, max_scale, F32(31)) / F32(31)
    dh = f16_from_f32_ref(d * F32(0.9875) if t == GGMLType.IQ2_S else d)
    dh = np.where(any_, dh, np.uint16(0))
    with np.errstate(all="ignore"):
        idd = F32(1) / d
        ls = np.clip(nearest_int_ref(F32(0.5) * (idd[:, None] * scales - F32(1))), 0, 15)
    ls = np.where(any_[:, None], ls, 0)
    gi = gi.reshape(nb, n_sub, g)
    signs = signs.reshape(nb, n_sub, g)
    if t != GGMLType.IQ2_S:  # an all-zero block: XXS and XS clear the grid bits, S keeps them
        gi = np.where(any_[:, None, None], gi, 0)
        signs = np.where(any_[:, None, None], signs, 0)
    return dh.astype(np.uint16), ls.astype(np.uint8), gi.astype(np.int64), signs.astype(np.int64)


def _pack_xxs(dh, ls, gi, signs) -> np.ndarray:
    nb = dh.shape[0]
    w0 = (gi << (8 * np.arange(4))).sum(axis=-1)
    w1 = (signs << (7 * np.arange(4))).sum(axis=-1) | (ls.astype(np.int64) << 28)
    words = np.stack([w0, w1], axis=-1).astype("<u4").reshape(nb, 16)
    return np.concatenate([half_bytes(dh), words.view(np.uint8).reshape(nb, 64)], axis=1)


def _pack_xs(dh, ls, gi, signs) -> np.ndarray:
    nb = dh.shape[0]
    qs = (gi | (signs << 9)).astype("<u2").reshape(nb, 32)
    sc = ls[:, 0::2] | (ls[:, 1::2] << 4)
    return np.concatenate([half_bytes(dh), qs.view(np.uint8).reshape(nb, 64), sc], axis=1)


def _pack_s(dh, ls, gi, signs) -> np.ndarray:
    nb = dh.shape[0]
    gi = gi.reshape(nb, 32)
    lo = (gi & 255).astype(np.uint8)
    hi = (gi >> 8).reshape(nb, 8, 4) << (2 * np.arange(4))
    qh = hi.sum(axis=-1).astype(np.uint8)
    sc = ls[:, 0::2] | (ls[:, 1::2] << 4)
    return np.concatenate([half_bytes(dh), lo, signs.reshape(nb, 32).astype(np.uint8), qh, sc],
                          axis=1)


def _dequantize_ref(t: GGMLType, q: np.ndarray) -> np.ndarray:
    """ggml's dequantize_row_iq2_*: y = d * (0.5 + s) * 0.25 * grid byte * sign."""
    q = np.ascontiguousarray(q, np.uint8)
    nb = q.shape[0]
    d = half_ref(q[:, 0:2])
    gi, sg, ls = _fields(t, q)
    n_sub = ls.shape[1]
    db = d[:, None] * (F32(0.5) + ls.astype(F32)) * F32(0.25)  # (nb, n_sub)
    mag = LEVEL_BYTES[grid_levels(t)[gi]].astype(F32)  # (nb, 32, 8)
    neg = ((sg[..., None] >> np.arange(8)) & 1).astype(bool)
    v = np.where(neg, -mag, mag)
    per = 32 // n_sub  # groups of 8 under one scale
    with np.errstate(all="ignore"):
        y = np.repeat(db, per, axis=1)[:, :, None] * v
    return y.reshape(nb, QK_K)


def _fields(t: GGMLType, q: np.ndarray):
    """(grid index (nb, 32), 8 sign bits (nb, 32), 4-bit scales (nb, 8 or 16)) of blocks q."""
    nb = q.shape[0]
    if t == GGMLType.IQ2_XXS:
        w = q[:, 2:66].copy().view("<u4").reshape(nb, 8, 2).astype(np.int64)
        gi = ((w[:, :, 0:1] >> (8 * np.arange(4))) & 255).reshape(nb, 32)
        s7 = ((w[:, :, 1:2] >> (7 * np.arange(4))) & 127).reshape(nb, 32)
        return gi, signs_with_parity(s7).astype(np.int64), (w[:, :, 1] >> 28).astype(np.uint8)
    sc = q[:, 66:74] if t == GGMLType.IQ2_XS else q[:, 74:82]
    ls = np.stack([sc & 15, sc >> 4], axis=-1).reshape(nb, 16)
    if t == GGMLType.IQ2_XS:
        w = q[:, 2:66].copy().view("<u2").astype(np.int64)
        return w & 511, signs_with_parity(w >> 9).astype(np.int64), ls
    lo = q[:, 2:34].astype(np.int64)
    qh = q[:, 66:74].astype(np.int64)
    hi = ((qh[:, :, None] >> (2 * np.arange(4))) & 3).reshape(nb, 32)
    return lo | (hi << 8), q[:, 34:66].astype(np.int64), ls


# -- IR: dequantization -----------------------------------------------------------------------


def _grid_global(b: ir.IRBuilder, t: GGMLType) -> ir.GlobalVariable:
    """The type's grid as a constant [n x i64] in the builder's module: the 8 magnitude bytes
    of each point, little-endian (made once per module)."""
    m = b.module
    name = f"{t.name.lower()}_grid"
    g = m.globals.get(name)
    if g is None:
        words = grid_bytes(t).copy().view("<u8").reshape(-1)
        at = ir.ArrayType(i64, words.size)
        g = ir.GlobalVariable(m, at, name)
        g.global_constant = True
        g.linkage = "internal"
        g.initializer = ir.Constant(at, [int(w) for w in words])
    return g


def _emit_u(b: ir.IRBuilder, y: ir.Value, offset: int, t: ir.IntType) -> ir.Value:
    """The little-endian unsigned integer of type t at byte y + offset, as i32."""
    p = b.bitcast(b.gep(y, [const(i32, offset)]), t.as_pointer())
    v = b.load(p, align=1)
    return v if t == i32 else b.zext(v, i32)


def _emit_scale(b: ir.IRBuilder, d: ir.Value, s4: ir.Value) -> ir.Value:
    """d * (0.5 + s) * 0.25 for a 4-bit scale s (i32)."""
    return b.fmul(b.fmul(d, b.fadd(const(f32, 0.5), b.uitofp(s4, f32))), const(f32, 0.25))


def _emit_with_parity(b: ir.IRBuilder, s7: ir.Value) -> ir.Value:
    par = b.and_(b.ctpop(s7), const(i32, 1))
    return b.or_(s7, b.shl(par, const(i32, 7)))


def _emit_group(b: ir.IRBuilder, grid: ir.GlobalVariable, gi: ir.Value, signs: ir.Value,
                db: ir.Value, x: ir.Value, group: int) -> None:
    """x[8*group + j] = db * grid[gi][j] * (bit j of signs ? -1 : 1)."""
    v8 = ir.VectorType(f32, 8)
    vi = ir.VectorType(i32, 8)
    word = b.load(b.gep(grid, [const(i32, 0), gi], inbounds=True), align=8)
    mag = b.uitofp(b.zext(b.bitcast(word, ir.VectorType(i8, 8)), vi), v8)
    sv = b.insert_element(ir.Constant(vi, ir.Undefined), signs, const(i32, 0))
    sv = b.shuffle_vector(sv, sv, ir.Constant(vi, [0] * 8))
    neg = b.icmp_unsigned("!=", b.and_(sv, ir.Constant(vi, [1 << j for j in range(8)])),
                          ir.Constant(vi, [0] * 8))
    sign = b.select(neg, ir.Constant(v8, [-1.0] * 8), ir.Constant(v8, [1.0] * 8))
    dbv = b.insert_element(ir.Constant(v8, ir.Undefined), db, const(i32, 0))
    dbv = b.shuffle_vector(dbv, dbv, ir.Constant(vi, [0] * 8))
    out = b.fmul(b.fmul(dbv, mag), sign)
    dst = b.bitcast(b.gep(x, [const(i32, 8 * group)]), v8.as_pointer())
    b.store(out, dst, align=4)


def emit_dequantize_iq2(t: GGMLType, b: ir.IRBuilder, y: ir.Value, x: ir.Value) -> None:
    """One block of 256 weights at y -> floats at x, as ggml's dequantize_row_iq2_*."""
    grid = _grid_global(b, t)
    d = emit_f16_to_f32(b, b.load(b.bitcast(y, i16.as_pointer()), align=1),
                        hardware_half(Target.CPU))
    c = lambda v: const(i32, v)  # noqa: E731
    for ib32 in range(8):
        if t == GGMLType.IQ2_XXS:
            a0 = _emit_u(b, y, 2 + 8 * ib32, i32)
            a1 = _emit_u(b, y, 6 + 8 * ib32, i32)
            db = _emit_scale(b, d, b.lshr(a1, c(28)))
            for sub in range(4):
                gi = b.and_(b.lshr(a0, c(8 * sub)), c(255))
                s7 = b.and_(b.lshr(a1, c(7 * sub)), c(127))
                _emit_group(b, grid, gi, _emit_with_parity(b, s7), db, x, 4 * ib32 + sub)
            continue
        sc = _emit_u(b, y, (66 if t == GGMLType.IQ2_XS else 74) + ib32, i8)
        dbs = (_emit_scale(b, d, b.and_(sc, c(15))), _emit_scale(b, d, b.lshr(sc, c(4))))
        if t == GGMLType.IQ2_S:
            qh = _emit_u(b, y, 66 + ib32, i8)
        for sub in range(4):
            if t == GGMLType.IQ2_XS:
                w = _emit_u(b, y, 2 + 2 * (4 * ib32 + sub), i16)
                gi = b.and_(w, c(511))
                signs = _emit_with_parity(b, b.lshr(w, c(9)))
            else:
                lo = _emit_u(b, y, 2 + 4 * ib32 + sub, i8)
                gi = b.or_(lo, b.and_(b.shl(qh, c(8 - 2 * sub)), c(0x300)))
                signs = _emit_u(b, y, 34 + 4 * ib32 + sub, i8)
            _emit_group(b, grid, gi, signs, dbs[sub // 2], x, 4 * ib32 + sub)


def emit_int_superblock_iq2(t: GGMLType, b: ir.IRBuilder, src: ir.Value) -> IntSuperBlock:
    """A block as ggml's AVX2 `vec_dot_iq2_*_q8_K` reads it: per 32 weights 4 grid points of 8
    magnitudes, 32 signs (XXS/XS: 7 stored with even parity), the factor 2s + 1 for all 32
    (XXS) or per 16 (XS, S). d is the fp16 scale times 0.125, as ggml's tiled kernel takes
    it; its vec_dot takes the 0.125 off the whole sum instead, the same bits (a power of two:
    exact but where a result falls below 2^-126)."""
    grid = _grid_global(b, t)
    c = lambda v: const(i32, v)  # noqa: E731

    def group(g: int) -> IntGroup:
        if t == GGMLType.IQ2_XXS:
            a0 = _emit_u(b, src, 2 + 8 * g, i32)
            a1 = _emit_u(b, src, 6 + 8 * g, i32)
            gi = [b.and_(b.lshr(a0, c(8 * k)), c(255)) for k in range(4)]
            s7 = [b.and_(b.lshr(a1, c(7 * k)), c(127)) for k in range(4)]
            f = _intdot.odd_factor(b, b.lshr(a1, c(28)))
            factors = _intdot.pair_factors(b, f)
        else:
            sc = _emit_u(b, src, (66 if t == GGMLType.IQ2_XS else 74) + g, i8)
            factors = _intdot.pair_factors(b, _intdot.odd_factor(b, b.and_(sc, c(15))),
                                           _intdot.odd_factor(b, b.lshr(sc, c(4))))
            if t == GGMLType.IQ2_XS:
                ws = [_emit_u(b, src, 2 + 2 * (4 * g + k), i16) for k in range(4)]
                gi = [b.and_(w, c(511)) for w in ws]
                s7 = [b.lshr(w, c(9)) for w in ws]
            else:
                qh = _emit_u(b, src, 66 + g, i8)
                gi = [b.or_(_emit_u(b, src, 2 + 4 * g + k, i8),
                            b.and_(b.shl(qh, c(8 - 2 * k)), c(0x300))) for k in range(4)]
        mag = _intdot.grid_bytes(b, grid, gi)
        if t == GGMLType.IQ2_S:
            q = _intdot.signed(b, mag, _intdot.sign_bits(b, load_bytes(b, src, 34 + 4 * g, 4)))
        else:
            q = _intdot.apply_signs(b, mag, _intdot.even_signs(b, s7))
        return IntGroup(q, True, None, None, factors)

    d = emit_f16_to_f32(b, b.load(b.bitcast(src, i16.as_pointer()), align=1),
                        hardware_half(Target.CPU))
    return IntSuperBlock(group, b.fmul(d, const(f32, 0.125)))


# -- IR: the quantizer ------------------------------------------------------------------------
#
# A transliteration of ggml's scalar quantizer, one function per 256-weight block, with the
# float operations in the C order and no fast-math flags (LLVM then keeps every rounding).
# Only the 8 products of a neighbour distance run as one vector (they are independent; the
# sum over them stays in order).


def _bytes_global(m: ir.Module, name: str, data: bytes) -> ir.GlobalVariable:
    g = m.globals.get(name)
    if g is None:
        at = ir.ArrayType(i8, len(data))
        g = ir.GlobalVariable(m, at, name)
        g.global_constant = True
        g.linkage = "internal"
        g.initializer = ir.Constant(at, bytearray(data))
    return g


def _search_globals(m: ir.Module, t: GGMLType):
    """(odd grid values as i8 [n x 8], kmap i32 [4^8], neighbour runs i16) in module m."""
    name = t.name.lower()
    st = search_tables(t)
    kmap = np.where(st.index >= 0, st.index, -(st.start.astype(np.int64) + 1)).astype("<i4")
    odd = (2 * grid_levels(t) + 1).astype(np.int8)
    return (_bytes_global(m, f"{name}_odd", odd.tobytes()),
            _bytes_global(m, f"{name}_kmap", kmap.tobytes()),
            _bytes_global(m, f"{name}_neigh", st.flat.astype("<i2").tobytes()))


class _C:
    """Scalar C-like emission helpers on one builder."""

    def __init__(self, b: ir.IRBuilder):
        self.b = b

    def f(self, v: float) -> ir.Constant:
        return const(f32, v)

    def i(self, v: int) -> ir.Constant:
        return const(i32, v)

    def var(self, t: ir.Type, init=None, n: int = 1) -> ir.Value:
        p = alloca_entry(self.b, t, n)
        if init is not None:
            self.b.store(init, p)
        return p

    def at(self, p: ir.Value, k) -> ir.Value:
        return self.b.gep(p, [k if isinstance(k, ir.Value) else self.i(k)])

    def ld(self, p: ir.Value, k=None) -> ir.Value:
        return self.b.load(p if k is None else self.at(p, k))

    def st(self, v: ir.Value, p: ir.Value, k=None) -> None:
        self.b.store(v, p if k is None else self.at(p, k))

    def nearest_int(self, v: ir.Value) -> ir.Value:
        b = self.b
        s = b.bitcast(b.fadd(v, self.f(12582912.0)), i32)
        return b.sub(b.and_(s, self.i(0x7FFFFF)), self.i(0x400000))

    def imin(self, a: ir.Value, c: int) -> ir.Value:
        return self.b.select(self.b.icmp_signed("<", self.i(c), a), self.i(c), a)

    def clamp(self, a: ir.Value, lo: int, hi: int) -> ir.Value:
        a = self.imin(a, hi)
        return self.b.select(self.b.icmp_signed(">", self.i(lo), a), self.i(lo), a)

    def fmax(self, a: ir.Value, v: ir.Value) -> ir.Value:
        """MAX(a, v) = a > v ? a : v."""
        return self.b.select(self.b.fcmp_ordered(">", a, v), a, v)

    def sqrt(self, v: ir.Value) -> ir.Value:
        m = self.b.module
        fn = m.globals.get("llvm.sqrt.f32") or ir.Function(
            m, ir.FunctionType(f32, [f32]), "llvm.sqrt.f32")
        return self.b.call(fn, [v])

    def loop(self, start: int, stop, name: str):
        stop = stop if isinstance(stop, ir.Value) else self.i(stop)
        return for_range(self.b, self.i(start), stop, name=name)


def _fn(m: ir.Module, name: str, ret: ir.Type, args: list[ir.Type]):
    fn = ir.Function(m, ir.FunctionType(ret, args), name)
    fn.linkage = "internal"
    return fn, ir.IRBuilder(fn.append_basic_block("entry"))


def _emit_find_neighbour(m: ir.Module, t: GGMLType) -> ir.Function:
    """`int best(i16 *run, float *xval, float *waux, float scale, i8 *L)`: ggml's
    iq2_find_best_neighbour over one neighbour run; writes the 8 levels, returns the index."""
    name = f"{t.name.lower()}_best_neighbour"
    if name in m.globals:
        return m.globals[name]
    odd, _, _ = _search_globals(m, t)
    fn, b = _fn(m, name, i32, [i16.as_pointer(), f32.as_pointer(), f32.as_pointer(), f32,
                               i8.as_pointer()])
    run, xval, waux, scale, L = fn.args
    c = _C(b)
    v8, vi8 = ir.VectorType(f32, 8), ir.VectorType(i8, 8)
    xv = b.load(b.bitcast(xval, v8.as_pointer()), align=4)
    wv = b.load(b.bitcast(waux, v8.as_pointer()), align=4)
    sv = b.insert_element(ir.Constant(v8, ir.Undefined), scale, c.i(0))
    sv = b.shuffle_vector(sv, sv, ir.Constant(ir.VectorType(i32, 8), [0] * 8))
    grid = b.bitcast(odd, vi8.as_pointer())
    best = c.var(f32, c.f(float(np.finfo(np.float32).max)))
    best_i = c.var(i32, c.i(0))
    n = b.add(b.sext(b.load(run), i32), c.i(1))
    with c.loop(1, n, "nb") as j:
        ix = b.sext(c.ld(run, j), i32)
        q = b.sitofp(b.load(b.gep(grid, [ix]), align=1), v8)
        diff = b.fsub(b.fmul(sv, q), xv)
        prod = b.fmul(b.fmul(wv, diff), diff)
        d2 = c.f(0.0)
        for k in range(8):
            d2 = b.fadd(d2, b.extract_element(prod, c.i(k)))
        better = b.fcmp_ordered("<", d2, c.ld(best))
        c.st(b.select(better, d2, c.ld(best)), best)
        c.st(b.select(better, ix, c.ld(best_i)), best_i)
    gi = c.ld(best_i)
    pg = b.load(b.gep(grid, [gi]), align=1)
    lv = b.sdiv(b.sub(pg, ir.Constant(vi8, [1] * 8)), ir.Constant(vi8, [2] * 8))
    b.store(lv, b.bitcast(L, vi8.as_pointer()), align=1)
    b.ret(gi)
    return fn


def _emit_make_qp(m: ir.Module) -> ir.Function:
    """`float make_qp(float *x, i8 *L, float *w)`: ggml's make_qp_quants(32, 4, ...)."""
    name = "iq2_make_qp_quants"
    if name in m.globals:
        return m.globals[name]
    n, nmax = 32, 4
    fn, b = _fn(m, name, f32, [f32.as_pointer(), i8.as_pointer(), f32.as_pointer()])
    x, L, w = fn.args
    c = _C(b)
    xs = [c.ld(x, i) for i in range(n)]
    ws = [c.ld(w, i) for i in range(n)]
    mx = c.f(0.0)
    for v in xs:
        mx = c.fmax(mx, v)
    fnmax = c.f(float(nmax))
    empty = b.fcmp_ordered("<", mx, c.f(1e-15))
    with b.if_then(empty, likely=False):
        for i in range(n):
            c.st(const(i8, 0), L, i)
        b.ret(c.f(0.0))
    iscale = b.fdiv(fnmax, mx)
    Lf = []
    for i in range(n):
        li = b.trunc(c.nearest_int(b.fmul(iscale, xs[i])), i8)
        Lf.append(b.uitofp(li, f32))
    scale = b.fdiv(c.f(1.0), iscale)
    best = c.f(0.0)
    for i in range(n):
        diff = b.fsub(xs[i], b.fmul(scale, Lf[i]))
        best = b.fadd(best, b.fmul(b.fmul(ws[i], diff), diff))
    for s in (-4, -3, -2, -1, 1, 2, 3, 4):
        isc = b.fdiv(b.fadd(b.fmul(c.f(0.1), c.f(float(s))), fnmax), mx)
        sc = b.fdiv(c.f(1.0), isc)
        mse = c.f(0.0)
        for i in range(n):
            lv = b.sitofp(c.imin(c.nearest_int(b.fmul(isc, xs[i])), nmax), f32)
            diff = b.fsub(xs[i], b.fmul(sc, lv))
            mse = b.fadd(mse, b.fmul(b.fmul(ws[i], diff), diff))
        better = b.fcmp_ordered("<", mse, best)
        best = b.select(better, mse, best)
        iscale = b.select(better, isc, iscale)
    sumlx, suml2 = c.f(0.0), c.f(0.0)
    for i in range(n):
        li = c.imin(c.nearest_int(b.fmul(iscale, xs[i])), nmax)
        c.st(b.trunc(li, i8), L, i)
        lf = b.sitofp(li, f32)
        sumlx = b.fadd(sumlx, b.fmul(b.fmul(ws[i], xs[i]), lf))
        suml2 = b.fadd(suml2, b.fmul(b.fmul(ws[i], lf), lf))
    vlx, vl2 = c.var(f32, sumlx), c.var(f32, suml2)
    # five passes; a pass that changes nothing leaves the next ones nothing to change
    with c.loop(0, 5, "itry"):
        with c.loop(0, n, "qi") as i:
            wi, xi = c.ld(w, i), c.ld(x, i)
            li = c.ld(L, i)
            lf = b.uitofp(li, f32)
            slx0, sl20 = c.ld(vlx), c.ld(vl2)
            slx = b.fsub(slx0, b.fmul(b.fmul(wi, xi), lf))
            sl2 = b.fsub(sl20, b.fmul(b.fmul(wi, lf), lf))
            ok = b.and_(b.fcmp_ordered(">", slx, c.f(0.0)), b.fcmp_ordered(">", sl2, c.f(0.0)))
            new_l = c.imin(c.nearest_int(b.fdiv(b.fmul(xi, sl2), slx)), nmax)
            ok = b.and_(ok, b.icmp_signed("!=", new_l, b.zext(li, i32)))
            nf = b.sitofp(new_l, f32)
            slx = b.fadd(slx, b.fmul(b.fmul(wi, xi), nf))
            sl2 = b.fadd(sl2, b.fmul(b.fmul(wi, nf), nf))
            gain = b.fcmp_ordered(">", b.fmul(b.fmul(slx, slx), sl20),
                                  b.fmul(b.fmul(slx0, slx0), sl2))
            ok = b.and_(ok, gain)
            c.st(b.select(ok, b.trunc(new_l, i8), li), L, i)
            c.st(b.select(ok, slx, slx0), vlx)
            c.st(b.select(ok, sl2, sl20), vl2)
    sumlx, suml2 = c.ld(vlx), c.ld(vl2)
    pos = b.fcmp_ordered(">", suml2, c.f(0.0))
    b.ret(b.select(pos, b.fdiv(sumlx, suml2), c.f(0.0)))
    return fn


def _emit_quantize_fn(m: ir.Module, t: GGMLType) -> ir.Function:
    """`void <t>_quantize_block(float *x, i8 *y, float *qw)`: one block of ggml's
    quantize_row_<t>_impl; qw may be null for IQ2_S (its unweighted path)."""
    name = f"{t.name.lower()}_quantize_block"
    if name in m.globals:
        return m.globals[name]
    xxs, is_s = t == GGMLType.IQ2_XXS, t == GGMLType.IQ2_S
    sub = 32 if xxs else 16
    ng, n_sub = sub // 8, QK_K // sub
    ts = type_info(t).type_size
    _, kmap_g, neigh_g = _search_globals(m, t)
    best_nb = _emit_find_neighbour(m, t)
    make_qp = _emit_make_qp(m) if xxs else None
    fn, b = _fn(m, name, ir.VoidType(), [f32.as_pointer(), i8.as_pointer(), f32.as_pointer()])
    x, y, qw = fn.args
    c = _C(b)
    kmap = b.bitcast(kmap_g, i32.as_pointer())
    neigh = b.bitcast(neigh_g, i16.as_pointer())
    n_grid = len(grid_levels(t))

    zero_bytes = ir.Constant(ir.VectorType(i8, ts), [0] * ts)
    b.store(zero_bytes, b.bitcast(y, ir.VectorType(i8, ts).as_pointer()), align=1)

    acc = c.var(f32, c.f(0.0))
    with c.loop(0, QK_K, "sx") as i:
        xi = c.ld(x, i)
        c.st(b.fadd(c.ld(acc), b.fmul(xi, xi)), acc)
    sumx2 = c.ld(acc)
    sigma2 = b.fdiv(b.fmul(c.f(2.0), sumx2) if is_s else sumx2, c.f(float(QK_K)))

    weight, waux, xval = (c.var(f32, n=sub) for _ in range(3))
    L, Laux = c.var(i8, n=sub), c.var(i8, n=sub)
    scales = c.var(f32, n=n_sub)
    signs = c.var(i32, n=ng)
    on_grid, on_aux = c.var(i1, n=ng), c.var(i1, n=ng)
    scale_v, best_v = c.var(f32), c.var(f32)
    max_scale = c.var(f32, c.f(0.0))
    eps = c.f(1e-8 if is_s else 1e-15)
    vb = ir.VectorType(i8, sub)
    Lv, Lauxv = (b.bitcast(p, vb.as_pointer()) for p in (L, Laux))

    def lookup(lv_of, dst, k, scale):
        """levels of group k -> u; off the grid, the best neighbour (levels into dst + 8k).
        Returns (grid index or negative, on-grid flag)."""
        u = c.i(0)
        for i in range(8):
            u = b.or_(u, b.shl(lv_of(i), c.i(2 * i)))
        gi = c.ld(kmap, u)
        on = b.icmp_signed(">=", gi, c.i(0))
        with b.if_then(b.not_(on)):
            run = b.gep(neigh, [b.sub(c.i(-1), gi)])
            b.call(best_nb, [run, c.at(xval, 8 * k), c.at(waux, 8 * k), scale, c.at(dst, 8 * k)])
        return gi, on

    def level_fn(id_, dst, k):
        def lv(i):
            v = b.fmul(c.f(0.5), b.fsub(b.fmul(id_, c.ld(xval, 8 * k + i)), c.f(1.0)))
            li = c.clamp(c.nearest_int(v), 0, 2)
            if dst is not None:
                c.st(b.trunc(li, i8), dst, 8 * k + i)
            return li
        return lv

    def sums(levels):
        sqx, sq2 = c.f(0.0), c.f(0.0)
        for i in range(sub):
            w = c.ld(weight, i)
            q = b.sitofp(b.add(b.mul(b.sext(c.ld(levels, i), i32), c.i(2)), c.i(1)), f32)
            sqx = b.fadd(sqx, b.fmul(b.fmul(w, c.ld(xval, i)), q))
            sq2 = b.fadd(sq2, b.fmul(b.fmul(w, q), q))
        return sqx, sq2

    with c.loop(0, n_sub, "ib") as ib:
        xb = b.gep(x, [b.mul(ib, c.i(sub))])
        xs = [c.ld(xb, i) for i in range(sub)]

        def weights_from(get_w):
            for i in range(sub):
                w = get_w(i)
                c.st(w, weight, i)
                c.st(c.sqrt(w), waux, i)

        def weighted():
            qwb = b.gep(qw, [b.mul(ib, c.i(sub))])
            weights_from(lambda i: b.fmul(c.ld(qwb, i),
                                          c.sqrt(b.fadd(sigma2, b.fmul(xs[i], xs[i])))))

        if is_s:
            with b.if_else(b.icmp_unsigned("!=", qw, ir.Constant(qw.type, None))) as (yes, no):
                with yes:
                    weighted()
                with no:
                    weights_from(lambda i: b.fadd(b.fmul(c.f(0.25), sigma2),
                                                  b.fmul(xs[i], xs[i])))
        else:
            weighted()

        for k in range(ng):
            s, nflip, xv = c.i(0), c.i(0), []
            for i in range(8):
                xi = xs[8 * k + i]
                neg = b.not_(b.fcmp_ordered(">=", xi, c.f(0.0)))
                xv.append(b.select(neg, b.fneg(xi), xi))
                negi = b.zext(neg, i32)
                s = b.or_(s, b.shl(negi, c.i(i)))
                nflip = b.add(nflip, negi)
            if not is_s:
                odd = b.icmp_unsigned("!=", b.and_(nflip, c.i(1)), c.i(0))
                ax = [b.fmul(b.fmul(c.ld(weight, 8 * k + i), xs[8 * k + i]), xs[8 * k + i])
                      for i in range(8)]
                mn, imin = ax[0], c.i(0)
                for i in range(1, 8):
                    lt = b.fcmp_ordered("<", ax[i], mn)
                    mn, imin = b.select(lt, ax[i], mn), b.select(lt, c.i(i), imin)
                for i in range(8):
                    flip = b.and_(odd, b.icmp_signed("==", imin, c.i(i)))
                    xv[i] = b.select(flip, b.fneg(xv[i]), xv[i])
                s = b.select(odd, b.xor(s, b.shl(c.i(1), imin)), s)
                s = b.and_(s, c.i(127))
            for i in range(8):
                c.st(xv[i], xval, 8 * k + i)
            c.st(s, signs, k)

        mx = c.ld(xval, 0)
        for i in range(1, sub):
            mx = c.fmax(mx, c.ld(xval, i))
        b.store(ir.Constant(vb, [0] * sub), Lv, align=1)
        c.st(c.f(0.0), scales, ib)
        with b.if_then(b.not_(b.fcmp_ordered("<", mx, eps))):
            live = c.var(i1, const(i1, 1))
            if xxs:
                sc = b.call(make_qp, [xval, L, weight])
                eff_max = b.fmul(sc, c.f(3.0))
                c.st(sc, scale_v)
                c.st(b.not_(b.fcmp_ordered("<=", eff_max, c.f(0.0))), live)
                base, lo, hi = eff_max, -6, 7
            else:
                c.st(b.fdiv(mx, c.f(5.0)), scale_v)
                base, lo, hi = mx, -9, 10
            with b.if_then(c.ld(live)):
                c.st(c.f(0.0), best_v)
                for k in range(ng):
                    c.st(const(i1, 1), on_grid, k)
                with c.loop(lo, hi, "is") as s_:
                    id_ = b.fdiv(b.fadd(c.f(5.0), b.fmul(b.sitofp(s_, f32), c.f(0.1))), base)
                    this_scale = b.fdiv(c.f(1.0), id_)
                    for k in range(ng):
                        _, on = lookup(level_fn(id_, Laux, k), Laux, k, this_scale)
                        c.st(on, on_aux, k)
                    sqx, sq2 = sums(Laux)
                    better = b.and_(b.fcmp_ordered(">", sq2, c.f(0.0)),
                                    b.fcmp_ordered(">", b.fmul(sqx, sqx),
                                                   b.fmul(c.ld(best_v), sq2)))
                    with b.if_then(better):
                        nsc = b.fdiv(sqx, sq2)
                        c.st(nsc, scale_v)
                        c.st(b.fmul(nsc, sqx), best_v)
                        b.store(b.load(Lauxv, align=1), Lv, align=1)
                        for k in range(ng):
                            c.st(c.ld(on_aux, k), on_grid, k)
                scale = c.ld(scale_v)
                pos = b.fcmp_ordered(">", scale, c.f(0.0))
                if xxs:
                    redo = pos
                else:
                    off = const(i1, 0)
                    for k in range(ng):
                        off = b.or_(off, b.not_(c.ld(on_grid, k)))
                    redo = b.and_(off, pos)
                with b.if_then(redo):
                    id_ = b.fdiv(c.f(1.0), scale)
                    for k in range(ng):
                        if xxs:
                            gi, on = lookup(level_fn(id_, None, k), L, k, scale)
                            with b.if_then(on):
                                odd_g = b.bitcast(_search_globals(m, t)[0],
                                                  ir.VectorType(i8, 8).as_pointer())
                                pg = b.load(b.gep(odd_g, [gi]), align=1)
                                v8 = ir.VectorType(i8, 8)
                                lv = b.sdiv(b.sub(pg, ir.Constant(v8, [1] * 8)),
                                            ir.Constant(v8, [2] * 8))
                                b.store(lv, b.bitcast(c.at(L, 8 * k), v8.as_pointer()), align=1)
                        else:
                            with b.if_then(b.not_(c.ld(on_grid, k))):
                                lookup(level_fn(id_, L, k), L, k, scale)
                    sqx, sq2 = sums(L)
                    with b.if_then(b.fcmp_ordered(">", sq2, c.f(0.0))):
                        c.st(b.fdiv(sqx, sq2), scale_v)
                scale = c.ld(scale_v)
                negs = b.fcmp_ordered("<", scale, c.f(0.0))
                scale = b.select(negs, b.fneg(scale), scale)
                smask = c.i(255 if is_s else 127)
                for k in range(ng):
                    sk = c.ld(signs, k)
                    sk = b.select(negs, b.and_(b.xor(sk, c.i(-1)), smask), sk)
                    u = c.i(0)
                    for i in range(8):
                        u = b.or_(u, b.shl(b.sext(c.ld(L, 8 * k + i), i32), c.i(2 * i)))
                    gi = b.and_(c.ld(kmap, b.and_(u, c.i(0xFFFF))), c.i(n_grid - 1))
                    if xxs:
                        w0 = b.bitcast(b.gep(y, [b.add(c.i(2), b.mul(ib, c.i(8)))]),
                                       i32.as_pointer())
                        w1 = b.gep(w0, [c.i(1)])
                        b.store(b.or_(b.load(w0, align=1), b.shl(gi, c.i(8 * k))), w0, align=1)
                        b.store(b.or_(b.load(w1, align=1), b.shl(sk, c.i(7 * k))), w1, align=1)
                    elif t == GGMLType.IQ2_XS:
                        p = b.bitcast(b.gep(y, [b.add(c.i(2 + 2 * k), b.mul(ib, c.i(4)))]),
                                      i16.as_pointer())
                        b.store(b.trunc(b.or_(gi, b.shl(sk, c.i(9))), i16), p, align=1)
                    else:
                        i8_ = b.add(b.mul(ib, c.i(2)), c.i(k))
                        c.st(b.trunc(gi, i8), y, b.add(i8_, c.i(2)))
                        c.st(b.trunc(sk, i8), y, b.add(i8_, c.i(34)))
                        qh = c.at(y, b.add(b.lshr(i8_, c.i(2)), c.i(66)))
                        hb = b.shl(b.lshr(gi, c.i(8)), b.mul(b.and_(i8_, c.i(3)), c.i(2)))
                        b.store(b.or_(b.load(qh), b.trunc(hb, i8)), qh)
                c.st(scale, scales, ib)
                ms = c.ld(max_scale)
                c.st(c.fmax(ms, scale), max_scale)

    ms = c.ld(max_scale)
    with b.if_else(b.fcmp_ordered("==", ms, c.f(0.0))) as (none, some):
        with none:
            if not is_s:
                z = ir.VectorType(i8, 64)
                b.store(ir.Constant(z, [0] * 64), b.bitcast(c.at(y, 2), z.as_pointer()), align=1)
        with some:
            d = b.fdiv(ms, c.f(31.0))
            dh = emit_f32_to_f16(b, b.fmul(d, c.f(0.9875)) if is_s else d,
                                 hardware_half(Target.CPU))
            b.store(dh, b.bitcast(y, i16.as_pointer()), align=1)
            idd = b.fdiv(c.f(1.0), d)
            for j in range(n_sub):
                v = b.fmul(c.f(0.5), b.fsub(b.fmul(idd, c.ld(scales, j)), c.f(1.0)))
                li = c.clamp(c.nearest_int(v), 0, 15)
                if xxs:
                    p = b.bitcast(c.at(y, 6 + 8 * j), i32.as_pointer())
                    b.store(b.or_(b.load(p, align=1), b.shl(li, c.i(28))), p, align=1)
                else:
                    p = c.at(y, (66 if t == GGMLType.IQ2_XS else 74) + j // 2)
                    b.store(b.or_(b.load(p), b.trunc(b.shl(li, c.i(4 * (j % 2))), i8)), p)
    b.ret_void()
    return fn


_PACK = {GGMLType.IQ2_XXS: _pack_xxs, GGMLType.IQ2_XS: _pack_xs, GGMLType.IQ2_S: _pack_s}


class _IQ2(QuantType):
    n_levels = 3
    uses_imatrix = True
    activation_type = GGMLType.Q8_K
    requires_imatrix = True
    row_quantizer = True

    def quantize_rows_ref(self, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        x = np.ascontiguousarray(x, F32)
        n_rows, n = x.shape
        if imatrix is None and self.requires_imatrix:
            raise UserError(f"{self.name} needs an importance matrix (--imatrix)")
        fields = quantize_iq2_ref(self.type, x, imatrix)
        return _PACK[self.type](*fields).reshape(n_rows, self.info.row_bytes(n))

    def quantize_blocks_ref(self, x: np.ndarray) -> np.ndarray:
        return self.quantize_rows_ref(x.reshape(-1, QK_K), None).reshape(-1, self.info.type_size)

    def dequantize_blocks_ref(self, q: np.ndarray) -> np.ndarray:
        return _dequantize_ref(self.type, q)

    has_dequantize_kernel = True
    has_imatrix_kernel = True

    def emit_quantize_block_imatrix(self, b: ir.IRBuilder, x: ir.Value, y: ir.Value,
                                    qw: ir.Value, row: object) -> None:
        b.call(_emit_quantize_fn(b.module, self.type), [x, y, qw])

    def quantize_rows(self, x: np.ndarray, imatrix: np.ndarray | None, threads: int | None,
                      reference: bool) -> np.ndarray:
        if imatrix is not None or reference or not self.has_quantize_kernel:
            return super().quantize_rows(x, imatrix, threads, reference)
        # the unweighted quantizer (IQ2_S) is block by block: the block kernel
        out = np.empty((x.shape[0], self.info.row_bytes(x.shape[1])), np.uint8)
        self._run(f"quantize_{self.name.lower()}", x.reshape(-1, QK_K),
                  out.reshape(-1, self.info.type_size), threads)
        return out

    def emit_dequantize_block(self, b: ir.IRBuilder, y: ir.Value, x: ir.Value) -> None:
        emit_dequantize_iq2(self.type, b, y, x)

    int_dot = int_superblock = True

    def emit_int_superblock(self, b: ir.IRBuilder, src: ir.Value) -> IntSuperBlock:
        return emit_int_superblock_iq2(self.type, b, src)

    def levels_ref(self, q: np.ndarray) -> np.ndarray:
        gi, _, _ = _fields(self.type, np.ascontiguousarray(q, np.uint8))
        return grid_levels(self.type)[gi].reshape(q.shape[0], QK_K)


@register
class IQ2_XXS(_IQ2):
    type = GGMLType.IQ2_XXS


@register
class IQ2_XS(_IQ2):
    type = GGMLType.IQ2_XS


@register
class IQ2_S(_IQ2):
    type = GGMLType.IQ2_S
    requires_imatrix = False
    has_quantize_kernel = True

    def emit_quantize_block(self, b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> None:
        b.call(_emit_quantize_fn(b.module, self.type),
               [x, y, ir.Constant(f32.as_pointer(), None)])
