"""Shared arithmetic of Q2_K, Q4_K and Q5_K: the scale-and-min search (`make_qkx2_quants`),
ggml's `nearest_int`, and the 6-bit scale/min packing of Q4_K and Q5_K.

The numpy versions run many sub-blocks at once: arrays are laid out (element, sub-block) so
that every sum runs over the element index in the same order as the C loop, one numpy op per
element, vectorised over sub-blocks (np.sum would sum pairwise and round differently).

The IR versions use the same idea inside one super-block: a `Lanes` vector holds one value per
sub-block (8 for Q4_K/Q5_K, 16 for Q2_K), so every C loop over a sub-block's elements becomes a
straight line of vector ops whose lanes each follow the C order exactly. Data-dependent `if`s
become selects. No fast-math flags anywhere, so LLVM never reassociates or fuses.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir

from ...jit.builders import alloca_entry, const, f32, for_range, i8, i32

F32 = np.float32
_MAGIC = F32(12582912.0)  # 1.5 * 2**23: adding it leaves round-to-nearest-even in the mantissa


# -- numpy --------------------------------------------------------------------------------------


def nearest_int_ref(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int on float32, bit for bit (for any input, not only |v| < 2**22)."""
    with np.errstate(all="ignore"):
        bits = (np.asarray(v, F32) + _MAGIC).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def seq_sum_ref(t: np.ndarray) -> np.ndarray:
    """Sum over axis 0 in order, starting from +0.0 like `float s = 0; s += t[i];`."""
    acc = np.zeros(t.shape[1:], F32)
    for row in t:
        acc = acc + row
    return acc


def seq_max_ref(t: np.ndarray) -> np.ndarray:
    """`m = 0; if (t[j] > m) m = t[j];` over the last axis."""
    m = np.zeros(t.shape[:-1], F32)
    for j in range(t.shape[-1]):
        m = np.where(t[..., j] > m, t[..., j], m)
    return m


def _levels_ref(iscale, xT, mn, nmax):
    return np.clip(nearest_int_ref(iscale * (xT - mn)), 0, nmax)


def _error_ref(scale, lf, mn, xT, wT, use_mad):
    diff = scale * lf + mn - xT
    diff = np.abs(diff) if use_mad else diff * diff
    return seq_sum_ref(wT * diff)


def make_qkx2_ref(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float,
                  nstep: int, use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's make_qkx2_quants on every row of x (sub-blocks, n) with weights w.

    Returns (levels uint8 (sub-blocks, n), scale, the_min), float32 per sub-block."""
    xT = np.ascontiguousarray(np.asarray(x, F32).T)
    wT = np.ascontiguousarray(np.asarray(w, F32).T)
    n = xT.shape[0]
    fmax = F32(nmax)
    with np.errstate(all="ignore"):
        mn, mx = xT[0].copy(), xT[0].copy()
        sum_w = wT[0].copy()
        sum_x = sum_w * xT[0]
        for i in range(1, n):
            mn = np.where(xT[i] < mn, xT[i], mn)
            mx = np.where(xT[i] > mx, xT[i], mx)
            sum_w = sum_w + wT[i]
            sum_x = sum_x + wT[i] * xT[i]
        mn = np.where(mn > 0, F32(0), mn)
        flat, flat_min = mx == mn, mn
        iscale = fmax / (mx - mn)
        scale = F32(1) / iscale
        L = _levels_ref(iscale, xT, mn, nmax)
        best = _error_ref(scale, L.astype(F32), mn, xT, wT, use_mad)
        for step in range(nstep + 1):
            # `min` is the best min so far: the C code reuses the variable it updates
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + fmax) / (mx - mn)
            la = _levels_ref(iscale, xT, mn, nmax)
            lf = la.astype(F32)
            wl = wT * lf
            sum_l, sum_l2, sum_xl = seq_sum_ref(wl), seq_sum_ref(wl * lf), seq_sum_ref(wl * xT)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min = np.where(pos, F32(0), this_min)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            cur = _error_ref(this_scale, lf, this_min, xT, wT, use_mad)
            better = (D > 0) & (cur < best)
            L = np.where(better, la, L)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale)
            mn = np.where(better, this_min, mn)
        L = np.where(flat, 0, L)
        scale = np.where(flat, F32(0), scale)
        the_min = -np.where(flat, flat_min, mn)
    return np.ascontiguousarray(L.T).astype(np.uint8), scale, the_min


def requantize_ref(x: np.ndarray, L: np.ndarray, d: np.ndarray, dm: np.ndarray,
                   nmax: int) -> np.ndarray:
    """The final pass: `l = nearest_int((x + dm)/d)` clamped, where d != 0 (else L stays).
    x, L: (..., n); d, dm: (...)."""
    with np.errstate(all="ignore"):
        lv = np.clip(nearest_int_ref((x + dm[..., None]) / d[..., None]), 0, nmax)
    return np.where((d == 0)[..., None], L, lv).astype(np.uint8)


def pack_scale_min_k4_ref(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales and 8 six-bit mins (uint8 (..., 8)) -> the 12 bytes of Q4_K/Q5_K."""
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    q = np.empty((*ls.shape[:-1], 12), np.uint8)
    q[..., 0:4] = ls[..., :4] | ((ls[..., 4:] >> 4) << 6)
    q[..., 4:8] = lm[..., :4] | ((lm[..., 4:] >> 4) << 6)
    q[..., 8:12] = (ls[..., 4:] & 0xF) | ((lm[..., 4:] & 0xF) << 4)
    return q


def get_scale_min_k4_ref(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 packed bytes (..., 12) -> (scales, mins), uint8 (..., 8)."""
    q = q.astype(np.uint8)
    lo = (q[..., 0:4] & 63, q[..., 4:8] & 63)
    sc_hi = (q[..., 8:12] & 0xF) | ((q[..., 0:4] >> 6) << 4)
    m_hi = (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)
    return np.concatenate([lo[0], sc_hi], -1), np.concatenate([lo[1], m_hi], -1)


def half_bytes(h: np.ndarray) -> np.ndarray:
    """uint16 (n,) -> little-endian bytes (n, 2)."""
    return h.astype("<u2").view(np.uint8).reshape(-1, 2)


def half_ref(q: np.ndarray) -> np.ndarray:
    """Little-endian fp16 bytes (n, 2) -> float32 (n,)."""
    return np.ascontiguousarray(q).view("<f2").reshape(-1).astype(F32)


# -- IR -----------------------------------------------------------------------------------------


class Lanes:
    """Vector ops over `n` lanes (one per sub-block) with C float semantics."""

    def __init__(self, b: ir.IRBuilder, n: int):
        self.b, self.n = b, n
        self.f = ir.VectorType(f32, n)
        self.i = ir.VectorType(i32, n)

    def fc(self, v: float) -> ir.Constant:
        return ir.Constant(self.f, [float(F32(v))] * self.n)

    def ic(self, v: int) -> ir.Constant:
        return ir.Constant(self.i, [v] * self.n)

    def splat(self, s: ir.Value) -> ir.Value:
        vt = ir.VectorType(s.type, self.n)
        v = self.b.insert_element(ir.Constant(vt, ir.Undefined), s, const(i32, 0))
        return self.b.shuffle_vector(v, ir.Constant(vt, ir.Undefined),
                                     ir.Constant(ir.VectorType(i32, self.n), [0] * self.n))

    def sel(self, c, a, b_):
        return self.b.select(c, a, b_)

    def lt(self, a, b_):
        return self.b.fcmp_ordered("<", a, b_)

    def gt(self, a, b_):
        return self.b.fcmp_ordered(">", a, b_)

    def fabs(self, a):
        b = self.b
        return b.bitcast(b.and_(b.bitcast(a, self.i), self.ic(0x7FFFFFFF)), self.f)

    def sqrt(self, a):
        name = f"llvm.sqrt.v{self.n}f32"
        m = self.b.module
        fn = m.globals.get(name) or ir.Function(m, ir.FunctionType(self.f, [self.f]), name)
        return self.b.call(fn, [a])

    def nearest_int(self, a):
        b = self.b
        bits = b.bitcast(b.fadd(a, self.fc(_MAGIC)), self.i)
        return b.sub(b.and_(bits, self.ic(0x007FFFFF)), self.ic(0x00400000))

    def clamp(self, l, hi: int):
        """MAX(0, MIN(hi, l)) on i32 lanes."""
        b = self.b
        l = b.select(b.icmp_signed("<", self.ic(hi), l), self.ic(hi), l)
        return b.select(b.icmp_signed(">", self.ic(0), l), self.ic(0), l)

    def to_f(self, l):
        return self.b.sitofp(l, self.f)


def emit_load_transposed(b: ir.IRBuilder, ln: Lanes, x: ir.Value, n: int) -> list[ir.Value]:
    """From `ln.n` sub-blocks of `n` floats at x: element i of every sub-block, as lanes."""
    rows = []
    vp = b.bitcast(x, ir.VectorType(f32, n).as_pointer())
    for s in range(ln.n):
        rows.append(b.load(b.gep(vp, [const(i32, s)]), align=4))
    out = []
    for i in range(n):
        v = ir.Constant(ln.f, ir.Undefined)
        for s in range(ln.n):
            v = b.insert_element(v, b.extract_element(rows[s], const(i32, i)), const(i32, s))
        out.append(v)
    return out


def emit_seq_max(b: ir.IRBuilder, ln: Lanes, v: ir.Value) -> ir.Value:
    """`m = 0; for j: if (v[j] > m) m = v[j];` across the lanes of v."""
    m = const(f32, 0.0)
    for s in range(ln.n):
        e = b.extract_element(v, const(i32, s))
        m = b.select(b.fcmp_ordered(">", e, m), e, m)
    return m


def _emit_levels(ln: Lanes, iscale, xT, mn, nmax):
    b = ln.b
    return [ln.clamp(ln.nearest_int(b.fmul(iscale, b.fsub(xi, mn))), nmax) for xi in xT]


def _emit_error(ln: Lanes, scale, lf, mn, xT, wT, use_mad):
    b = ln.b
    err = ln.fc(0.0)
    for li, xi, wi in zip(lf, xT, wT):
        diff = b.fsub(b.fadd(b.fmul(scale, li), mn), xi)
        diff = ln.fabs(diff) if use_mad else b.fmul(diff, diff)
        err = b.fadd(err, b.fmul(wi, diff))
    return err


def emit_make_qkx2(ln: Lanes, xT: list[ir.Value], wT: list[ir.Value], nmax: int, rmin: float,
                   rdelta: float, nstep: int, use_mad: bool):
    """make_qkx2_quants for every lane at once. xT, wT: element i of each sub-block.

    Returns (levels: list of i32 lane vectors, scale, the_min)."""
    b = ln.b
    n = len(xT)
    fmax = ln.fc(nmax)
    mn = mx = xT[0]
    sum_w = wT[0]
    sum_x = b.fmul(sum_w, xT[0])
    for i in range(1, n):
        mn = ln.sel(ln.lt(xT[i], mn), xT[i], mn)
        mx = ln.sel(ln.gt(xT[i], mx), xT[i], mx)
        sum_w = b.fadd(sum_w, wT[i])
        sum_x = b.fadd(sum_x, b.fmul(wT[i], xT[i]))
    mn = ln.sel(ln.gt(mn, ln.fc(0.0)), ln.fc(0.0), mn)
    flat = b.fcmp_ordered("==", mx, mn)
    flat_min = mn
    iscale = b.fdiv(fmax, b.fsub(mx, mn))
    scale = b.fdiv(ln.fc(1.0), iscale)
    L0 = _emit_levels(ln, iscale, xT, mn, nmax)
    best = _emit_error(ln, scale, [ln.to_f(li) for li in L0], mn, xT, wT, use_mad)

    # state carried through the step loop lives in entry-block allocas (SROA makes it SSA)
    L_mem = alloca_entry(b, ir.ArrayType(ln.i, n), name="L")
    st_mem = alloca_entry(b, ir.ArrayType(ln.f, 3), name="best")
    Lp = [b.gep(L_mem, [const(i32, 0), const(i32, i)]) for i in range(n)]
    best_p, scale_p, min_p = (b.gep(st_mem, [const(i32, 0), const(i32, k)]) for k in range(3))
    for p, v in zip(Lp, L0):
        b.store(v, p)
    b.store(best, best_p)
    b.store(scale, scale_p)
    b.store(mn, min_p)

    with for_range(b, const(i32, 0), const(i32, nstep + 1), name="step") as step:
        mn = b.load(min_p)
        best = b.load(best_p)
        fstep = ln.splat(b.sitofp(step, f32))
        num = b.fadd(b.fadd(ln.fc(rmin), b.fmul(ln.fc(rdelta), fstep)), fmax)
        iscale = b.fdiv(num, b.fsub(mx, mn))
        la = _emit_levels(ln, iscale, xT, mn, nmax)
        lf = [ln.to_f(li) for li in la]
        sum_l = sum_l2 = sum_xl = ln.fc(0.0)
        for li, xi, wi in zip(lf, xT, wT):
            wl = b.fmul(wi, li)
            sum_l = b.fadd(sum_l, wl)
            sum_l2 = b.fadd(sum_l2, b.fmul(wl, li))
            sum_xl = b.fadd(sum_xl, b.fmul(wl, xi))
        D = b.fsub(b.fmul(sum_w, sum_l2), b.fmul(sum_l, sum_l))
        this_scale = b.fdiv(b.fsub(b.fmul(sum_w, sum_xl), b.fmul(sum_x, sum_l)), D)
        this_min = b.fdiv(b.fsub(b.fmul(sum_l2, sum_x), b.fmul(sum_l, sum_xl)), D)
        pos = ln.gt(this_min, ln.fc(0.0))
        this_min = ln.sel(pos, ln.fc(0.0), this_min)
        this_scale = ln.sel(pos, b.fdiv(sum_xl, sum_l2), this_scale)
        cur = _emit_error(ln, this_scale, lf, this_min, xT, wT, use_mad)
        better = b.and_(ln.gt(D, ln.fc(0.0)), ln.lt(cur, best))
        for p, li in zip(Lp, la):
            b.store(ln.sel(better, li, b.load(p)), p)
        b.store(ln.sel(better, cur, best), best_p)
        b.store(ln.sel(better, this_scale, b.load(scale_p)), scale_p)
        b.store(ln.sel(better, this_min, mn), min_p)

    L = [ln.sel(flat, ln.ic(0), b.load(p)) for p in Lp]
    scale = ln.sel(flat, ln.fc(0.0), b.load(scale_p))
    the_min = b.fsub(ln.fc(-0.0), ln.sel(flat, flat_min, b.load(min_p)))  # -x, sign-exact
    return L, scale, the_min


def emit_requantize(ln: Lanes, xT, L, d, dm, nmax: int) -> list[ir.Value]:
    """`if (d) L = clamp(nearest_int((x + dm)/d))` per lane; returns i32 lane vectors."""
    b = ln.b
    keep = b.fcmp_ordered("==", d, ln.fc(0.0))
    out = []
    for xi, li in zip(xT, L):
        lv = ln.clamp(ln.nearest_int(b.fdiv(b.fadd(xi, dm), d)), nmax)
        out.append(ln.sel(keep, li, lv))
    return out


def emit_quant_scale(ln: Lanes, inv, v) -> ir.Value:
    """`(uint8_t)nearest_int(inv*v)` per lane, as i32 lanes."""
    b = ln.b
    return b.and_(ln.nearest_int(b.fmul(ln.splat(inv), v)), ln.ic(0xFF))


def emit_pack_scale_min_k4(b: ir.IRBuilder, ls: ir.Value, lm: ir.Value, q: ir.Value) -> None:
    """ls, lm: 8 i32 lanes of 6-bit values -> the 12 bytes at q (i8*)."""
    c = lambda v: const(i32, v)  # noqa: E731
    s = [b.extract_element(ls, c(j)) for j in range(8)]
    m = [b.extract_element(lm, c(j)) for j in range(8)]
    out = []
    for j in range(4):
        out.append(b.or_(s[j], b.shl(b.lshr(s[j + 4], c(4)), c(6))))
    for j in range(4):
        out.append(b.or_(m[j], b.shl(b.lshr(m[j + 4], c(4)), c(6))))
    for j in range(4, 8):
        out.append(b.or_(b.and_(s[j], c(0xF)), b.shl(b.and_(m[j], c(0xF)), c(4))))
    for k, v in enumerate(out):
        b.store(b.trunc(v, i8), b.gep(q, [c(k)]))


def emit_get_scale_min_k4(b: ir.IRBuilder, q: ir.Value, j: int) -> tuple[ir.Value, ir.Value]:
    """Scale and min j (0..7) from the 12 bytes at q, as i32."""
    c = lambda v: const(i32, v)  # noqa: E731
    ld = lambda k: b.zext(b.load(b.gep(q, [c(k)])), i32)  # noqa: E731
    if j < 4:
        return b.and_(ld(j), c(63)), b.and_(ld(j + 4), c(63))
    sc = b.or_(b.and_(ld(j + 4), c(0xF)), b.shl(b.lshr(ld(j - 4), c(6)), c(4)))
    m = b.or_(b.lshr(ld(j + 4), c(4)), b.shl(b.lshr(ld(j), c(6)), c(4)))
    return sc, m
