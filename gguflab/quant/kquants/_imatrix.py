"""Importance-weighted quantization (llama.cpp's `quantize_<t>(..., quant_weights)` with an
imatrix): the numpy specs of the `quantize_row_<t>_impl` functions for Q4_0, Q4_1, Q5_0,
Q5_1 and Q2_K..Q6_K, and the IR pieces their compiled kernels share (the row loop itself is
`QuantType._imatrix_kernel`; each type's `emit_quantize_block_imatrix` uses these).

Every function works on whole rows (n_rows, n_per_row) with the imatrix row (n_per_row,),
and keeps ggml's float32 operation order: sums run element by element, vectorised over
rows or sub-blocks, never as numpy's pairwise `sum`.

What the weights are, per type:
- Q4_0/Q4_1/Q5_0/Q5_1: qw * sqrt(sigma2 + x*x), sigma2 = mean of x*x over the whole row;
- Q2_K: the same with sigma2 = mean of x*x over the 256-weight super-block;
- Q3_K/Q4_K/Q5_K: the same with sigma2 = 2 * mean of x*x over the super-block;
- Q6_K: the imatrix values as they are.
`make_qkx3_quants` with weights is `make_qkx2_quants` (their only difference, `max <= min`
against `max == min`, cannot differ: max starts at x[0] like min).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir

from ...jit.builders import Target, alloca_entry, const, f32, for_range, i16, i32
from ...jit.floats import emit_f16_to_f32, emit_f32_to_f16, hardware_half
from ..floats import f16_from_f32_ref
from ._qkx2 import (
    Lanes,
    emit_get_scale_min_k4,
    emit_load_transposed,
    emit_make_qkx2,
    emit_pack_scale_min_k4,
    emit_requantize,
    get_scale_min_k4_ref,
    half_bytes,
    make_qkx2_ref,
    nearest_int_ref,
    pack_scale_min_k4_ref,
    requantize_ref,
)
from ._qx import GROUP_MAX_EPS, emit_make_qx_quants, emit_nearest_int, make_qx_quants

F32 = np.float32
QK_K = 256


def _f16_bits(v: np.ndarray) -> np.ndarray:
    return f16_from_f32_ref(np.asarray(v, F32)).astype(np.uint16)


def _f16_value(h: np.ndarray) -> np.ndarray:
    return np.asarray(h, np.uint16).view(np.float16).astype(F32)


def seq_sum_last(t: np.ndarray) -> np.ndarray:
    """`s = 0; for i: s += t[..., i]` over the last axis, in float32."""
    acc = np.zeros(t.shape[:-1], F32)
    for i in range(t.shape[-1]):
        acc = acc + t[..., i]
    return acc


def sigma2_ref(x: np.ndarray, scale2: bool) -> np.ndarray:
    """`sum_x2 = sum x*x` in order over the last axis, then `sum_x2/n` or `2*sum_x2/n`."""
    with np.errstate(all="ignore"):
        s = seq_sum_last(x * x)
        n = F32(x.shape[-1])
        return (F32(2) * s / n if scale2 else s / n).astype(F32)


def weights_ref(x: np.ndarray, qw: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """`qw[l] * sqrtf(sigma2 + x[l]*x[l])`; sigma2 broadcast against x (..., n)."""
    with np.errstate(all="ignore"):
        return (qw * np.sqrt(sigma2 + x * x)).astype(F32)


def make_qp_quants_ref(x: np.ndarray, nmax: int, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's `make_qp_quants` on every row of x (groups, n) with weights qw (groups, n):
    (scale (groups,), L uint8 (groups, n), stored as C stores an int into a uint8)."""
    x = np.ascontiguousarray(x, F32)
    qw = np.ascontiguousarray(qw, F32)
    g, n = x.shape
    fmax = F32(nmax)
    with np.errstate(all="ignore"):
        mx = np.zeros(g, F32)
        for i in range(n):
            mx = np.where(mx > x[:, i], mx, x[:, i])  # MAX(max, x[i])
        zero = mx < GROUP_MAX_EPS
        iscale = fmax / mx
        L = nearest_int_ref(iscale[:, None] * x) & 0xFF
        scale = F32(1) / iscale
        best = np.zeros(g, F32)
        for i in range(n):
            diff = x[:, i] - scale * L[:, i].astype(F32)
            best = best + qw[:, i] * diff * diff
        for step in (-4, -3, -2, -1, 1, 2, 3, 4):
            isc = (F32(0.1) * F32(step) + fmax) / mx
            sc = F32(1) / isc
            mse = np.zeros(g, F32)
            for i in range(n):
                l = np.minimum(nmax, nearest_int_ref(isc * x[:, i]))
                diff = x[:, i] - sc * l.astype(F32)
                mse = mse + qw[:, i] * diff * diff
            take = mse < best
            best = np.where(take, mse, best)
            iscale = np.where(take, isc, iscale)
        li = np.minimum(nmax, nearest_int_ref(iscale[:, None] * x))
        L = li & 0xFF
        sumlx = np.zeros(g, F32)
        suml2 = np.zeros(g, F32)
        for i in range(n):
            lf = li[:, i].astype(F32)
            sumlx = sumlx + qw[:, i] * x[:, i] * lf
            suml2 = suml2 + qw[:, i] * lf * lf
        for _ in range(5):  # a pass that changes nothing would change nothing after it
            for i in range(n):
                w, xi = qw[:, i], x[:, i]
                lf = L[:, i].astype(F32)
                slx = sumlx - w * xi * lf
                sl2 = suml2 - w * lf * lf
                ok = (slx > 0) & (sl2 > 0)
                new = np.minimum(nmax, nearest_int_ref(xi * sl2 / slx))
                nf = new.astype(F32)
                slx2 = slx + w * xi * nf
                sl22 = sl2 + w * nf * nf
                take = ok & (new != L[:, i]) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
                L[:, i] = np.where(take, new & 0xFF, L[:, i])
                sumlx = np.where(take, slx2, sumlx)
                suml2 = np.where(take, sl22, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0)).astype(F32)
    L = np.where(zero[:, None], 0, L).astype(np.uint8)
    return np.where(zero, F32(0), scale).astype(F32), L


# -- legacy types (blocks of 32, row-level sigma2) -------------------------------------------


def legacy_symmetric_ref(x: np.ndarray, qw: np.ndarray, nmax: int):
    """Q4_0 (nmax 8) / Q5_0 (nmax 16): (d fp16 bits (n_blocks,), levels uint8 (n_blocks, 32)
    in [0, 2*nmax)) for rows x (n_rows, n_per_row)."""
    x = np.ascontiguousarray(x, F32)
    sigma2 = sigma2_ref(x, False)
    xb = x.reshape(-1, 32)
    w = weights_ref(x, qw[None, :], sigma2[:, None]).reshape(-1, 32)
    d, L = make_qx_quants(xb, nmax, 1, w)
    return _f16_bits(d), L.astype(np.uint8)


def legacy_affine_ref(x: np.ndarray, qw: np.ndarray, nmax: int):
    """Q4_1 (nmax 15) / Q5_1 (nmax 31): (d fp16 bits, m fp16 bits, levels (n_blocks, 32))."""
    x = np.ascontiguousarray(x, F32)
    sigma2 = sigma2_ref(x, False)
    xb = x.reshape(-1, 32)
    w = weights_ref(x, qw[None, :], sigma2[:, None]).reshape(-1, 32)
    L, d, the_min = make_qkx2_ref(xb, w, nmax, -0.9, 0.05, 36, False)
    with np.errstate(all="ignore"):
        m = -the_min
    return _f16_bits(d), _f16_bits(m), L


# -- K-quants (super-blocks of 256) -----------------------------------------------------------


def _blocks(x: np.ndarray, qw: np.ndarray, sub: int, scale2: bool):
    """Super-blocks (nb, 256), their weights split in sub-blocks (nb*256/sub, sub), and the
    sums of the weights per sub-block (nb, 256/sub)."""
    x = np.ascontiguousarray(x, F32)
    n_rows, n = x.shape
    xb = x.reshape(-1, QK_K)
    qwb = np.broadcast_to(qw.reshape(1, n // QK_K, QK_K), (n_rows, n // QK_K, QK_K))
    qwb = qwb.reshape(-1, QK_K)
    sigma2 = sigma2_ref(xb, scale2)
    w = weights_ref(xb, qwb, sigma2[:, None]).reshape(-1, sub)
    sw = seq_sum_last(w).reshape(xb.shape[0], QK_K // sub)
    return xb, w, sw


def q2_k_ref(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """quantize_row_q2_K_impl on rows -> blocks (nb, 84)."""
    xb, w, sw = _blocks(x, qw, 16, False)
    nb = xb.shape[0]
    xs = xb.reshape(nb * 16, 16)
    L, sc, mi = make_qkx2_ref(xs, w, 3, -0.9, 0.05, 36, False)
    dm, Ls = make_qp_quants_ref(sc.reshape(nb, 16), 15, sw)
    mm, Lm = make_qp_quants_ref(mi.reshape(nb, 16), 15, sw)
    dh, dmh = _f16_bits(dm), _f16_bits(mm)
    scales = (Ls | (Lm << 4)).astype(np.uint8)
    with np.errstate(all="ignore"):
        d = _f16_value(dh)[:, None] * (scales & 0xF).astype(F32)
        m = _f16_value(dmh)[:, None] * (scales >> 4).astype(F32)
    L = requantize_ref(xb.reshape(nb, 16, 16), L.reshape(nb, 16, 16), d, m, 3)
    L = L.reshape(nb, 2, 4, 32)
    qs = L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)
    return np.concatenate([scales, qs.reshape(nb, 64), half_bytes(dh), half_bytes(dmh)], 1)


def q3_k_search_ref(x: np.ndarray, qw: np.ndarray):
    """The search of quantize_row_q3_K_impl: (d fp16 bits (nb,), six-bit scales in [0, 64)
    (nb, 16), levels in [0, 8) (nb, 256)), before the final requantization."""
    xb, w, sw = _blocks(x, qw, 16, True)
    nb = xb.shape[0]
    scales, L = make_qx_quants(xb.reshape(nb * 16, 16), 4, 1, w)
    d_block, Ls = make_qx_quants(scales.reshape(nb, 16), 32, 1, sw)
    return xb, _f16_bits(d_block), Ls.astype(np.int32), L.reshape(nb, QK_K).astype(np.int32)


def q45_k_search_ref(x: np.ndarray, qw: np.ndarray, nmax: int, cap: bool):
    """The common part of quantize_row_q4_K_impl / q5_K_impl: (d fp16 bits, dmin fp16 bits,
    packed scales (nb, 12), levels (nb, 256))."""
    xb, w, sw = _blocks(x, qw, 32, True)
    nb = xb.shape[0]
    xs = xb.reshape(nb * 8, 32)
    L, sc, mi = make_qkx2_ref(xs, w, nmax, -0.9, 0.05, 36, False)
    d_block, Ls = make_qp_quants_ref(sc.reshape(nb, 8), 63, sw)
    m_block, Lm = make_qp_quants_ref(mi.reshape(nb, 8), 63, sw)
    if cap:
        Ls, Lm = np.minimum(Ls, 63), np.minimum(Lm, 63)
    scales = pack_scale_min_k4_ref(Ls, Lm)
    dh, dmh = _f16_bits(d_block), _f16_bits(m_block)
    s6, m6 = get_scale_min_k4_ref(scales)
    with np.errstate(all="ignore"):
        d = _f16_value(dh)[:, None] * s6.astype(F32)
        dm = _f16_value(dmh)[:, None] * m6.astype(F32)
    L = requantize_ref(xb.reshape(nb, 8, 32), L.reshape(nb, 8, 32), d, dm, nmax)
    return dh, dmh, scales, L.reshape(nb, QK_K)


def q6_k_weights(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """Q6_K's weights: the imatrix itself, for every 16-weight sub-block of the rows x."""
    n_rows, n = x.shape
    return np.broadcast_to(qw[None, :], (n_rows, n)).reshape(-1, 16)


# -- IR: the same, for one super-block, inside the row kernels of `QuantType` ----------------
#
# The searches reuse the K-quants' lane-per-sub-block emitters (`emit_make_qkx2`,
# `emit_make_qx_quants`) with the weights passed in; what only the weighted path has is
# sigma2 (a scalar sum in order over the block or the row) and `make_qp_quants`, which runs
# once per super-block over its 8 or 16 scales as straight-line scalar code.


def emit_sum_squares(b: ir.IRBuilder, x: ir.Value, n: ir.Value) -> ir.Value:
    """`s = 0; for i < n: s += x[i]*x[i]` in float32, in order; n is i32 or i64."""
    acc = alloca_entry(b, f32, name="sumx2")
    b.store(const(f32, 0.0), acc)
    with for_range(b, ir.Constant(n.type, 0), n, name="sq") as i:
        v = b.load(b.gep(x, [i]))
        b.store(b.fadd(b.load(acc), b.fmul(v, v)), acc)
    return b.load(acc)


def emit_sigma2(b: ir.IRBuilder, x: ir.Value, n: int | ir.Value, scale2: bool) -> ir.Value:
    """`sum_x2/n` (or `2*sum_x2/n`) over the n floats at x."""
    nv = const(i32, n) if isinstance(n, int) else n
    s = emit_sum_squares(b, x, nv)
    if scale2:
        s = b.fmul(const(f32, 2.0), s)
    nf = const(f32, float(n)) if isinstance(n, int) else b.sitofp(n, f32)
    return b.fdiv(s, nf)


def emit_weights(ln: Lanes, xT: list, qT: list, sigma2: ir.Value) -> list:
    """`qw * sqrtf(sigma2 + x*x)` per lane vector."""
    b = ln.b
    s2 = ln.splat(sigma2)
    return [b.fmul(q, ln.sqrt(b.fadd(s2, b.fmul(xi, xi)))) for xi, q in zip(xT, qT)]


def emit_make_qp_quants(b: ir.IRBuilder, xs: list, ws: list, nmax: int):
    """ggml's `make_qp_quants` over the scalars xs with weights ws: (scale, levels as i32
    in [0, 256), as C stores them in a uint8)."""
    n = len(xs)
    f = lambda v: const(f32, float(np.float32(v)))  # noqa: E731
    ic = lambda v: const(i32, v)  # noqa: E731
    zero = f(0.0)

    def near(v):
        return emit_nearest_int(b, v)

    def cap(l):
        return b.select(b.icmp_signed("<", ic(nmax), l), ic(nmax), l)

    mx = zero
    for v in xs:
        mx = b.select(b.fcmp_ordered(">", mx, v), mx, v)
    is_zero = b.fcmp_ordered("<", mx, f(GROUP_MAX_EPS))
    iscale = b.fdiv(f(nmax), mx)
    scale = b.fdiv(f(1.0), iscale)
    best = zero
    for v, w in zip(xs, ws):
        lf = b.sitofp(b.and_(near(b.fmul(iscale, v)), ic(0xFF)), f32)
        diff = b.fsub(v, b.fmul(scale, lf))
        best = b.fadd(best, b.fmul(b.fmul(w, diff), diff))
    # the 8 trial scales and the 5 refinement passes are loops (unrolled, Q2_K's two calls
    # of 16 scales take LLVM ~20 s to compile); state lives in entry-block allocas
    st = alloca_entry(b, f32, 4, name="qp.state")  # best, iscale, sumlx, suml2
    p_best, p_isc, p_slx, p_sl2 = (b.gep(st, [ic(k)]) for k in range(4))
    b.store(best, p_best)
    b.store(iscale, p_isc)
    with for_range(b, ic(0), ic(8), name="qp.is") as k:
        step = b.add(b.sub(k, ic(4)), b.zext(b.icmp_signed(">=", k, ic(4)), i32))
        isc = b.fdiv(b.fadd(b.fmul(f(0.1), b.sitofp(step, f32)), f(nmax)), mx)
        sc = b.fdiv(f(1.0), isc)
        mse = zero
        for v, w in zip(xs, ws):
            lf = b.sitofp(cap(near(b.fmul(isc, v))), f32)
            diff = b.fsub(v, b.fmul(sc, lf))
            mse = b.fadd(mse, b.fmul(b.fmul(w, diff), diff))
        best = b.load(p_best)
        take = b.fcmp_ordered("<", mse, best)
        b.store(b.select(take, mse, best), p_best)
        b.store(b.select(take, isc, b.load(p_isc)), p_isc)
    iscale = b.load(p_isc)
    sumlx = suml2 = zero
    lm = alloca_entry(b, i32, n, name="qp.L")
    for i, (v, w) in enumerate(zip(xs, ws)):
        li = cap(near(b.fmul(iscale, v)))
        b.store(b.and_(li, ic(0xFF)), b.gep(lm, [ic(i)]))
        lf = b.sitofp(li, f32)
        sumlx = b.fadd(sumlx, b.fmul(b.fmul(w, v), lf))
        suml2 = b.fadd(suml2, b.fmul(b.fmul(w, lf), lf))
    b.store(sumlx, p_slx)
    b.store(suml2, p_sl2)
    # 5 passes; a pass that changes nothing would change nothing after it
    with for_range(b, ic(0), ic(5), name="qp.try"):
        sumlx, suml2 = b.load(p_slx), b.load(p_sl2)
        for i in range(n):
            v, w = xs[i], ws[i]
            lp = b.gep(lm, [ic(i)])
            li = b.load(lp)
            lf = b.sitofp(li, f32)
            wx = b.fmul(w, v)
            slx = b.fsub(sumlx, b.fmul(wx, lf))
            sl2 = b.fsub(suml2, b.fmul(b.fmul(w, lf), lf))
            ok = b.and_(b.fcmp_ordered(">", slx, zero), b.fcmp_ordered(">", sl2, zero))
            new = cap(near(b.fdiv(b.fmul(v, sl2), slx)))
            nf = b.sitofp(new, f32)
            slx2 = b.fadd(slx, b.fmul(wx, nf))
            sl22 = b.fadd(sl2, b.fmul(b.fmul(w, nf), nf))
            better = b.fcmp_ordered(">", b.fmul(b.fmul(slx2, slx2), suml2),
                                    b.fmul(b.fmul(sumlx, sumlx), sl22))
            take = b.and_(b.and_(ok, b.icmp_signed("!=", new, li)), better)
            b.store(b.select(take, b.and_(new, ic(0xFF)), li), lp)
            sumlx = b.select(take, slx2, sumlx)
            suml2 = b.select(take, sl22, suml2)
        b.store(sumlx, p_slx)
        b.store(suml2, p_sl2)
    sumlx, suml2 = b.load(p_slx), b.load(p_sl2)
    L = [b.load(b.gep(lm, [ic(i)])) for i in range(n)]
    scale = b.select(b.fcmp_ordered(">", suml2, zero), b.fdiv(sumlx, suml2), zero)
    return b.select(is_zero, zero, scale), [b.select(is_zero, ic(0), l) for l in L]


def emit_lanes_of(b: ir.IRBuilder, v: ir.Value) -> list:
    return [b.extract_element(v, const(i32, k)) for k in range(v.type.count)]


def emit_vector_of(b: ir.IRBuilder, vals: list) -> ir.Value:
    v = ir.Constant(ir.VectorType(vals[0].type, len(vals)), ir.Undefined)
    for k, s in enumerate(vals):
        v = b.insert_element(v, s, const(i32, k))
    return v


def emit_search_q45_imatrix(b: ir.IRBuilder, x: ir.Value, y: ir.Value, qw: ir.Value,
                            nmax: int, cap: bool) -> list:
    """quantize_row_q4_K_impl / q5_K_impl up to the levels, for the super-block at x with
    the importance weights at qw: stores d, dmin and the packed scales into y[0:16];
    returns the levels as 32 vectors of 8 i32 lanes (lane s, vector i = weight 32*s + i)."""
    hw = hardware_half(Target.CPU)
    ln = Lanes(b, 8)
    xT = emit_load_transposed(b, ln, x, 32)
    qT = emit_load_transposed(b, ln, qw, 32)
    wT = emit_weights(ln, xT, qT, emit_sigma2(b, x, QK_K, True))
    sw = ln.fc(0.0)
    for w in wT:
        sw = b.fadd(sw, w)
    L, sc, mi = emit_make_qkx2(ln, xT, wT, nmax, -0.9, 0.05, 36, False)
    sws = emit_lanes_of(b, sw)
    d_block, ls = emit_make_qp_quants(b, emit_lanes_of(b, sc), sws, 63)
    m_block, lm = emit_make_qp_quants(b, emit_lanes_of(b, mi), sws, 63)
    if cap:
        c63 = const(i32, 63)
        ls = [b.select(b.icmp_unsigned("<", c63, v), c63, v) for v in ls]
        lm = [b.select(b.icmp_unsigned("<", c63, v), c63, v) for v in lm]
    scales = b.gep(y, [const(i32, 4)])
    emit_pack_scale_min_k4(b, emit_vector_of(b, ls), emit_vector_of(b, lm), scales)
    dh = emit_f32_to_f16(b, d_block, hw)
    dmh = emit_f32_to_f16(b, m_block, hw)
    hp = b.bitcast(y, i16.as_pointer())
    b.store(dh, hp, align=1)
    b.store(dmh, b.gep(hp, [const(i32, 1)]), align=1)
    pairs = [emit_get_scale_min_k4(b, scales, j) for j in range(8)]
    s6 = emit_vector_of(b, [p[0] for p in pairs])
    m6 = emit_vector_of(b, [p[1] for p in pairs])
    d = b.fmul(ln.splat(emit_f16_to_f32(b, dh, hw)), b.uitofp(s6, ln.f))
    dm = b.fmul(ln.splat(emit_f16_to_f32(b, dmh, hw)), b.uitofp(m6, ln.f))
    return emit_requantize(ln, xT, L, d, dm, nmax)


# -- IR for the legacy types (sigma2 per row; 16 blocks of 32 at a time, one per lane) -------

LEGACY_GROUP = 16


def _transpose_in(b: ir.IRBuilder, x: ir.Value, name: str) -> ir.Value:
    """The 16 blocks of 32 floats at x into a stack array of 32 `<16 x float>`, vector j
    holding element j of each block (a loop: shuffles this wide are slow to compile)."""
    vf = ir.VectorType(f32, LEGACY_GROUP)
    xt = alloca_entry(b, vf, 32, name=name)
    flat = b.bitcast(xt, f32.as_pointer())
    with for_range(b, const(i32, 0), const(i32, 32 * LEGACY_GROUP), name=f"{name}.tr") as k:
        dst = b.add(b.shl(b.and_(k, const(i32, 31)), const(i32, 4)), b.lshr(k, const(i32, 5)))
        b.store(b.load(b.gep(x, [k])), b.gep(flat, [dst]))
    return xt


def _transpose_out(b: ir.IRBuilder, lt: ir.Value) -> ir.Value:
    """32 `<16 x i8>` (vector j: level j of each block) -> i8[512] in block order."""
    out = alloca_entry(b, ir.IntType(8), 32 * LEGACY_GROUP, name="lnat")
    flat = b.bitcast(lt, ir.IntType(8).as_pointer())
    with for_range(b, const(i32, 0), const(i32, 32 * LEGACY_GROUP), name="lt.tr") as k:
        src = b.add(b.shl(b.and_(k, const(i32, 31)), const(i32, 4)), b.lshr(k, const(i32, 5)))
        b.store(b.load(b.gep(flat, [src])), b.gep(out, [k]))
    return out


def _block_levels(b: ir.IRBuilder, nat: ir.Value, s: int) -> ir.Value:
    v8 = ir.VectorType(ir.IntType(8), 32)
    return b.load(b.bitcast(b.gep(nat, [const(i32, 32 * s)]), v8.as_pointer()), align=1)


def _legacy_weights(b: ir.IRBuilder, x: ir.Value, qw: ir.Value, sigma2: ir.Value):
    """Element j of each of the 16 blocks at x as vector j (a stack array), and the weights
    `qw * sqrtf(sigma2 + x*x)` alike (a list)."""
    ln = Lanes(b, LEGACY_GROUP)
    xt = _transpose_in(b, x, "lx")
    qt = _transpose_in(b, qw, "lq")
    xT = [b.load(b.gep(xt, [const(i32, j)])) for j in range(32)]
    qT = [b.load(b.gep(qt, [const(i32, j)])) for j in range(32)]
    return ln, xt, xT, emit_weights(ln, xT, qT, sigma2)


def emit_legacy_symmetric_imatrix(b: ir.IRBuilder, x: ir.Value, qw: ir.Value,
                                  sigma2: ir.Value, nmax: int):
    """quantize_row_q4_0_impl / q5_0_impl for the 16 blocks at x: per block, (d, levels
    <32 x i8> in [0, 2*nmax))."""
    ln, xt, _, wT = _legacy_weights(b, x, qw, sigma2)
    wt = alloca_entry(b, ln.f, 32, name="lw")
    lt = alloca_entry(b, ir.VectorType(ir.IntType(8), LEGACY_GROUP), 32, name="ll")
    for j, w in enumerate(wT):
        b.store(w, b.gep(wt, [const(i32, j)]))
    d = emit_make_qx_quants(b, xt, 32, nmax, lt, wt)
    nat = _transpose_out(b, lt)
    return [(b.extract_element(d, const(i32, s)), _block_levels(b, nat, s))
            for s in range(LEGACY_GROUP)]


def emit_legacy_affine_imatrix(b: ir.IRBuilder, x: ir.Value, qw: ir.Value,
                               sigma2: ir.Value, nmax: int):
    """quantize_row_q4_1_impl / q5_1_impl for the 16 blocks at x: per block, (d, m,
    levels <32 x i8>)."""
    ln, _, xT, wT = _legacy_weights(b, x, qw, sigma2)
    L, scale, the_min = emit_make_qkx2(ln, xT, wT, nmax, -0.9, 0.05, 36, False)
    v8 = ir.VectorType(ir.IntType(8), LEGACY_GROUP)
    lt = alloca_entry(b, v8, 32, name="ll")
    for j, l in enumerate(L):
        b.store(b.trunc(l, v8), b.gep(lt, [const(i32, j)]))
    nat = _transpose_out(b, lt)
    return [(b.extract_element(scale, const(i32, s)),
             b.fneg(b.extract_element(the_min, const(i32, s))),
             _block_levels(b, nat, s)) for s in range(LEGACY_GROUP)]
