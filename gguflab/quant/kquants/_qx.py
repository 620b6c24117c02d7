"""Helpers shared by the symmetric K-quants (Q3_K, Q6_K, Q8_K), in numpy and in IR.

The numpy side works on many sub-blocks at once: every array is (groups, n) and every
loop over the n weights of a group runs in ggml's order, vectorised over the groups, so
that sequential float sums and first-maximum choices come out exactly as in C.

The IR side works on one 256-weight super-block. Its 16 sub-blocks of 16 weights are the
16 lanes of a vector (`VF`): the super-block is first transposed so that vector `i`
holds weight `i` of every sub-block. Each lane then runs ggml's scalar algorithm in its
own order, which keeps every float operation identical while using SIMD.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir

from ...jit.builders import alloca_entry, const, f32, for_range, i1, i8, i16, i32
from ._qkx2 import nearest_int_ref

GROUP_MAX_EPS = np.float32(1e-15)

QK_K = 256
LANES = 16  # sub-blocks per super-block, one per vector lane
VF = ir.VectorType(f32, LANES)
VI = ir.VectorType(i32, LANES)
VB = ir.VectorType(i1, LANES)
V8 = ir.VectorType(i8, LANES)


# -- numpy --------------------------------------------------------------------------------


nearest_int = nearest_int_ref  # one definition of ggml's rounding for every K-quant


def first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(amax, max) over the last axis as ggml's `if (fabsf(x) > amax) {...}` loop finds
    them: the largest magnitude (NaN never wins) and the signed value of the first weight
    that has it; (0, 0) when no magnitude exceeds zero."""
    ax = np.abs(x)
    amax = np.max(np.where(np.isnan(ax), np.float32(0), ax), axis=-1)
    first = np.argmax(ax == amax[..., None], axis=-1)
    mx = np.take_along_axis(x, first[..., None], axis=-1)[..., 0]
    return amax, np.where(amax > 0, mx, np.float32(0)).astype(np.float32)


def _weights(x: np.ndarray, rmse_type: int, qw: np.ndarray | None) -> np.ndarray:
    if qw is not None:
        return np.asarray(qw, np.float32)
    if rmse_type == 1:
        return x * x
    if rmse_type == 2:
        return np.ones_like(x)
    if rmse_type == 3:
        return np.abs(x)
    return np.sqrt(np.abs(x))


def _qx_pass(x, w, iscale, nmax):
    """Levels for `iscale` and the sequential sums ggml accumulates over them."""
    n = x.shape[1]
    sumlx = np.zeros(x.shape[0], np.float32)
    suml2 = np.zeros(x.shape[0], np.float32)
    L = np.empty(x.shape, np.int32)
    for i in range(n):
        l = np.clip(nearest_int(iscale * x[:, i]), -nmax, nmax - 1)
        L[:, i] = l
        lf = l.astype(np.float32)
        sumlx = sumlx + w[:, i] * x[:, i] * lf
        suml2 = suml2 + w[:, i] * lf * lf
    return sumlx, suml2, L


def make_qx_quants(x: np.ndarray, nmax: int, rmse_type: int,
                   qw: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ggml's `make_qx_quants` on every row of `x` (groups, n): (scale (groups,),
    L int8 (groups, n) in [0, 2*nmax))."""
    x = np.ascontiguousarray(x, np.float32)
    amax, mx = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    one = np.float32(1)
    with np.errstate(all="ignore"):
        iscale = np.float32(-nmax) / mx
        if rmse_type == 0:
            L = np.clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1) + nmax
            scale = one / iscale
        else:
            early = rmse_type < 0
            w = _weights(x, abs(rmse_type), qw)
            sumlx, suml2, L = _qx_pass(x, w, iscale, nmax)
            L = L + nmax
            scale = np.where(suml2 != 0, sumlx / suml2, np.float32(0)).astype(np.float32)
            if early:
                scale = np.where(suml2 > 0, np.float32(0.5) * (scale + one / iscale),
                                 one / iscale).astype(np.float32)
            else:
                best = scale * sumlx
                for step in range(-9, 10):
                    if step == 0:
                        continue
                    c = np.float32(nmax) + np.float32(0.1) * np.float32(step)
                    iscale = -c / mx
                    sumlx, suml2, Ls = _qx_pass(x, w, iscale, nmax)
                    take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
                    L = np.where(take[:, None], Ls + nmax, L)
                    scale = np.where(take, sumlx / suml2, scale).astype(np.float32)
                    best = np.where(take, scale * sumlx, best).astype(np.float32)
    L = np.where(zero[:, None], 0, L).astype(np.int8)
    return np.where(zero, np.float32(0), scale).astype(np.float32), L


def make_q3_quants(x: np.ndarray, nmax: int, do_rmse: bool) -> tuple[np.ndarray, np.ndarray]:
    """ggml's `make_q3_quants` on every row of `x` (groups, n): (scale, L in [0, 2*nmax))."""
    x = np.ascontiguousarray(x, np.float32)
    groups, n = x.shape
    amax, mx = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    with np.errstate(all="ignore"):
        iscale = np.float32(-nmax) / mx
        if not do_rmse:
            L = np.clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1) + nmax
            scale = np.float32(1) / iscale
        else:
            w = x * x
            wx = w * x
            sumlx, suml2, L = _qx_pass(x, w, iscale, nmax)
            for _ in range(5):  # an unchanged pass changes nothing after it: no early exit
                for i in range(n):
                    Li = L[:, i].astype(np.float32)
                    slx = sumlx - wx[:, i] * Li
                    sl2 = suml2 - w[:, i] * Li * Li
                    new = np.clip(nearest_int(x[:, i] * sl2 / slx), -nmax, nmax - 1)
                    nf = new.astype(np.float32)
                    slx2 = slx + wx[:, i] * nf
                    sl22 = sl2 + w[:, i] * nf * nf
                    take = ((slx > 0) & (new != L[:, i]) & (sl22 > 0)
                            & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22))
                    L[:, i] = np.where(take, new, L[:, i])
                    sumlx = np.where(take, slx2, sumlx)
                    suml2 = np.where(take, sl22, suml2)
            L = L + nmax
            scale = np.where(suml2 > 0, sumlx / suml2, np.float32(0)).astype(np.float32)
    L = np.where(zero[:, None], 0, L).astype(np.int8)
    return np.where(zero, np.float32(0), scale).astype(np.float32), L


def fp16_bits_to_f32(h: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(h, np.uint16).view(np.float16).astype(np.float32)


# -- IR -----------------------------------------------------------------------------------


def splat(t: ir.Type, v) -> ir.Constant:
    """A constant of scalar or vector type `t`, every lane `v`."""
    if isinstance(t, ir.VectorType):
        return ir.Constant(t, [ir.Constant(t.element, v)] * t.count)
    return ir.Constant(t, v)


def _like(t: ir.Type, elem: ir.Type) -> ir.Type:
    return ir.VectorType(elem, t.count) if isinstance(t, ir.VectorType) else elem


def intrinsic(b: ir.IRBuilder, name: str, ret: ir.Type, args: list[ir.Type]) -> ir.Function:
    m = b.module
    fn = m.globals.get(name)
    return fn if fn is not None else ir.Function(m, ir.FunctionType(ret, args), name)


def _suffix(t: ir.Type) -> str:
    if isinstance(t, ir.VectorType):
        return f"v{t.count}{_suffix(t.element)}"
    return "f32" if t == f32 else f"i{t.width}"


def emit_fabs(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    return b.call(intrinsic(b, f"llvm.fabs.{_suffix(v.type)}", v.type, [v.type]), [v])


def emit_nearest_int(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """ggml's `nearest_int` on a float or float vector -> i32 (vector)."""
    it = _like(v.type, i32)
    s = b.bitcast(b.fadd(v, splat(v.type, 12582912.0)), it)
    return b.sub(b.and_(s, splat(it, 0x7FFFFF)), splat(it, 0x400000))


def emit_clamp(b: ir.IRBuilder, v: ir.Value, lo: int, hi: int) -> ir.Value:
    """MAX(lo, MIN(hi, v)) on signed integers."""
    v = b.select(b.icmp_signed("<", splat(v.type, hi), v), splat(v.type, hi), v)
    return b.select(b.icmp_signed(">", splat(v.type, lo), v), splat(v.type, lo), v)


def emit_splat(b: ir.IRBuilder, v: ir.Value, n: int = LANES) -> ir.Value:
    t = ir.VectorType(v.type, n)
    one = b.insert_element(ir.Constant(t, ir.Undefined), v, const(i32, 0))
    return b.shuffle_vector(one, ir.Constant(t, ir.Undefined),
                            ir.Constant(ir.VectorType(i32, n), [0] * n))


def emit_lanes(b: ir.IRBuilder, v: ir.Value) -> list[ir.Value]:
    return [b.extract_element(v, const(i32, k)) for k in range(v.type.count)]


def emit_transpose_in(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """Copy the super-block at float* `x` into a stack array of 16 vectors, vector `i`
    holding weight `i` of each of the 16 sub-blocks. Returns a `<16 x float>*`."""
    xt = alloca_entry(b, VF, LANES, name="xt")
    flat = b.bitcast(xt, f32.as_pointer())
    with for_range(b, const(i32, 0), const(i32, QK_K), name="tr") as j:
        dst = b.add(b.shl(b.and_(j, const(i32, 15)), const(i32, 4)), b.lshr(j, const(i32, 4)))
        b.store(b.load(b.gep(x, [j])), b.gep(flat, [dst]))
    return xt


def emit_transpose_out(b: ir.IRBuilder, lt: ir.Value) -> ir.Value:
    """The inverse of `emit_transpose_in` for bytes: `<16 x i8>*` (16 of them) -> i8*
    array of 256 levels in weight order."""
    out = alloca_entry(b, i8, QK_K, name="lnat")
    flat = b.bitcast(lt, i8.as_pointer())
    with for_range(b, const(i32, 0), const(i32, QK_K), name="tro") as j:
        src = b.add(b.shl(b.and_(j, const(i32, 15)), const(i32, 4)), b.lshr(j, const(i32, 4)))
        b.store(b.load(b.gep(flat, [src])), b.gep(out, [j]))
    return out


def emit_first_absmax(b: ir.IRBuilder, xt: ir.Value, n: int) -> tuple[ir.Value, ir.Value]:
    """Per lane, (amax, max) over the `n` vectors at `xt` in order (ggml's loop)."""
    amax = mx = splat(VF, 0.0)
    for i in range(n):
        v = b.load(b.gep(xt, [const(i32, i)]))
        ax = emit_fabs(b, v)
        up = b.fcmp_ordered(">", ax, amax)
        amax = b.select(up, ax, amax)
        mx = b.select(up, v, mx)
    return amax, mx


def emit_scalar_first_absmax(b: ir.IRBuilder, v: ir.Value) -> tuple[ir.Value, ir.Value]:
    """(amax, max) over the lanes of `v` in lane order, first maximum kept."""
    amax = mx = const(f32, 0.0)
    for s in emit_lanes(b, v):
        a = emit_fabs(b, s)
        up = b.fcmp_ordered(">", a, amax)
        amax = b.select(up, a, amax)
        mx = b.select(up, s, mx)
    return amax, mx


def _emit_qx_pass(b, xt, n, iscale, nmax, wt=None):
    """Sequential (sumlx, suml2) for weights x*x (or the vectors at `wt`), lane-wise."""
    sumlx = suml2 = splat(VF, 0.0)
    for i in range(n):
        x = b.load(b.gep(xt, [const(i32, i)]))
        l = emit_clamp(b, emit_nearest_int(b, b.fmul(iscale, x)), -nmax, nmax - 1)
        lf = b.sitofp(l, VF)
        w = b.fmul(x, x) if wt is None else b.load(b.gep(wt, [const(i32, i)]))
        sumlx = b.fadd(sumlx, b.fmul(b.fmul(w, x), lf))
        suml2 = b.fadd(suml2, b.fmul(b.fmul(w, lf), lf))
    return sumlx, suml2


def emit_make_qx_quants(b: ir.IRBuilder, xt: ir.Value, n: int, nmax: int,
                        lt: ir.Value, wt: ir.Value | None = None) -> ir.Value:
    """`make_qx_quants(n, nmax, x, L, rmse_type=1, qw)` on every lane: `xt` holds n
    `<16 x float>`, `wt` (None: qw = NULL, weights x*x) n more with the weights; the levels
    (in [0, 2*nmax)) go to the n `<16 x i8>` at `lt`. Returns the scales."""
    amax, mx = emit_first_absmax(b, xt, n)
    zero = b.fcmp_ordered("<", amax, splat(VF, float(GROUP_MAX_EPS)))
    iscale0 = b.fdiv(splat(VF, -float(nmax)), mx)
    sumlx, suml2 = _emit_qx_pass(b, xt, n, iscale0, nmax, wt)
    nz = b.fcmp_unordered("!=", suml2, splat(VF, 0.0))
    scale0 = b.select(nz, b.fdiv(sumlx, suml2), splat(VF, 0.0))

    s_scale = alloca_entry(b, VF, name="qx.scale")
    s_best = alloca_entry(b, VF, name="qx.best")
    s_isc = alloca_entry(b, VF, name="qx.iscale")
    b.store(scale0, s_scale)
    b.store(b.fmul(scale0, sumlx), s_best)
    b.store(iscale0, s_isc)
    with for_range(b, const(i32, 0), const(i32, 18), name="qx.is") as k:
        # is = -9..-1, 1..9
        step = b.add(b.sub(k, const(i32, 9)), b.zext(b.icmp_signed(">=", k, const(i32, 9)), i32))
        c = b.fadd(const(f32, float(nmax)), b.fmul(const(f32, 0.1), b.sitofp(step, f32)))
        iscale = b.fdiv(emit_splat(b, b.fneg(c)), mx)
        sumlx, suml2 = _emit_qx_pass(b, xt, n, iscale, nmax, wt)
        best = b.load(s_best)
        take = b.and_(b.fcmp_ordered(">", suml2, splat(VF, 0.0)),
                      b.fcmp_ordered(">", b.fmul(sumlx, sumlx), b.fmul(best, suml2)))
        scale = b.select(take, b.fdiv(sumlx, suml2), b.load(s_scale))
        b.store(scale, s_scale)
        b.store(b.select(take, b.fmul(scale, sumlx), best), s_best)
        b.store(b.select(take, iscale, b.load(s_isc)), s_isc)
    iscale = b.load(s_isc)
    for i in range(n):
        x = b.load(b.gep(xt, [const(i32, i)]))
        l = emit_clamp(b, emit_nearest_int(b, b.fmul(iscale, x)), -nmax, nmax - 1)
        l = b.select(zero, splat(VI, 0), b.add(l, splat(VI, nmax)))
        b.store(b.trunc(l, V8), b.gep(lt, [const(i32, i)]))
    return b.select(zero, splat(VF, 0.0), b.load(s_scale))


def emit_make_q3_quants(b: ir.IRBuilder, xt: ir.Value, n: int, nmax: int,
                        lt: ir.Value) -> ir.Value:
    """`make_q3_quants(n, nmax, x, L, do_rmse=true)` on every lane, laid out as in
    `emit_make_qx_quants`."""
    amax, mx = emit_first_absmax(b, xt, n)
    zero = b.fcmp_ordered("<", amax, splat(VF, float(GROUP_MAX_EPS)))
    iscale = b.fdiv(splat(VF, -float(nmax)), mx)
    ls = alloca_entry(b, VI, n, name="q3.L")
    s_lx = alloca_entry(b, VF, name="q3.sumlx")
    s_l2 = alloca_entry(b, VF, name="q3.suml2")
    sumlx = suml2 = splat(VF, 0.0)
    for i in range(n):
        x = b.load(b.gep(xt, [const(i32, i)]))
        l = emit_clamp(b, emit_nearest_int(b, b.fmul(iscale, x)), -nmax, nmax - 1)
        b.store(l, b.gep(ls, [const(i32, i)]))
        lf = b.sitofp(l, VF)
        w = b.fmul(x, x)
        sumlx = b.fadd(sumlx, b.fmul(b.fmul(w, x), lf))
        suml2 = b.fadd(suml2, b.fmul(b.fmul(w, lf), lf))
    b.store(sumlx, s_lx)
    b.store(suml2, s_l2)

    # Up to 5 passes; a pass where no lane changes would change nothing after it.
    it_bb = b.append_basic_block("q3.iter")
    done_bb = b.append_basic_block("q3.done")
    pre = b.block
    b.branch(it_bb)
    b.position_at_end(it_bb)
    itry = b.phi(i32, name="q3.itry")
    itry.add_incoming(const(i32, 0), pre)
    sumlx, suml2 = b.load(s_lx), b.load(s_l2)
    changed = ir.Constant(VB, [ir.Constant(i1, 0)] * LANES)
    zf = splat(VF, 0.0)
    for i in range(n):
        x = b.load(b.gep(xt, [const(i32, i)]))
        lp = b.gep(ls, [const(i32, i)])
        li = b.load(lp)
        lf = b.sitofp(li, VF)
        w = b.fmul(x, x)
        wx = b.fmul(w, x)
        slx = b.fsub(sumlx, b.fmul(wx, lf))
        sl2 = b.fsub(suml2, b.fmul(b.fmul(w, lf), lf))
        new = emit_clamp(b, emit_nearest_int(b, b.fdiv(b.fmul(x, sl2), slx)), -nmax, nmax - 1)
        nf = b.sitofp(new, VF)
        slx2 = b.fadd(slx, b.fmul(wx, nf))
        sl22 = b.fadd(sl2, b.fmul(b.fmul(w, nf), nf))
        take = b.and_(b.fcmp_ordered(">", slx, zf), b.icmp_signed("!=", new, li))
        take = b.and_(take, b.fcmp_ordered(">", sl22, zf))
        take = b.and_(take, b.fcmp_ordered(">", b.fmul(b.fmul(slx2, slx2), suml2),
                                            b.fmul(b.fmul(sumlx, sumlx), sl22)))
        b.store(b.select(take, new, li), lp)
        sumlx = b.select(take, slx2, sumlx)
        suml2 = b.select(take, sl22, suml2)
        changed = b.or_(changed, take)
    b.store(sumlx, s_lx)
    b.store(suml2, s_l2)
    nxt = b.add(itry, const(i32, 1))
    itry.add_incoming(nxt, b.block)
    any_changed = b.icmp_unsigned("!=", b.bitcast(changed, i16), const(i16, 0))
    b.cbranch(b.and_(any_changed, b.icmp_signed("<", nxt, const(i32, 5))), it_bb, done_bb)
    b.position_at_end(done_bb)

    sumlx, suml2 = b.load(s_lx), b.load(s_l2)
    for i in range(n):
        l = b.add(b.load(b.gep(ls, [const(i32, i)])), splat(VI, nmax))
        l = b.select(zero, splat(VI, 0), l)
        b.store(b.trunc(l, V8), b.gep(lt, [const(i32, i)]))
    scale = b.select(b.fcmp_ordered(">", suml2, zf), b.fdiv(sumlx, suml2), zf)
    return b.select(zero, zf, scale)
