"""IQ3_XXS and IQ3_S: groups of 4 weights snapped to a D4-lattice grid, one sign per weight,
a 4-bit scale per 32 weights.

IQ3_XXS block (98 bytes): fp16 d, 64 grid indices (8 bits, 256-point grid), then per 32
weights a little-endian u32: four 7-bit sign groups (the 8th sign of each group of 8 makes
the count of minus signs even) and the scale in the top 4 bits; x = d*(0.5 + s)*0.5*g.
IQ3_S block (110 bytes): fp16 d, 64 low bytes of 9-bit grid indices (512-point grid), 8
bytes of their high bits, 32 bytes of signs (one per weight), 4 bytes of scale nibbles;
x = d*(1 + 2*s)*g.

The search (ggml's `quantize_row_iq3_xxs_impl` / `quantize_row_iq3_s_impl`): per 32 weights,
try 19 (IQ3_S) or 31 (IQ3_XXS) scales; at each, round every group of 4 to the lattice cube
and, off the grid, take the best of its precomputed neighbours; keep the scale with the best
weighted fit, then re-snap the groups that were off the grid at that scale.

`search_iq3_ref` is the numpy spec (vectorised over sub-blocks and trial scales);
`build_iq3_quantizer` is the same search compiled (scalar IR in ggml's float order), which
`quantize` runs on all cores. Both give ggml's bytes.
"""

from __future__ import annotations

import ctypes
from functools import cached_property

import numpy as np
from llvmlite import ir

from ...gguf import GGMLType
from ...jit import compile_kernels, parallel_rows
from ...jit.builders import alloca_entry, const, f32, for_range, i8, i16, i32, i64, load_bytes, ptr
from ...jit.floats import load_f16, store_f16
from ..base import IntGroup, IntSuperBlock, QuantType, register, rows_by_blocks
from ..floats import f16_from_f32_ref
from ..kquants._qkx2 import nearest_int_ref
from . import _intdot
from .grids_iq3 import Iq3Grid, iq3s_grid, iq3xxs_grid

F32 = np.float32
QK = 256
CHUNK_BLOCKS = 32  # super-blocks the reference searches at once (bounds its memory)

# IQ3_XXS dequantizes through its own value table: level l -> 4*(2l + 1), the top one 62
XXS_VALUES = np.array([4, 12, 20, 28, 36, 44, 52, 62], np.uint8)


# -- numpy: the search ------------------------------------------------------------------------


def seq_sum(t: np.ndarray) -> np.ndarray:
    """Sum over the last axis in index order, from +0.0 (as a C `for` loop adds)."""
    acc = np.zeros(t.shape[:-1], F32)
    for i in range(t.shape[-1]):
        acc = acc + t[..., i]
    return acc


def best_neighbour(grid: Iq3Grid, u: np.ndarray, xval: np.ndarray, waux: np.ndarray,
                   scale: np.ndarray) -> np.ndarray:
    """ggml's iq3_find_best_neighbour for groups off the grid: cube points u (G,), values
    xval (G, 4), weights waux (G, 4), scale (G,) -> grid index (G,) of the first neighbour
    with the smallest weighted squared error."""
    cand = grid.neighbours[u]
    pts = grid.points[np.maximum(cand, 0)].astype(F32)
    d2 = np.zeros(cand.shape, F32)
    for i in range(4):
        diff = scale[:, None] * pts[..., i] - xval[:, i, None]
        d2 = d2 + waux[:, i, None] * diff * diff
    d2 = np.where((cand >= 0) & ~np.isnan(d2), d2, np.inf)
    return np.take_along_axis(cand, np.argmin(d2, axis=1)[:, None], axis=1)[:, 0]


def cube_index(L: np.ndarray) -> np.ndarray:
    """Levels (..., 4k) -> cube points (..., k): l0 | l1 << 3 | l2 << 6 | l3 << 9."""
    g = L.reshape(*L.shape[:-1], -1, 4).astype(np.int32)
    return g[..., 0] | (g[..., 1] << 3) | (g[..., 2] << 6) | (g[..., 3] << 9)


def snap(grid: Iq3Grid, L: np.ndarray, xval: np.ndarray, waux: np.ndarray,
         scale: np.ndarray, todo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Replace the groups of 4 in levels L (S, 32) that are off the grid (among `todo`
    (S, 8)) by their best neighbour at `scale` (S,). Returns (L, on the grid (S, 8))."""
    u = cube_index(L)
    on = grid.map[u] >= 0
    s, k = np.nonzero(todo & ~on)
    if s.size:
        xg = xval.reshape(-1, 8, 4)[s, k]
        wg = waux.reshape(-1, 8, 4)[s, k]
        gi = best_neighbour(grid, u[s, k], xg, wg, scale[s])
        L = L.reshape(-1, 8, 4).copy()
        L[s, k] = grid.levels[gi]
        L = L.reshape(-1, 32)
    return L, on


def fit(weight: np.ndarray, xval: np.ndarray, L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sum w*x*q and sum w*q*q over the last axis, q = 2L + 1."""
    q = (2 * L.astype(np.int32) + 1).astype(F32)
    sumqx = np.zeros(L.shape[:-1], F32)
    sumq2 = np.zeros(L.shape[:-1], F32)
    for i in range(L.shape[-1]):
        w = weight[..., i]
        sumqx = sumqx + w * xval[..., i] * q[..., i]
        sumq2 = sumq2 + w * q[..., i] * q[..., i]
    return sumqx, sumq2


def search_iq3_ref(x: np.ndarray, imatrix: np.ndarray | None, grid: Iq3Grid, xxs: bool):
    """The per-32-weights search on (nb, 256) super-blocks (imatrix: (256*nb,) weights of
    these columns, or None).

    Returns (skipped (S,), scale (S,), levels L (S, 32), signs (S, 4) bytes), S = 8*nb."""
    nb = x.shape[0]
    xb = x.reshape(nb * 8, 32)
    with np.errstate(all="ignore"):
        if imatrix is not None:
            sumx2 = seq_sum(x * x)
            sigma2 = np.repeat(F32(2) * sumx2 / F32(QK), 8)
            weight = imatrix.reshape(nb * 8, 32) * np.sqrt(sigma2[:, None] + xb * xb)
        else:
            weight = xb * xb
        waux = np.sqrt(weight)
        neg = ~(xb >= 0)
        xval = np.where(neg, -xb, xb)
        neg8 = neg.reshape(-1, 4, 8)
        if xxs:
            # an odd number of minus signs: flip the least important weight of the 8
            odd = neg8.sum(axis=2) % 2 == 1
            imp = (weight * xb * xb).reshape(-1, 4, 8)
            imin = np.argmin(np.where(np.isnan(imp), np.inf, imp), axis=2)
            s, k = np.nonzero(odd)
            xv = xval.reshape(-1, 4, 8).copy()
            xv[s, k, imin[s, k]] = -xv[s, k, imin[s, k]]
            xval = xv.reshape(-1, 32)
            neg8 = neg8.copy()
            neg8[s, k, imin[s, k]] ^= True
        signs = (neg8.astype(np.int32) << np.arange(8)).sum(axis=2)
        if xxs:
            signs &= 127
        mx = xval.max(axis=1)
        skipped = (mx < F32(1e-8)) if xxs else (mx == 0)
        mx = np.where(skipped, F32(1), mx)

        n_is = 15 if xxs else 9
        iss = np.arange(-n_is, n_is + 1).astype(F32)
        ids = (F32(15) + iss[:, None] * F32(0.2)) / mx[None, :]  # (T, S)
        this_scale = F32(1) / ids
        T, S = ids.shape
        Laux = np.clip(nearest_int_ref(F32(0.5) * (ids[:, :, None] * xval[None] - F32(1))), 0, 7)
        rep = lambda a: np.broadcast_to(a, (T, *a.shape)).reshape(T * S, -1)  # noqa: E731
        Laux, on_aux = snap(grid, Laux.reshape(T * S, 32), rep(xval), rep(waux),
                            this_scale.reshape(-1), np.ones((T * S, 8), bool))
        Laux, on_aux = Laux.reshape(T, S, 32), on_aux.reshape(T, S, 8)
        sumqx, sumq2 = fit(weight[None], xval[None], Laux)

        best = np.zeros(S, F32)
        scale = mx / F32(15)
        L = np.zeros((S, 32), np.int64)
        on_grid = np.full((S, 8), xxs)
        for t in range(T):
            better = (sumq2[t] > 0) & (sumqx[t] * sumqx[t] > best * sumq2[t])
            scale = np.where(better, sumqx[t] / sumq2[t], scale)
            best = np.where(better, scale * sumqx[t], best)
            L = np.where(better[:, None], Laux[t], L)
            on_grid = np.where(better[:, None], on_aux[t], on_grid)

        redo = (~on_grid).any(axis=1) & (scale > 0) & ~skipped
        if redo.any():
            r = np.flatnonzero(redo)
            id_ = F32(1) / scale[r]
            L2 = np.clip(nearest_int_ref(F32(0.5) * (id_[:, None] * xval[r] - F32(1))), 0, 7)
            todo = ~on_grid[r] if xxs else np.ones((r.size, 8), bool)
            L2, _ = snap(grid, L2, xval[r], waux[r], scale[r], np.ones((r.size, 8), bool))
            L2 = np.where(np.repeat(todo, 4, axis=1), L2, L[r])
            sx, s2 = fit(weight[r], xval[r], L2)
            L[r] = L2
            scale[r] = np.where(s2 > 0, sx / s2, scale[r])

        flip = scale < 0
        scale = np.where(flip, -scale, scale)
        signs = np.where(flip[:, None], ~signs & (127 if xxs else 255), signs)
        scale = np.where(skipped, F32(0), scale)
        L = np.where(skipped[:, None], 0, L)
    return skipped, scale.astype(F32), L, signs.astype(np.uint8)


def block_scales_ref(scale: np.ndarray, fudge: float) -> tuple[np.ndarray, np.ndarray]:
    """Per super-block: fp16 bits of d = max scale / 31 (times the fudge factor), and each
    32-weight scale as l in [0, 15] with scale ~ d*(2l + 1). scale: (nb, 8)."""
    with np.errstate(all="ignore"):
        max_scale = scale.max(axis=1)
        d = max_scale / F32(31)
        dh = f16_from_f32_ref(d * F32(fudge))
        id_ = F32(1) / d
        ls = np.clip(nearest_int_ref(F32(0.5) * (id_[:, None] * scale - F32(1))), 0, 15)
    zero = max_scale == 0
    return np.where(zero, 0, dh).astype(np.uint16), np.where(zero[:, None], 0, ls)


def dh_bytes(dh: np.ndarray) -> np.ndarray:
    return dh.astype("<u2").view(np.uint8).reshape(-1, 2)


# -- IR: dequantization -----------------------------------------------------------------------


def grid_table(b: ir.IRBuilder, name: str, words: np.ndarray,
               elem: ir.IntType = i32) -> ir.GlobalVariable:
    """A constant [n x elem] table in the builder's module (made once per module)."""
    m = b.module
    g = m.globals.get(name)
    if g is None:
        t = ir.ArrayType(elem, len(words))
        g = ir.GlobalVariable(m, t, name)
        g.global_constant = True
        g.linkage = "internal"
        g.initializer = ir.Constant(t, [int(w) for w in words])
    return g


def emit_grid_bytes(b: ir.IRBuilder, table: ir.GlobalVariable, index: list[ir.Value]) -> ir.Value:
    """The 4 bytes of each grid point index[k] (i32), as one <4n x i32> vector."""
    vt = ir.VectorType(i32, len(index))
    v = ir.Constant(vt, ir.Undefined)
    for k, ix in enumerate(index):
        w = b.load(b.gep(table, [const(i32, 0), ix], inbounds=True), align=4)
        v = b.insert_element(v, w, const(i32, k))
    bytes_ = b.bitcast(v, ir.VectorType(i8, 4 * len(index)))
    return b.zext(bytes_, ir.VectorType(i32, 4 * len(index)))


def emit_load_u8(b: ir.IRBuilder, y: ir.Value, offset: int) -> ir.Value:
    return b.zext(b.load(b.gep(y, [const(i32, offset)])), i32)


def emit_signs32(b: ir.IRBuilder, sign_bytes: list[ir.Value]) -> ir.Value:
    """Four i32 sign bytes (bit j of byte l: weight 8l + j is negative) -> <32 x float> of
    +-1.0."""
    v32 = ir.VectorType(i32, 32)
    v = ir.Constant(ir.VectorType(i32, 4), ir.Undefined)
    for l, s in enumerate(sign_bytes):
        v = b.insert_element(v, s, const(i32, l))
    spread = b.shuffle_vector(v, v, ir.Constant(v32, [e // 8 for e in range(32)]))
    bit = b.and_(spread, ir.Constant(v32, [1 << (e % 8) for e in range(32)]))
    neg = b.icmp_unsigned("!=", bit, ir.Constant(v32, [0] * 32))
    vf = ir.VectorType(f32, 32)
    return b.select(neg, ir.Constant(vf, [-1.0] * 32), ir.Constant(vf, [1.0] * 32))


def emit_store32(b: ir.IRBuilder, v: ir.Value, x: ir.Value, ib: int) -> None:
    vf = ir.VectorType(f32, 32)
    b.store(v, b.bitcast(b.gep(x, [const(i32, 32 * ib)]), vf.as_pointer()), align=4)


def emit_scaled(b: ir.IRBuilder, db: ir.Value, grid: ir.Value, signs: ir.Value) -> ir.Value:
    """db * g * sign, in ggml's order."""
    vf = ir.VectorType(f32, 32)
    dbv = b.shuffle_vector(b.insert_element(ir.Constant(vf, ir.Undefined), db, const(i32, 0)),
                           ir.Constant(vf, ir.Undefined),
                           ir.Constant(ir.VectorType(i32, 32), [0] * 32))
    return b.fmul(b.fmul(dbv, b.uitofp(grid, vf)), signs)


# -- the types --------------------------------------------------------------------------------


def run_row_kernel(kernel, tables: tuple[np.ndarray, ...], x: np.ndarray,
                   imatrix: np.ndarray | None, row_bytes: int, threads: int | None) -> np.ndarray:
    """Run a compiled `(x, y, qw or null, n_rows, n_per_row, *tables)` row quantizer on all
    cores."""
    x = np.ascontiguousarray(x, F32)
    n_rows, n = x.shape
    out = np.empty((n_rows, row_bytes), np.uint8)
    if n_rows == 0 or n == 0:
        return out
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, F32)
    qw = None if imatrix is None else imatrix.ctypes.data
    x0, y0, xs, ys = x.ctypes.data, out.ctypes.data, x.strides[0], out.strides[0]
    tp = [t.ctypes.data for t in tables]
    parallel_rows(lambda a, c: kernel(x0 + a * xs, y0 + a * ys, qw, c - a, n, *tp), n_rows,
                  threads)
    return out



class _Iq3(QuantType):
    n_levels = 16  # levels by sign and magnitude: 8 + l for x >= 0, 7 - l below
    uses_imatrix = True
    activation_type = GGMLType.Q8_K
    row_quantizer = True
    has_dequantize_kernel = True
    xxs = False

    def quantize_blocks_ref(self, x: np.ndarray) -> np.ndarray:
        return self.quantize_rows_ref(np.asarray(x, F32).reshape(1, -1), None).reshape(
            -1, self.info.type_size)

    def quantize_rows_ref(self, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        return rows_by_blocks(x, imatrix, QK, self.info.type_size,
                              self._quantize_super_blocks, CHUNK_BLOCKS)

    def row_modules(self) -> dict[str, ir.Module]:
        return {"rows": build_iq3_quantizer(self.xxs)}

    @cached_property
    def _row_kernel(self):
        name = f"quantize_{self.name.lower()}"
        return compile_kernels(build_iq3_quantizer(self.xxs), {name: _ROWS_SIG})[name]

    @cached_property
    def _tables(self) -> tuple[np.ndarray, ...]:
        grid = iq3xxs_grid() if self.xxs else iq3s_grid()
        fmap, lists = grid.flat_neighbours()
        return (np.ascontiguousarray(grid.packed()), fmap, lists)

    def quantize_rows(self, x: np.ndarray, imatrix: np.ndarray | None, threads: int | None,
                      reference: bool) -> np.ndarray:
        if reference:
            return self.quantize_rows_ref(x, imatrix)
        return run_row_kernel(self._row_kernel, self._tables, x, imatrix,
                              self.info.row_bytes(x.shape[1]), threads)

    def levels_ref(self, q: np.ndarray) -> np.ndarray:
        mag, neg = self._levels_signs(q)
        return np.where(neg, 7 - mag, 8 + mag)


@register
class IQ3_S(_Iq3):
    type = GGMLType.IQ3_S

    def _quantize_super_blocks(self, x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        grid = iq3s_grid()
        nb = x.shape[0]
        skipped, scale, L, signs = search_iq3_ref(x, imatrix, grid, xxs=False)
        gi = grid.map[cube_index(L)].reshape(nb, 8, 8)  # (block, sub-block, group)
        assert (gi >= 0).all()
        qh = ((gi >> 8) << np.arange(8)).sum(axis=2).astype(np.uint8)
        # ggml moves its qs/signs pointers on only past the sub-blocks it quantized: those
        # after a skipped (all-zero) one land one slot early, the tail stays zero
        qs = np.zeros((nb, 8, 8), np.uint8)
        sg = np.zeros((nb, 8, 4), np.uint8)
        kept = ~skipped.reshape(nb, 8)
        slot = np.cumsum(kept, axis=1) - 1
        bi, ib = np.nonzero(kept)
        qs[bi, slot[bi, ib]] = (gi[bi, ib] & 255).astype(np.uint8)
        sg[bi, slot[bi, ib]] = signs.reshape(nb, 8, 4)[bi, ib]
        dh, ls = block_scales_ref(scale.reshape(nb, 8), 1.033)
        sc = (ls[:, 0::2] | (ls[:, 1::2] << 4)).astype(np.uint8)
        return np.concatenate([dh_bytes(dh), qs.reshape(nb, 64), qh, sg.reshape(nb, 32), sc],
                              axis=1)

    def _indices(self, q: np.ndarray) -> np.ndarray:
        qs = q[:, 2:66].reshape(-1, 8, 8).astype(np.int32)
        qh = q[:, 66:74].astype(np.int32)
        return qs | (((qh[:, :, None] >> np.arange(8)) & 1) << 8)

    def _levels_signs(self, q: np.ndarray):
        q = np.ascontiguousarray(q, np.uint8)
        mag = iq3s_grid().levels[self._indices(q)].reshape(-1, 256)
        neg = np.unpackbits(q[:, 74:106], axis=1, bitorder="little").astype(bool)
        return mag, neg

    def dequantize_blocks_ref(self, q: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(q, np.uint8)
        nb = q.shape[0]
        d = q[:, 0:2].copy().view("<f2").astype(F32)  # (nb, 1)
        sc = q[:, 106:110]
        s = np.stack([sc & 15, sc >> 4], axis=2).reshape(nb, 8).astype(np.int32)
        with np.errstate(all="ignore"):
            db = d * (1 + 2 * s).astype(F32)
            g = iq3s_grid().points[self._indices(q)].reshape(nb, 8, 32).astype(F32)
            neg = np.unpackbits(q[:, 74:106], axis=1, bitorder="little").reshape(nb, 8, 32)
            y = db[:, :, None] * g
        return np.where(neg.astype(bool), -y, y).reshape(nb, 256)

    def emit_dequantize_block(self, b: ir.IRBuilder, y: ir.Value, x: ir.Value) -> None:
        table = grid_table(b, "gguflab_iq3s_grid", iq3s_grid().packed())
        d = load_f16(b, y, 0)
        for ib in range(8):
            sc = emit_load_u8(b, y, 106 + ib // 2)
            s = b.lshr(sc, const(i32, 4)) if ib % 2 else b.and_(sc, const(i32, 15))
            db = b.fmul(d, b.sitofp(b.add(const(i32, 1), b.shl(s, const(i32, 1))), f32))
            qh = emit_load_u8(b, y, 66 + ib)
            index = []
            for k in range(8):
                hi = b.shl(b.and_(b.lshr(qh, const(i32, k)), const(i32, 1)), const(i32, 8))
                index.append(b.or_(emit_load_u8(b, y, 2 + 8 * ib + k), hi))
            signs = emit_signs32(b, [emit_load_u8(b, y, 74 + 4 * ib + l) for l in range(4)])
            emit_store32(b, emit_scaled(b, db, emit_grid_bytes(b, table, index), signs), x, ib)

    int_dot = int_superblock = True

    def emit_int_superblock(self, b: ir.IRBuilder, src: ir.Value) -> IntSuperBlock:
        """As ggml's AVX2 `vec_dot_iq3_s_q8_K` reads a block: per 32 weights 8 grid points
        (the 9-bit index of each: a byte of qs, a bit of qh), 32 signs, the factor 2s + 1;
        d the fp16 scale (its tiled kernel's too)."""
        table = grid_table(b, "gguflab_iq3s_grid", iq3s_grid().packed())
        v8 = ir.VectorType(i32, 8)

        def group(g: int) -> IntGroup:
            qs = b.zext(load_bytes(b, src, 2 + 8 * g, 8), v8)
            qh = b.zext(b.load(b.gep(src, [const(i32, 66 + g)])), i32)
            hi = b.and_(b.shl(_intdot.splat_i32(b, qh, 8), ir.Constant(v8, list(range(8, 0, -1)))),
                        ir.Constant(v8, [256] * 8))
            idx = b.or_(qs, hi)
            mag = _intdot.grid_bytes(b, table, [b.extract_element(idx, const(i32, k))
                                               for k in range(8)])
            neg = _intdot.sign_bits(b, load_bytes(b, src, 74 + 4 * g, 4))
            sc = emit_load_u8(b, src, 106 + g // 2)
            ls = b.lshr(sc, const(i32, 4)) if g % 2 else b.and_(sc, const(i32, 15))
            return IntGroup(_intdot.signed(b, mag, neg), True, None, None,
                            _intdot.pair_factors(b, _intdot.odd_factor(b, ls)))

        return IntSuperBlock(group, load_f16(b, src, 0))


@register
class IQ3_XXS(_Iq3):
    type = GGMLType.IQ3_XXS
    xxs = True

    def _quantize_super_blocks(self, x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        grid = iq3xxs_grid()
        nb = x.shape[0]
        skipped, scale, L, signs = search_iq3_ref(x, imatrix, grid, xxs=True)
        gi = grid.map[cube_index(L)].reshape(nb, 64)
        assert (gi >= 0).all()
        sg = signs.reshape(nb, 8, 4).astype(np.uint32)
        aux = sg[..., 0] | (sg[..., 1] << 7) | (sg[..., 2] << 14) | (sg[..., 3] << 21)
        aux = np.where(skipped.reshape(nb, 8), 0, aux).astype(np.uint32)
        qs = np.where(skipped.reshape(nb, 8, 1), 0, gi.reshape(nb, 8, 8)).reshape(nb, 64)
        dh, ls = block_scales_ref(scale.reshape(nb, 8), 1.0125)
        aux = aux | (ls.astype(np.uint32) << 28)
        out = np.concatenate([dh_bytes(dh), qs.astype(np.uint8),
                              aux.astype("<u4").view(np.uint8).reshape(nb, 32)], axis=1)
        out[scale.reshape(nb, 8).max(axis=1) == 0, 2:] = 0  # no scale: all of it zero
        return out

    def _aux(self, q: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(q[:, 66:98]).view("<u4").astype(np.uint32)  # (nb, 8)

    def _neg(self, aux: np.ndarray) -> np.ndarray:
        """(nb, 8) words -> (nb, 256) signs; the 8th of each group gives even parity."""
        s7 = (aux[:, :, None] >> (7 * np.arange(4, dtype=np.uint32))) & 127  # (nb, 8, 4)
        bits = (s7[..., None] >> np.arange(7, dtype=np.uint32)) & 1  # (nb, 8, 4, 7)
        bits = np.concatenate([bits, bits.sum(axis=3, keepdims=True) & 1], axis=3)
        return bits.reshape(-1, 256).astype(bool)

    def _levels_signs(self, q: np.ndarray):
        q = np.ascontiguousarray(q, np.uint8)
        mag = iq3xxs_grid().levels[q[:, 2:66]].reshape(-1, 256)
        return mag, self._neg(self._aux(q))

    def dequantize_blocks_ref(self, q: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(q, np.uint8)
        nb = q.shape[0]
        d = q[:, 0:2].copy().view("<f2").astype(F32)  # (nb, 1)
        aux = self._aux(q)
        with np.errstate(all="ignore"):
            db = d * (F32(0.5) + (aux >> 28).astype(F32)) * F32(0.5)
            g = XXS_VALUES[iq3xxs_grid().levels[q[:, 2:66]]].reshape(nb, 8, 32).astype(F32)
            y = db[:, :, None] * g
        return np.where(self._neg(aux).reshape(nb, 8, 32), -y, y).reshape(nb, 256)

    def emit_dequantize_block(self, b: ir.IRBuilder, y: ir.Value, x: ir.Value) -> None:
        words = XXS_VALUES[iq3xxs_grid().levels].view("<u4").reshape(-1)
        table = grid_table(b, "gguflab_iq3xxs_grid", words)
        d = load_f16(b, y, 0)
        ctpop = b.module.declare_intrinsic("llvm.ctpop", [i32])
        for ib in range(8):
            w = b.load(b.bitcast(b.gep(y, [const(i32, 66 + 4 * ib)]), i32.as_pointer()),
                       align=1)
            s = b.uitofp(b.lshr(w, const(i32, 28)), f32)
            db = b.fmul(b.fmul(d, b.fadd(const(f32, 0.5), s)), const(f32, 0.5))
            sign_bytes = []
            for l in range(4):
                s7 = b.and_(b.lshr(w, const(i32, 7 * l)), const(i32, 127))
                par = b.and_(b.call(ctpop, [s7]), const(i32, 1))
                sign_bytes.append(b.or_(s7, b.shl(par, const(i32, 7))))
            index = [emit_load_u8(b, y, 2 + 8 * ib + k) for k in range(8)]
            grid = emit_grid_bytes(b, table, index)
            emit_store32(b, emit_scaled(b, db, grid, emit_signs32(b, sign_bytes)), x, ib)

    int_dot = int_superblock = True

    def emit_int_superblock(self, b: ir.IRBuilder, src: ir.Value) -> IntSuperBlock:
        """As ggml's AVX2 `vec_dot_iq3_xxs_q8_K` reads a block: per 32 weights 8 grid points
        (a byte of qs each), four 7-bit sign fields with their parity bit, the factor 2s + 1.
        d is the fp16 scale times 0.25, as ggml's tiled kernel takes it; its vec_dot takes
        the 0.25 off the whole sum instead, the same bits (a power of two: exact but where a
        result falls below 2^-126)."""
        words = XXS_VALUES[iq3xxs_grid().levels].view("<u4").reshape(-1)
        table = grid_table(b, "gguflab_iq3xxs_grid", words)

        def group(g: int) -> IntGroup:
            qs = b.zext(load_bytes(b, src, 2 + 8 * g, 8), ir.VectorType(i32, 8))
            mag = _intdot.grid_bytes(b, table, [b.extract_element(qs, const(i32, k))
                                               for k in range(8)])
            w = b.load(b.bitcast(b.gep(src, [const(i32, 66 + 4 * g)]), i32.as_pointer()),
                       align=1)
            sgn = _intdot.even_signs(b, [b.and_(b.lshr(w, const(i32, 7 * l)),
                                                const(i32, 127)) for l in range(4)])
            return IntGroup(_intdot.apply_signs(b, mag, sgn), True, None, None,
                            _intdot.pair_factors(b, _intdot.odd_factor(b, b.lshr(
                                w, const(i32, 28)))))

        d = b.fmul(load_f16(b, src, 0), const(f32, 0.25))
        return IntSuperBlock(group, d)


# -- IR: the compiled quantizer ---------------------------------------------------------------
#
# The search above, written as ggml writes it (one super-block at a time, scalar float ops in
# the same order, no fast-math), so that it gives the same bytes. Tables: the grid as packed
# odd levels, and the cube map and neighbour lists in ggml's layout.

# (x, y, qw or null, n_rows, n_per_row, grid, map, neighbour lists)
_ROWS_SIG = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                             ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                             ctypes.c_void_p)
_MAGIC = 12582912.0  # nearest_int: 1.5 * 2**23


class ScalarOps:
    """Scalar C-like helpers over one builder."""

    def __init__(self, b: ir.IRBuilder):
        self.b = b

    @staticmethod
    def f(v: float) -> ir.Constant:
        return ir.Constant(f32, float(F32(v)))

    @staticmethod
    def i(v: int) -> ir.Constant:
        return ir.Constant(i32, v)

    def var(self, t: ir.Type, init: ir.Value, name: str = "") -> ir.Value:
        p = alloca_entry(self.b, t, 1, name)
        self.b.store(init, p)
        return p

    def arr(self, t: ir.Type, n: int, name: str = "") -> ir.Value:
        return alloca_entry(self.b, t, n, name)

    def at(self, p: ir.Value, i) -> ir.Value:
        return self.b.gep(p, [self.i(i) if isinstance(i, int) else i])

    def ld(self, p: ir.Value, i=None) -> ir.Value:
        return self.b.load(p if i is None else self.at(p, i))

    def st(self, v: ir.Value, p: ir.Value, i=None) -> None:
        self.b.store(v, p if i is None else self.at(p, i))

    def sqrt(self, v: ir.Value) -> ir.Value:
        return self.b.call(self.b.module.declare_intrinsic("llvm.sqrt", [f32]), [v])

    def nearest_int(self, v: ir.Value) -> ir.Value:
        b = self.b
        bits = b.bitcast(b.fadd(v, self.f(_MAGIC)), i32)
        return b.sub(b.and_(bits, self.i(0x007FFFFF)), self.i(0x00400000))

    def clamp(self, v: ir.Value, hi: int) -> ir.Value:
        b = self.b
        v = b.select(b.icmp_signed("<", self.i(hi), v), self.i(hi), v)
        return b.select(b.icmp_signed(">", self.i(0), v), self.i(0), v)

    def fabs(self, v: ir.Value) -> ir.Value:
        return self.b.call(self.b.module.declare_intrinsic("llvm.fabs", [f32]), [v])

    def fmax(self, a: ir.Value, c: ir.Value) -> ir.Value:
        """C's MAX(a, c): a > c ? a : c."""
        return self.b.select(self.b.fcmp_ordered(">", a, c), a, c)

    def level(self, idv: ir.Value, xv: ir.Value) -> ir.Value:
        """MAX(0, MIN(7, nearest_int(0.5f*(id*x - 1))))."""
        b = self.b
        return self.clamp(self.nearest_int(b.fmul(self.f(0.5), b.fsub(b.fmul(idv, xv),
                                                                     self.f(1.0)))), 7)

    def grid_level(self, word: ir.Value, i: int) -> ir.Value:
        """(pg[i] - 1)/2 of a packed grid point."""
        b = self.b
        return b.lshr(b.sub(b.and_(b.lshr(word, self.i(8 * i)), self.i(255)), self.i(1)),
                      self.i(1))


def _emit_best_neighbour(m: ir.Module) -> ir.Function:
    """i32 best(u16 *list, f32 *xval, f32 *waux, f32 scale, i8 *L, u32 *grid):
    iq3_find_best_neighbour."""
    fn = ir.Function(m, ir.FunctionType(i32, [ptr(i16), ptr(f32), ptr(f32), f32, ptr(i8),
                                              ptr(i32)]), "iq3_best_neighbour")
    fn.linkage = "internal"
    nbr, xval, waux, scale, L, grid = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    o = ScalarOps(b)
    n = b.zext(o.ld(nbr), i32)
    best = o.var(f32, o.f(np.finfo(np.float32).max))
    gi = o.var(i32, o.i(-1))
    with for_range(b, o.i(1), b.add(n, o.i(1)), name="j") as j:
        idx = b.zext(o.ld(nbr, j), i32)
        word = b.load(b.gep(grid, [idx]))
        d2 = o.f(0.0)
        for i in range(4):
            q = b.uitofp(b.and_(b.lshr(word, o.i(8 * i)), o.i(255)), f32)
            diff = b.fsub(b.fmul(scale, q), o.ld(xval, i))
            d2 = b.fadd(d2, b.fmul(b.fmul(o.ld(waux, i), diff), diff))
        better = b.fcmp_ordered("<", d2, o.ld(best))
        o.st(b.select(better, d2, o.ld(best)), best)
        o.st(b.select(better, idx, o.ld(gi)), gi)
    g = o.ld(gi)
    g = b.select(b.icmp_signed("<", g, o.i(0)), o.i(0), g)  # ggml aborts here (NaN input)
    word = b.load(b.gep(grid, [g]))
    for i in range(4):
        o.st(b.trunc(o.grid_level(word, i), i8), L, i)
    b.ret(g)
    return fn


def build_iq3_quantizer(xxs: bool) -> ir.Module:
    """`quantize_<t>(f32 *x, u8 *y, f32 *qw or null, i64 n_rows, i64 n_per_row,
    u32 *grid, i32 *map, u16 *lists)` (the tables of `Iq3Grid.flat_neighbours`)."""
    name = "quantize_iq3_xxs" if xxs else "quantize_iq3_s"
    ts = 98 if xxs else 110
    m = ir.Module(name=name)
    best_nb = _emit_best_neighbour(m)
    fn = ir.Function(m, ir.FunctionType(ir.VoidType(), [ptr(f32), ptr(i8), ptr(f32), i64, i64,
                                                        ptr(i32), ptr(i32), ptr(i16)]), name)
    for a in fn.args[:3]:
        a.add_attribute("noalias")
    x, y, qw, n_rows, n, gt, mt, nt = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    o = ScalarOps(b)
    c64 = lambda v: ir.Constant(i64, v)  # noqa: E731
    has_qw = b.icmp_unsigned("!=", qw, ir.Constant(ptr(f32), None))
    nb = b.sdiv(n, c64(QK))
    weight, xval, waux = o.arr(f32, 32), o.arr(f32, 32), o.arr(f32, 32)
    L, Laux = o.arr(i8, 32), o.arr(i8, 32)
    on_grid, on_aux = o.arr(i8, 8), o.arr(i8, 8)
    signs, scales = o.arr(i32, 4), o.arr(f32, 8)
    max_scale, slot = o.var(f32, o.f(0)), o.var(i32, o.i(0))
    best, scale = o.var(f32, o.f(0)), o.var(f32, o.f(0))
    n_is = 15 if xxs else 9

    def map_of(u):
        return b.load(b.gep(mt, [u]))

    def neighbour_list(gi):
        return b.gep(nt, [b.sub(o.i(-1), gi)])

    def fit(levels):
        sx, s2 = o.var(f32, o.f(0)), o.var(f32, o.f(0))
        with for_range(b, o.i(0), o.i(32), name="fit") as i:
            w = o.ld(weight, i)
            q = b.sitofp(b.add(b.shl(b.sext(o.ld(levels, i), i32), o.i(1)), o.i(1)), f32)
            o.st(b.fadd(o.ld(sx), b.fmul(b.fmul(w, o.ld(xval, i)), q)), sx)
            o.st(b.fadd(o.ld(s2), b.fmul(b.fmul(w, q), q)), s2)
        return o.ld(sx), o.ld(s2)

    with for_range(b, c64(0), n_rows, name="row") as r:
        with for_range(b, c64(0), nb, name="blk") as ibl:
            xbl = b.gep(x, [b.add(b.mul(r, n), b.mul(ibl, c64(QK)))])
            yb = b.gep(y, [b.mul(b.add(b.mul(r, nb), ibl), c64(ts))])
            with for_range(b, o.i(0), o.i(ts), name="zero") as i:
                o.st(ir.Constant(i8, 0), yb, i)
            sumx2 = o.var(f32, o.f(0))
            with for_range(b, o.i(0), o.i(QK), name="sx2") as i:
                v = o.ld(xbl, i)
                o.st(b.fadd(o.ld(sumx2), b.fmul(v, v)), sumx2)
            sigma2 = b.fdiv(b.fmul(o.f(2), o.ld(sumx2)), o.f(QK))
            o.st(o.f(0), max_scale)
            o.st(o.i(0), slot)
            with for_range(b, o.i(0), o.i(8), name="ib") as ib:
                xb = b.gep(xbl, [b.mul(ib, o.i(32))])
                with b.if_else(has_qw) as (then, otherwise):
                    with then:
                        qwb = b.gep(qw, [b.add(b.mul(ibl, c64(QK)), b.sext(b.mul(ib, o.i(32)),
                                                                             i64))])
                        with for_range(b, o.i(0), o.i(32), name="w1") as i:
                            v = o.ld(xb, i)
                            s = o.sqrt(b.fadd(sigma2, b.fmul(v, v)))
                            o.st(b.fmul(o.ld(qwb, i), s), weight, i)
                    with otherwise:
                        with for_range(b, o.i(0), o.i(32), name="w2") as i:
                            v = o.ld(xb, i)
                            o.st(b.fmul(v, v), weight, i)
                with for_range(b, o.i(0), o.i(32), name="wa") as i:
                    o.st(o.sqrt(o.ld(weight, i)), waux, i)
                for k in range(4):
                    s, nflip, xs = o.i(0), o.i(0), []
                    for i in range(8):
                        v = o.ld(xb, 8 * k + i)
                        neg = b.not_(b.fcmp_ordered(">=", v, o.f(0)))
                        xs.append(b.select(neg, b.fneg(v), v))
                        s = b.or_(s, b.shl(b.zext(neg, i32), o.i(i)))
                        nflip = b.add(nflip, b.zext(neg, i32))
                    if xxs:
                        # an odd number of minus signs: flip the least important weight
                        def imp(i, k=k):
                            v = o.ld(xb, 8 * k + i)
                            return b.fmul(b.fmul(o.ld(weight, 8 * k + i), v), v)

                        mn, imin = imp(0), o.i(0)
                        for i in range(1, 8):
                            a = imp(i)
                            lt = b.fcmp_ordered("<", a, mn)
                            mn, imin = b.select(lt, a, mn), b.select(lt, o.i(i), imin)
                        odd = b.icmp_unsigned("!=", b.and_(nflip, o.i(1)), o.i(0))
                        for i in range(8):
                            hit = b.and_(odd, b.icmp_unsigned("==", imin, o.i(i)))
                            xs[i] = b.select(hit, b.fneg(xs[i]), xs[i])
                        s = b.xor(s, b.select(odd, b.shl(o.i(1), imin), o.i(0)))
                        s = b.and_(s, o.i(127))
                    for i in range(8):
                        o.st(xs[i], xval, 8 * k + i)
                    o.st(s, signs, k)
                mx = o.ld(xval, 0)
                for i in range(1, 32):
                    mx = o.fmax(mx, o.ld(xval, i))
                for i in range(32):
                    o.st(ir.Constant(i8, 0), L, i)
                skip = (b.fcmp_ordered("<", mx, o.f(1e-8)) if xxs
                        else b.fcmp_ordered("==", mx, o.f(0)))
                with b.if_else(skip) as (then, otherwise):
                    with then:
                        o.st(o.f(0), scales, ib)
                    with otherwise:
                        _emit_search(b, o, xxs, n_is, mx, weight, xval, waux, L, Laux,
                                     on_grid, on_aux, best, scale, map_of, neighbour_list,
                                     best_nb, fit, gt)
                        # the signs, grid indices and scale of this sub-block
                        sc = o.ld(scale)
                        flip = b.fcmp_ordered("<", sc, o.f(0))
                        o.st(b.select(flip, b.fneg(sc), sc), scale)
                        for k in range(4):
                            s = o.ld(signs, k)
                            ns = b.and_(b.not_(s), o.i(127 if xxs else 255))
                            o.st(b.select(flip, ns, s), signs, k)
                        sl = o.ld(slot)
                        for k in range(8):
                            u = o.i(0)
                            for i in range(4):
                                lv = b.sext(o.ld(L, 4 * k + i), i32)
                                u = b.or_(u, b.shl(lv, o.i(3 * i)))
                            gi = map_of(u)
                            gi = b.select(b.icmp_signed("<", gi, o.i(0)), o.i(0), gi)
                            if xxs:
                                o.st(b.trunc(gi, i8), yb, b.add(b.mul(ib, o.i(8)), o.i(2 + k)))
                            else:
                                o.st(b.trunc(gi, i8), yb, b.add(b.mul(sl, o.i(8)), o.i(2 + k)))
                                qh = o.at(yb, b.add(ib, o.i(66)))
                                hi = b.shl(b.trunc(b.lshr(gi, o.i(8)), i8), ir.Constant(i8, k))
                                o.st(b.or_(o.ld(qh), hi), qh)
                        if xxs:
                            w = o.i(0)
                            for k in range(4):
                                w = b.or_(w, b.shl(o.ld(signs, k), o.i(7 * k)))
                            p = b.bitcast(o.at(yb, b.add(b.mul(ib, o.i(4)), o.i(66))), ptr(i32))
                            b.store(w, p, align=1)
                        else:
                            for k in range(4):
                                o.st(b.trunc(o.ld(signs, k), i8), yb,
                                     b.add(b.mul(sl, o.i(4)), o.i(74 + k)))
                            o.st(b.add(sl, o.i(1)), slot)
                        o.st(o.ld(scale), scales, ib)
                        o.st(o.fmax(o.ld(max_scale), o.ld(scale)), max_scale)
            ms = o.ld(max_scale)
            with b.if_else(b.fcmp_ordered("==", ms, o.f(0))) as (then, otherwise):
                with then:
                    if xxs:
                        with for_range(b, o.i(2), o.i(ts), name="clr") as i:
                            o.st(ir.Constant(i8, 0), yb, i)
                with otherwise:
                    d = b.fdiv(ms, o.f(31))
                    store_f16(b, b.fmul(d, o.f(1.0125 if xxs else 1.033)), yb, 0)
                    idv = b.fdiv(o.f(1), d)
                    for ib in range(8):
                        v = b.fmul(o.f(0.5), b.fsub(b.fmul(idv, o.ld(scales, ib)), o.f(1)))
                        lv = o.clamp(o.nearest_int(v), 15)
                        if xxs:
                            p = b.bitcast(o.at(yb, 66 + 4 * ib), ptr(i32))
                            b.store(b.or_(b.load(p, align=1), b.shl(lv, o.i(28))), p, align=1)
                        else:
                            p = o.at(yb, 106 + ib // 2)
                            o.st(b.or_(o.ld(p), b.trunc(b.shl(lv, o.i(4 * (ib % 2))), i8)), p)
    b.ret_void()
    return m


def _emit_search(b, o, xxs, n_is, mx, weight, xval, waux, L, Laux, on_grid, on_aux, best,
                 scale, map_of, neighbour_list, best_nb, fit, gt) -> None:
    """The scale search of one sub-block: leaves its levels in L and its scale in `scale`."""
    o.st(o.f(0), best)
    o.st(b.fdiv(mx, o.f(15)), scale)
    for k in range(8):
        o.st(ir.Constant(i8, int(xxs)), on_grid, k)
    with for_range(b, o.i(-n_is), o.i(n_is + 1), name="is") as is_:
        idv = b.fdiv(b.fadd(o.f(15), b.fmul(b.sitofp(is_, f32), o.f(0.2))), mx)
        this_scale = b.fdiv(o.f(1), idv)
        with for_range(b, o.i(0), o.i(8), name="k") as k:
            base = b.mul(k, o.i(4))
            u = o.i(0)
            for i in range(4):
                j = b.add(base, o.i(i))
                lv = o.level(idv, o.ld(xval, j))
                o.st(b.trunc(lv, i8), Laux, j)
                u = b.or_(u, b.shl(lv, o.i(3 * i)))
            gi = map_of(u)
            off = b.icmp_signed("<", gi, o.i(0))
            o.st(b.select(off, ir.Constant(i8, 0), ir.Constant(i8, 1)), on_aux, k)
            with b.if_then(off):
                b.call(best_nb, [neighbour_list(gi), o.at(xval, base), o.at(waux, base),
                                 this_scale, o.at(Laux, base), gt])
        sumqx, sumq2 = fit(Laux)
        better = b.and_(b.fcmp_ordered(">", sumq2, o.f(0)),
                        b.fcmp_ordered(">", b.fmul(sumqx, sumqx), b.fmul(o.ld(best), sumq2)))
        with b.if_then(better):
            sc = b.fdiv(sumqx, sumq2)
            o.st(sc, scale)
            o.st(b.fmul(sc, sumqx), best)
            for i in range(32):
                o.st(o.ld(Laux, i), L, i)
            for k in range(8):
                o.st(o.ld(on_aux, k), on_grid, k)
    n_not = o.i(0)
    for k in range(8):
        n_not = b.add(n_not, b.zext(b.icmp_unsigned("==", o.ld(on_grid, k), ir.Constant(i8, 0)),
                                    i32))
    redo = b.and_(b.icmp_signed(">", n_not, o.i(0)), b.fcmp_ordered(">", o.ld(scale), o.f(0)))
    with b.if_then(redo):
        sc = o.ld(scale)
        idv = b.fdiv(o.f(1), sc)
        with for_range(b, o.i(0), o.i(8), name="k2") as k:
            base = b.mul(k, o.i(4))
            todo = (b.icmp_unsigned("==", o.ld(on_grid, k), ir.Constant(i8, 0)) if xxs
                    else ir.Constant(ir.IntType(1), 1))
            with b.if_then(todo):
                u = o.i(0)
                for i in range(4):
                    lv = o.level(idv, o.ld(xval, b.add(base, o.i(i))))
                    u = b.or_(u, b.shl(lv, o.i(3 * i)))
                gi0 = map_of(u)
                gi = o.var(i32, gi0)
                with b.if_then(b.icmp_signed("<", gi0, o.i(0))):
                    o.st(b.call(best_nb, [neighbour_list(gi0), o.at(xval, base),
                                          o.at(waux, base), sc, o.at(L, base), gt]), gi)
                word = b.load(b.gep(gt, [o.ld(gi)]))
                for i in range(4):
                    o.st(b.trunc(o.grid_level(word, i), i8), L, b.add(base, o.i(i)))
        sumqx, sumq2 = fit(L)
        with b.if_then(b.fcmp_ordered(">", sumq2, o.f(0))):
            o.st(b.fdiv(sumqx, sumq2), scale)
