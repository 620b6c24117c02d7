"""The GPU backend's kernels, written once as IR bodies and built for NVPTX or the host CPU.

A kernel body sees one *item* of work (an output row, a token's head, an element) and the
*lanes* that share it: on NVPTX a warp of 32 threads takes one item and sums across its lanes
with warp shuffles; on the host one "lane" takes the item and the sums are the identity. The
same body therefore runs in tests on the CPU (compared with numpy) and, as PTX, on the GPU:

- NVPTX: `name(args..., i64 n_items)`, a `ptx_kernel`; each warp (or thread, for one-lane
  kernels) takes items in a grid-stride loop, so any grid size covers any item count;
- CPU: `name(args..., i64 start, i64 stop)`, a loop over items [start, stop) that the host
  device splits across threads.

Pointer arguments are untyped (`i8*`): device buffers are addresses on both sides. The
weight kernels reuse each quant type's dequantize IR through `runner.kernels._blocks` (and
its store-intercepting `_Builder` to fuse dequantization into the decode product), the
generators the CPU matmul uses, so the GPU sees exactly the weights the CPU sees.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass

from llvmlite import ir

from ... import quant
from ...gguf import GGMLType
from ...jit.builders import (
    Target,
    alloca_entry,
    const,
    f32,
    for_range,
    i8,
    i16,
    i32,
    i64,
    ptr,
    void,
)
from ...jit.floats import emit_f16_to_f32, emit_f32_to_f16, hardware_half
from ..kernels import _Blocks, _blocks, _Builder, _CannotFuse, _fma

WARP = 32
MAX_HEAD_DIM = 256  # attention keeps one head's output row per lane on the stack
MATMUL_TOKENS = 8  # tokens per item of the prompt kernel: a weight block dequantized once
# serves 8 tokens (its floats in registers: 8 accumulators a lane)
LOG2E = 1.4426950408889634

# every weight type the quant registry can dequantize with IR (F32 is a plain load)
WEIGHT_TYPES: tuple[GGMLType, ...] = quant.weight_types()

_ARG_IR = {"p": ptr(i8), "i": i64, "f": f32}
_ARG_C = {"p": ctypes.c_void_p, "i": ctypes.c_int64, "f": ctypes.c_float}


@dataclass(frozen=True)
class KernelSpec:
    """A kernel's name, argument kinds (one letter each: p pointer, i int64, f float32) and
    how many GPU lanes share one item."""

    name: str
    args: str
    lanes: int = 1
    # the last argument is how many lanes (a power of two up to WARP) share an item on the
    # GPU, chosen at launch: rows of few blocks would leave most of a warp idle
    grouped: bool = False
    in_place: bool = False  # an output may be one of the inputs: no `noalias` on pointers

    def host_signature(self) -> type:
        """The ctypes type of the host build: the arguments, then item start and stop."""
        return ctypes.CFUNCTYPE(None, *(_ARG_C[a] for a in self.args), ctypes.c_int64,
                                ctypes.c_int64)


@dataclass
class Item:
    """What a kernel body sees: its item index, its lane among `lanes`, and sums/maxima over
    the lanes (every lane gets the result)."""

    index: ir.Value
    lane: ir.Value
    lanes: int  # the most lanes that may share the item
    target: Target
    group: ir.Value | None = None  # lanes that do share it, when chosen at launch
    active: ir.Value | None = None  # false: a stand-in item whose results are not stored

    @property
    def stride(self) -> ir.Value:
        return self.group if self.group is not None else const(i64, self.lanes)

    def reduce(self, b: ir.IRBuilder, v: ir.Value, op: str) -> ir.Value:
        """Butterfly across the lanes: aligned groups of a power of two stay apart, and
        every lane of the warp takes part in every shuffle (the group size is uniform)."""
        if self.lanes == 1:
            return v
        fn = _declare(b.module, "llvm.nvvm.shfl.sync.bfly.f32", f32, [i32, f32, i32, i32])
        step = self.lanes // 2
        while step:
            other = b.call(fn, [const(i32, 0xFFFFFFFF), v, const(i32, step), const(i32, 0x1F)])
            both = b.fadd(v, other) if op == "add" else _fmax(b, v, other)
            if self.group is not None:
                both = b.select(b.icmp_unsigned("<", const(i64, step), self.group), both, v)
            v = both
            step //= 2
        return v

    def first_lane(self, b: ir.IRBuilder) -> ir.Value:
        """The lane that stores the item's results."""
        first = b.icmp_signed("==", self.lane, const(i64, 0))
        return first if self.active is None else b.and_(first, self.active)


Body = Callable[[ir.IRBuilder, list[ir.Value], Item], None]


def _declare(m: ir.Module, name: str, ret: ir.Type, args: list[ir.Type]) -> ir.Function:
    return m.globals.get(name) or ir.Function(m, ir.FunctionType(ret, args), name)


def _sreg(b: ir.IRBuilder, reg: str) -> ir.Value:
    fn = _declare(b.module, f"llvm.nvvm.read.ptx.sreg.{reg}", i32, [])
    return b.zext(b.call(fn, []), i64)


def _fmax(b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> ir.Value:
    return b.select(b.fcmp_ordered(">", x, y), x, y)


def _exp(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """e^x as 2^(x log2 e): `llvm.exp2` is one instruction on NVPTX and libm's exp2f here."""
    fn = b.module.declare_intrinsic("llvm.exp2", [f32])
    return b.call(fn, [b.fmul(x, const(f32, LOG2E))])


def _tanh(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """tanh x = 1 - 2 / (e^(2x) + 1): no tanh instruction on NVPTX; exact to a few ulp, and
    1 and -1 (not NaN) when e^(2x) overflows or vanishes."""
    e = _exp(b, b.fmul(x, const(f32, 2.0)))
    return b.fsub(const(f32, 1.0), b.fdiv(const(f32, 2.0), b.fadd(e, const(f32, 1.0))))


def _sqrt(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    return b.call(b.module.declare_intrinsic("llvm.sqrt", [f32]), [x])


def build_kernel(m: ir.Module, spec: KernelSpec, target: Target, body: Body) -> ir.Function:
    """Wrap `body` into the item loop of `target` (see the module docstring)."""
    tail = [i64] if target == Target.NVPTX else [i64, i64]
    fn = ir.Function(m, ir.FunctionType(void, [*(_ARG_IR[a] for a in spec.args), *tail]),
                     spec.name)
    n_args = len(spec.args)
    for a in fn.args[:n_args]:
        if isinstance(a.type, ir.PointerType) and not spec.in_place:
            a.add_attribute("noalias")
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    args = list(fn.args[:n_args])
    group = None
    if target == Target.CPU:  # one lane per item: a grouped kernel's group size is unused
        start, stop = fn.args[n_args:]
        step, lane, lanes = const(i64, 1), const(i64, 0), 1
    else:
        fn.calling_convention = "ptx_kernel"
        stop = fn.args[n_args]
        lanes = spec.lanes
        group = args[-1] if spec.grouped else None
        size = group if group is not None else const(i64, lanes)
        threads = _sreg(b, "ntid.x")
        gid = b.add(b.mul(_sreg(b, "ctaid.x"), threads), _sreg(b, "tid.x"))
        start = b.udiv(gid, size)
        lane = b.urem(gid, size)
        step = b.udiv(b.mul(_sreg(b, "nctaid.x"), threads), size)
    if group is None:
        with for_range(b, start, stop, step, name="item") as item:
            body(b, args, Item(item, lane, lanes, target))
    else:
        # A warp holds 32 / group items. Its shuffles need all 32 lanes, so the loop runs
        # on the warp's first item (the same in every lane) and a lane past the last item
        # works on the last one again without storing.
        first = b.udiv(b.urem(gid, const(i64, WARP)), group)
        with for_range(b, b.sub(start, first), stop, step, name="warp") as base:
            item = b.add(base, first)
            active = b.icmp_unsigned("<", item, stop)
            item = b.select(active, item, b.sub(stop, const(i64, 1)))
            body(b, args, Item(item, lane, lanes, target, group, active))
    b.ret_void()
    return fn


# -- small helpers for bodies ----------------------------------------------------------------


def _f32p(b: ir.IRBuilder, p: ir.Value, index: ir.Value | None = None) -> ir.Value:
    q = b.bitcast(p, ptr(f32))
    return q if index is None else b.gep(q, [index])


def _lane_loop(b: ir.IRBuilder, it: Item, n: ir.Value, name: str):
    """for j in [lane, n) step lanes: this lane's share of a row."""
    return for_range(b, it.lane, n, it.stride, name=name)


class _Acc:
    """A float accumulator in an entry-block slot (mem2reg makes it a register)."""

    def __init__(self, b: ir.IRBuilder, init: float = 0.0, name: str = "acc"):
        self.b = b
        self.slot = alloca_entry(b, f32, name=name)
        self.set(const(f32, init))

    def set(self, v: ir.Value, b: ir.IRBuilder | None = None) -> None:
        (b or self.b).store(v, self.slot)

    def get(self, b: ir.IRBuilder | None = None) -> ir.Value:
        return (b or self.b).load(self.slot)

    def add(self, v: ir.Value, b: ir.IRBuilder | None = None) -> None:
        b = b or self.b
        self.set(b.fadd(self.get(b), v), b)

    def add_product(self, x: ir.Value, y: ir.Value, b: ir.IRBuilder | None = None) -> None:
        """acc + x * y, one rounding (an explicit FMA: the same on the GPU and any CPU)."""
        b = b or self.b
        self.set(_fma(b, self.get(b), x, y), b)


def _c(v: int) -> ir.Constant:
    return const(i64, v)


# -- the kernels: weights ------------------------------------------------------------------


def matvec_spec(t: GGMLType) -> KernelSpec:
    """Decode product: one item per (token, row)."""
    return KernelSpec(f"matvec_{t.name.lower()}", "pipipiiiii", WARP, grouped=True)


def matvec_sel_spec(t: GGMLType) -> KernelSpec:
    """Decode product over one expert of a stacked 3-D weight, the expert read from device
    memory (so a recorded step replays with whatever the router picks): matvec's arguments,
    then the expert ids, which of them, and the bytes per expert, then the lane group."""
    return KernelSpec(f"matvec_sel_{t.name.lower()}", "pipipiiiipiii", WARP, grouped=True)


def _selected(body: Body) -> Body:
    """`body` over the weight at w + ids[which] * expert_bytes."""

    def wrapped(b, args, it):
        w, *rest, ids, which, expert_bytes, group = args
        e = b.load(b.gep(b.bitcast(ids, ptr(i64)), [which]))
        body(b, [b.gep(w, [b.mul(e, expert_bytes)]), *rest, group], it)

    return wrapped


def matmul_spec(t: GGMLType) -> KernelSpec:
    """Prompt product: one item per (group of MATMUL_TOKENS tokens, row)."""
    return KernelSpec(f"matmul_{t.name.lower()}", "pipipiiiii", WARP, grouped=True)


def matmul_items(n_tok: int, n_rows: int) -> int:
    """Items of a prompt product: the last group of tokens may be short."""
    return -(-n_tok // MATMUL_TOKENS) * n_rows


def lanes_per_row(n_blocks: int) -> int:
    """GPU lanes for a row of `n_blocks` blocks (lanes take whole blocks): the smallest power
    of two that covers them, at most a warp."""
    g = 1
    while g < min(n_blocks, WARP):
        g *= 2
    return g


def get_rows_spec(t: GGMLType) -> KernelSpec:
    """Embedding lookup: one item per (id, block)."""
    return KernelSpec(f"get_rows_{t.name.lower()}", "pippi", 1)


def _floats_in(t: ir.Type) -> int | None:
    """How many floats a stored value of type `t` holds (a float or a float vector)."""
    if t == f32:
        return 1
    if isinstance(t, ir.VectorType) and t.element == f32:
        return t.count
    return None


def can_fuse(blk: _Blocks) -> bool:
    """Whether the block's dequantization IR writes each of its floats exactly once through
    pointers `_Builder` can follow, so its stores can become FMAs (tried on a scratch
    module). Float weights (32 one-element blocks) fuse too: each store is one float."""
    m = ir.Module()
    fn = ir.Function(m, ir.FunctionType(void, [ptr(i8), ptr(f32)]), "probe")
    b = _Builder(fn.append_basic_block("entry"))
    b.fix_half = False
    seen = [0] * blk.size

    def on_store(value, offset):
        n = _floats_in(value.type)
        if n is None or offset + n > blk.size:
            raise _CannotFuse("store")
        for o in range(offset, offset + n):
            seen[o] += 1

    try:
        with b.intercept(fn.args[1], on_store):
            blk.emit(b, fn.args[0], fn.args[1])
    except _CannotFuse:
        return False
    return all(c == 1 for c in seen)


def _dot_body(t: GGMLType, T: int) -> Body:
    """y[tok, r] = dot(W[r], x[tok]) with args (w, w_stride, x, ldx, y, ldy, n_rows,
    n_blocks, n_tok, lanes per row) and one item per (group of T tokens, row). The last
    group clamps its extra tokens to the last one and skips their stores. Lanes take whole
    blocks in turn, and each block is dequantized once for the group's T tokens.

    For every type whose IR allows it, the block's dequantization IR is emitted through
    `_Builder`, whose stores become multiply-adds, so the dequantized weights stay in
    registers (on a GPU, a 256-float stack buffer per thread lives in local memory: 1 KB a
    lane, read T times). Decode (T = 1) adds them into vector accumulators, one per vector
    width the IR stores; a prompt group into one scalar accumulator per token (T tokens'
    vector accumulators would not fit in registers). Other types dequantize the block into
    a stack buffer and dot it from there with every token of the group."""
    blk = _blocks(t)
    fuse = can_fuse(blk)

    def body(b: ir.IRBuilder, args: list[ir.Value], it: Item) -> None:
        w, ws, x, ldx, y, ldy, n_rows, nb, n_tok, _group = args
        group, r = b.udiv(it.index, n_rows), b.urem(it.index, n_rows)
        want = [b.add(b.mul(group, _c(T)), _c(k)) for k in range(T)]
        last = b.sub(n_tok, _c(1))
        toks = [b.select(b.icmp_signed("<", tk, n_tok), tk, last) for tk in want]
        xt = [_f32p(b, x, b.mul(tk, ldx)) for tk in toks]
        row = b.gep(w, [b.mul(r, ws)])
        scratch = b.bitcast(alloca_entry(b, f32, 1 if fuse else blk.size, name="block"),
                            ptr(f32))
        accs = [_Acc(b, name=f"acc{k}") for k in range(T)]
        for acc in accs:
            acc.set(const(f32, 0.0))
        # fused: one vector accumulator per (token, width of the vectors the IR stores)
        vaccs: dict[tuple[int, int], ir.Value] = {}

        def vacc(k: int, n: int) -> ir.Value:
            if (k, n) not in vaccs:
                vt = ir.VectorType(f32, n)
                slot = alloca_entry(b, vt, name=f"vacc{k}.{n}")
                with b.goto_block(b.function.entry_basic_block):
                    b.position_before(b.function.entry_basic_block.instructions[-1])
                    b.store(ir.Constant(vt, [0.0] * n), slot)
                vaccs[k, n] = slot
            return vaccs[k, n]

        with _lane_loop(b, it, nb, "blk") as k:
            src = b.gep(row, [b.mul(k, _c(blk.nbytes))])
            base = b.mul(k, _c(blk.size))
            if fuse:
                fb = _Builder(b.block)
                fb.fix_half = False

                def on_store(value, offset):
                    n = value.type.count if isinstance(value.type, ir.VectorType) else 1
                    at = fb.add(base, _c(offset))
                    for tok, xp in enumerate(xt):
                        xv = fb.load(fb.bitcast(fb.gep(xp, [at]), ptr(value.type)), align=4)
                        if n == 1:
                            accs[tok].add_product(value, xv, fb)
                        elif T == 1:
                            slot = vacc(tok, n)
                            fb.store(_fma(fb, fb.load(slot), value, xv), slot)
                        else:
                            for i in range(n):
                                lane = const(i32, i)
                                accs[tok].add_product(fb.extract_element(value, lane),
                                                      fb.extract_element(xv, lane), fb)

                with fb.intercept(scratch, on_store):
                    blk.emit(fb, src, scratch)
                b.position_at_end(fb.block)
            else:
                blk.emit(b, src, scratch)
                with for_range(b, _c(0), _c(blk.size), name="j") as j:
                    wv = b.load(b.gep(scratch, [j]))
                    for acc, xp in zip(accs, xt):
                        acc.add_product(wv, b.load(b.gep(xp, [b.add(base, j)])))
        for (tok, n), slot in vaccs.items():  # zeroed in the entry block, then per item
            v = b.load(slot)
            b.store(ir.Constant(v.type, [0.0] * n), slot)
            for i in range(n):
                accs[tok].add(b.extract_element(v, const(i32, i)))
        for k in range(T):
            total = it.reduce(b, accs[k].get(), "add")
            keep = it.first_lane(b)
            if k:
                keep = b.and_(keep, b.icmp_signed("<", want[k], n_tok))
            with b.if_then(keep):
                b.store(total, _f32p(b, y, b.add(b.mul(toks[k], ldy), r)))

    return body


def _get_rows_body(t: GGMLType) -> Body:
    """y[i] = dequantized row ids[i] of W, args (w, w_stride, ids (i64), y, n_blocks)."""
    blk = _blocks(t)

    def body(b: ir.IRBuilder, args: list[ir.Value], it: Item) -> None:
        w, ws, ids, y, nb = args
        i, k = b.udiv(it.index, nb), b.urem(it.index, nb)
        rid = b.load(b.gep(b.bitcast(ids, ptr(i64)), [i]))
        src = b.gep(w, [b.add(b.mul(rid, ws), b.mul(k, _c(blk.nbytes)))])
        dst = _f32p(b, y, b.mul(b.add(b.mul(i, nb), k), _c(blk.size)))
        blk.emit(b, src, dst)

    return body


def build_weight_module(t: GGMLType, target: Target) -> ir.Module:
    """matvec_<t>, matmul_<t> and get_rows_<t>."""
    m = ir.Module(name=f"gpu_{t.name.lower()}")
    build_kernel(m, matvec_spec(t), target, _dot_body(t, 1))
    build_kernel(m, matvec_sel_spec(t), target, _selected(_dot_body(t, 1)))
    build_kernel(m, matmul_spec(t), target, _dot_body(t, MATMUL_TOKENS))
    build_kernel(m, get_rows_spec(t), target, _get_rows_body(t))
    return m


def weight_specs(t: GGMLType) -> list[KernelSpec]:
    return [matvec_spec(t), matvec_sel_spec(t), matmul_spec(t), get_rows_spec(t)]


def virtual_block(t: GGMLType) -> int:
    """Floats per block the weight kernels walk (32 for float types)."""
    return _blocks(t).size


# -- the kernels: activations ----------------------------------------------------------------

COMMON: dict[str, KernelSpec] = {s.name: s for s in [
    KernelSpec("rms_norm", "pppif", WARP),      # x, w, y, n, eps; item = row
    KernelSpec("add_rms_norm", "ppppif", WARP),  # x (+= a), a, w, y, n, eps; item = row
    # the same, also writing y rounded as the products that read it round their input (x, [a,]
    # w, y, yq, round code, n, eps; see `round_code`)
    KernelSpec("rms_norm_round", "ppppiif", WARP),
    KernelSpec("add_rms_norm_round", "pppppiif", WARP),
    KernelSpec("softmax", "ppi", WARP),         # x, y, n; item = row
    KernelSpec("silu_mul", "ppp", 1, in_place=True),  # g, u, y (may be g); item = element
    # GeGLU as ggml's CPU computes it (GELU of g rounded to fp16, the result rounded to fp16)
    KernelSpec("gelu_mul", "ppp", 1, in_place=True),  # g, u, y (may be g); item = element
    # g, u, y, yq, round code; item = one rounding group (`round_group`) of floats
    KernelSpec("silu_mul_round", "ppppi", WARP, in_place=True),
    KernelSpec("add", "ppp", 1, in_place=True),  # a, b, y (may be a); item = element
    KernelSpec("add_bias", "ppi", 1),           # x (in place), bias, n_cols; item = element
    # x, table, pos, n_head, head_dim, half; item = (token, head, pair)
    KernelSpec("rope_normal", "pppiii", 1),
    KernelSpec("rope_neox", "pppiii", 1),
    KernelSpec("f16_to_f32", "pp", 1),          # src, dst; item = element
    KernelSpec("kv_store", "pppi", 1),          # src, f16 cache, pos, row; item = element
    # x, y (may be x), round code; item = one rounding group (`round_group`) of floats
    KernelSpec("round_act", "ppi", WARP, in_place=True),
    # q, k cache, v cache, out, n_head, n_head_kv, head_dim, pos, scale, window (0: none),
    # soft-cap (0: none); item = (token, head)
    KernelSpec("attention", "ppppiiipfif", WARP),
    # mixture of experts: router logits, ids out (i64), weights out, n_expert, used; item =
    # token: softmax, the `used` most probable (the lower id first on a tie), renormalised
    KernelSpec("moe_route", "pppii", 1),
    # y (=, or +=) weights[which] * x, y and x of n floats; item = element
    KernelSpec("moe_add", "pppii", 1, in_place=True),  # y, x, weights, which, first
]}

# Kernels that take the position of the batch's first token as `pos`, a pointer to one i64
# in device memory: a decode step's launches are then the same for every position, which
# lets a device record them once and replay them (a CUDA graph).


def _load_pos(b: ir.IRBuilder, pos: ir.Value) -> ir.Value:
    return b.load(b.bitcast(pos, ptr(i64)))


# The activations a product reads, rounded as llama.cpp's CPU rounds them before a product
# with the weight (the weight type's `activation_type`, ggml's vec_dot_type), in float form:
# each value as the levels times the scale, the numbers the CPU's products multiply. A
# kernel that rounds takes one of these codes (a launch argument, the same for every lane).
ROUND_Q8 = 0  # Q8_0 and Q8_1: 32 a group, d = amax / 127 as fp16, levels x * (127 / amax)
ROUND_Q8_K = 1  # 256 a block, scale from the signed element of largest magnitude, f32 d
ROUND_F16 = 2  # round to nearest even, as ggml's conversions
ROUND_BF16 = 3
_ROUND_CODES = {GGMLType.Q8_0: ROUND_Q8, GGMLType.Q8_1: ROUND_Q8, GGMLType.Q8_K: ROUND_Q8_K,
                GGMLType.F16: ROUND_F16, GGMLType.BF16: ROUND_BF16}


def round_code(act: GGMLType | None) -> int | None:
    """The rounding code of an `activation_type`; None where products read x as it is."""
    if act is None or act == GGMLType.F32:
        return None
    if act not in _ROUND_CODES:
        raise ValueError(f"no device rounding for {act.name} activations")
    return _ROUND_CODES[act]


def round_group(code: int) -> int:
    """Floats per rounding group of `code` (a row's length is a multiple of it)."""
    return 256 if code == ROUND_Q8_K else 32


def _group_size(b: ir.IRBuilder, code: ir.Value) -> ir.Value:
    return b.select(b.icmp_signed("==", code, _c(ROUND_Q8_K)), _c(256), _c(32))


def _roundeven(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    return b.call(b.module.declare_intrinsic("llvm.roundeven", [f32]), [v])


def _fabs(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    return b.call(b.module.declare_intrinsic("llvm.fabs", [f32]), [v])


def _round_group(b: ir.IRBuilder, it: Item, src: ir.Value, dst: ir.Value,
                 code: ir.Value) -> None:
    """dst[0:size] = src[0:size] rounded by `code` (size = round_group(code)). Each lane
    reads and writes only its own elements (j = lane + k * lanes), so dst may be src, and a
    lane may read here what it has just written to src."""
    with b.if_else(b.icmp_signed("==", code, _c(ROUND_Q8))) as (q8, other):
        with q8:
            _round_q8_group(b, it, src, dst)
        with other:
            with b.if_else(b.icmp_signed("==", code, _c(ROUND_Q8_K))) as (qk, floats):
                with qk:
                    _round_q8_k_block(b, it, src, dst)
                with floats:
                    _round_half_group(b, it, src, dst, code)


def _round_q8_group(b: ir.IRBuilder, it: Item, src: ir.Value, dst: ir.Value) -> None:
    """Q8_0/Q8_1 (llama.cpp's AVX2 quantize_row_q8_0/1): amax over the 32, d = amax / 127
    kept as fp16, levels = round-half-even(x * (127 / amax)) (0 where amax is 0); the value
    levels * fp16(d)."""
    hw = hardware_half(it.target)
    amax = _Acc(b, name="amax")
    amax.set(const(f32, 0.0))
    with _lane_loop(b, it, _c(32), "qj") as j:
        amax.set(_fmax(b, amax.get(), _fabs(b, b.load(b.gep(src, [j])))))
    top = it.reduce(b, amax.get(), "max")
    dh = emit_f16_to_f32(b, emit_f32_to_f16(b, b.fdiv(top, const(f32, 127.0)), hw), hw)
    inv = b.select(b.fcmp_ordered("!=", top, const(f32, 0.0)),
                   b.fdiv(const(f32, 127.0), top), const(f32, 0.0))
    with _lane_loop(b, it, _c(32), "qk") as j:
        level = _roundeven(b, b.fmul(b.load(b.gep(src, [j])), inv))
        b.store(b.fmul(level, dh), b.gep(dst, [j]))


def _round_q8_k_block(b: ir.IRBuilder, it: Item, src: ir.Value, dst: ir.Value) -> None:
    """Q8_K (quantize_row_q8_K_ref) over 256: `mx`, the first element of largest magnitude
    with its sign, iscale = -127 / mx, levels = min(127, round-half-even(x * iscale)), the
    value levels * (1 / iscale) (all 0 where every x is 0). The lanes find amax, then the
    lowest index holding it (as a float maximum of -index), then mx as a sum to which only
    the lane holding that index adds anything: no lane reads another's elements."""
    n = _c(256)
    amax = _Acc(b, name="amax")
    amax.set(const(f32, 0.0))
    with _lane_loop(b, it, n, "kj") as j:
        amax.set(_fmax(b, amax.get(), _fabs(b, b.load(b.gep(src, [j])))))
    top = it.reduce(b, amax.get(), "max")
    first = _Acc(b, -256.0, name="first")  # minus the lowest index of this lane's hits
    with _lane_loop(b, it, n, "kf") as j:
        hit = b.fcmp_ordered("==", _fabs(b, b.load(b.gep(src, [j]))), top)
        none_yet = b.fcmp_ordered("==", first.get(), const(f32, -256.0))
        first.set(b.select(b.and_(hit, none_yet), b.fsub(const(f32, 0.0), b.uitofp(j, f32)),
                           first.get()))
    pos = it.reduce(b, first.get(), "max")
    mine = _Acc(b, name="mx")
    mine.set(const(f32, 0.0))
    with _lane_loop(b, it, n, "km") as j:
        at = b.fcmp_ordered("==", b.fsub(const(f32, 0.0), b.uitofp(j, f32)), pos)
        mine.add(b.select(at, b.load(b.gep(src, [j])), const(f32, 0.0)))
    mx = it.reduce(b, mine.get(), "add")
    nz = b.fcmp_ordered("!=", top, const(f32, 0.0))
    iscale = b.select(nz, b.fdiv(const(f32, -127.0), mx), const(f32, 0.0))
    d = b.select(nz, b.fdiv(const(f32, 1.0), iscale), const(f32, 0.0))
    cap = const(f32, 127.0)
    with _lane_loop(b, it, n, "kq") as j:
        level = _roundeven(b, b.fmul(b.load(b.gep(src, [j])), iscale))
        level = b.select(b.fcmp_ordered(">", level, cap), cap, level)
        b.store(b.fmul(level, d), b.gep(dst, [j]))


def _round_half_group(b: ir.IRBuilder, it: Item, src: ir.Value, dst: ir.Value,
                      code: ir.Value) -> None:
    """F16 or BF16 (by `code`), element by element, to nearest even; a NaN stays itself."""
    hw = hardware_half(it.target)
    is_f16 = b.icmp_signed("==", code, _c(ROUND_F16))
    with _lane_loop(b, it, _c(32), "hj") as j:
        v = b.load(b.gep(src, [j]))
        h = emit_f16_to_f32(b, emit_f32_to_f16(b, v, hw), hw)
        u = b.bitcast(v, i32)
        odd = b.and_(b.lshr(u, const(i32, 16)), const(i32, 1))
        r = b.and_(b.add(u, b.add(const(i32, 0x7FFF), odd)), const(i32, 0xFFFF0000 - (1 << 32)))
        bf = b.select(b.fcmp_unordered("uno", v, v), v, b.bitcast(r, f32))
        b.store(b.select(is_f16, h, bf), b.gep(dst, [j]))


def _round_row(b, it, yr, yq, n, code):
    """yq = y rounded by `code` group by group, for a row of n (a multiple of the group)."""
    size = _group_size(b, code)
    with for_range(b, _c(0), b.udiv(n, size), name="group") as g:
        at = b.mul(g, size)
        _round_group(b, it, b.gep(yr, [at]), b.gep(yq, [at]), code)


def _rms_norm(rounds: bool) -> Body:
    def body(b, args, it):
        x, w, y, *yq, n, eps = args
        xr, yr = _f32p(b, x, b.mul(it.index, n)), _f32p(b, y, b.mul(it.index, n))
        acc = _Acc(b)
        acc.set(const(f32, 0.0))
        with _lane_loop(b, it, n, "j") as j:
            v = b.load(b.gep(xr, [j]))
            acc.add(b.fmul(v, v))
        _rms_scale_store(b, it, xr, w, yr, n, eps, acc)
        if rounds:
            _round_row(b, it, yr, _f32p(b, yq[0], b.mul(it.index, n)), n, yq[1])

    return body


def _rms_scale_store(b, it, xr, w, yr, n, eps, acc):
    """y = x / sqrt(mean(x^2) + eps) * w, given this lane's share of sum(x^2) in acc."""
    ms = b.fdiv(it.reduce(b, acc.get(), "add"), b.sitofp(n, f32))
    scale = _sqrt(b, b.fadd(ms, eps))
    with _lane_loop(b, it, n, "k") as j:
        v = b.fdiv(b.load(b.gep(xr, [j])), scale)
        b.store(b.fmul(v, b.load(_f32p(b, w, j))), b.gep(yr, [j]))


def _add_rms_norm(rounds: bool) -> Body:
    """x += a, then y = RMSNorm(x) * w: the residual add and the next norm in one pass."""

    def body(b, args, it):
        x, a, w, y, *yq, n, eps = args
        xr, ar = _f32p(b, x, b.mul(it.index, n)), _f32p(b, a, b.mul(it.index, n))
        yr = _f32p(b, y, b.mul(it.index, n))
        acc = _Acc(b)
        acc.set(const(f32, 0.0))
        with _lane_loop(b, it, n, "j") as j:  # a lane reads back only what it wrote
            v = b.fadd(b.load(b.gep(xr, [j])), b.load(b.gep(ar, [j])))
            b.store(v, b.gep(xr, [j]))
            acc.add(b.fmul(v, v))
        _rms_scale_store(b, it, xr, w, yr, n, eps, acc)
        if rounds:
            _round_row(b, it, yr, _f32p(b, yq[0], b.mul(it.index, n)), n, yq[1])

    return body


def _softmax(b, args, it):
    x, y, n = args
    xr, yr = _f32p(b, x, b.mul(it.index, n)), _f32p(b, y, b.mul(it.index, n))
    mx = _Acc(b, name="max")
    mx.set(const(f32, float("-inf")))
    with _lane_loop(b, it, n, "j") as j:
        mx.set(_fmax(b, mx.get(), b.load(b.gep(xr, [j]))))
    top = it.reduce(b, mx.get(), "max")
    acc = _Acc(b)
    acc.set(const(f32, 0.0))
    with _lane_loop(b, it, n, "k") as j:
        e = _exp(b, b.fsub(b.load(b.gep(xr, [j])), top))
        b.store(e, b.gep(yr, [j]))
        acc.add(e)
    inv = b.fdiv(const(f32, 1.0), it.reduce(b, acc.get(), "add"))
    with _lane_loop(b, it, n, "l") as j:
        b.store(b.fmul(b.load(b.gep(yr, [j])), inv), b.gep(yr, [j]))


def _silu_mul_at(b, g, u, y, i):
    gv = b.load(_f32p(b, g, i))
    s = b.fdiv(gv, b.fadd(const(f32, 1.0), _exp(b, b.fsub(const(f32, 0.0), gv))))
    b.store(b.fmul(s, b.load(_f32p(b, u, i))), _f32p(b, y, i))


def _gelu_mul(target: Target) -> Body:
    """y = GELU(g) * u, as ggml's CPU: g rounded to fp16, GELU (tanh form) of that, rounded
    to fp16 (its lookup table); 0 for g <= -10 and g itself for g >= 10."""
    hw = hardware_half(target)

    def body(b, args, it):
        g, u, y = args
        x = b.load(_f32p(b, g, it.index))
        xf = emit_f16_to_f32(b, emit_f32_to_f16(b, x, hw), hw)
        inner = b.fmul(b.fmul(const(f32, 0.7978845608028654), xf),
                       b.fadd(const(f32, 1.0), b.fmul(b.fmul(const(f32, 0.044715), xf), xf)))
        # 1 + tanh z as ggml's table has it: tanh z rounded to a float (its spacing near -1
        # is what is left of GELU for negative x), from the accurate 2 / (1 + e^(-2z))
        s = b.fdiv(const(f32, 2.0), b.fadd(
            const(f32, 1.0), _exp(b, b.fmul(inner, const(f32, -2.0)))))
        one_plus = b.fadd(const(f32, 1.0), b.fsub(s, const(f32, 1.0)))
        gelu = b.fmul(b.fmul(const(f32, 0.5), xf), one_plus)
        gelu = emit_f16_to_f32(b, emit_f32_to_f16(b, gelu, hw), hw)
        gelu = b.select(b.fcmp_ordered("<=", x, const(f32, -10.0)), const(f32, 0.0),
                        b.select(b.fcmp_ordered(">=", x, const(f32, 10.0)), x, gelu))
        b.store(b.fmul(gelu, b.load(_f32p(b, u, it.index))), _f32p(b, y, it.index))

    return body


def _moe_route(b, args, it):
    logits, ids, weights, n_exp, used = args
    row = _f32p(b, logits, b.mul(it.index, n_exp))
    out_id = b.gep(b.bitcast(ids, ptr(i64)), [b.mul(it.index, used)])
    out_w = _f32p(b, weights, b.mul(it.index, used))
    top = _Acc(b, float("-inf"), name="top")
    with for_range(b, _c(0), n_exp, name="e") as e:
        top.set(_fmax(b, top.get(), b.load(b.gep(row, [e]))))
    total = _Acc(b, name="total")
    with for_range(b, _c(0), n_exp, name="s") as e:
        total.add(_exp(b, b.fsub(b.load(b.gep(row, [e])), top.get())))
    picked = _Acc(b, name="picked")
    with for_range(b, _c(0), used, name="k") as k:  # the k-th most probable not yet taken
        best, best_p = alloca_entry(b, i64, name="best"), _Acc(b, -1.0, name="best_p")
        b.store(_c(0), best)
        with for_range(b, _c(0), n_exp, name="c") as e:
            taken = alloca_entry(b, ir.IntType(1), name="taken")
            b.store(ir.Constant(ir.IntType(1), 0), taken)
            with for_range(b, _c(0), k, name="prev") as j:
                same = b.icmp_signed("==", b.load(b.gep(out_id, [j])), e)
                b.store(b.or_(b.load(taken), same), taken)
            p = b.fdiv(_exp(b, b.fsub(b.load(b.gep(row, [e])), top.get())), total.get())
            better = b.and_(b.not_(b.load(taken)), b.fcmp_ordered(">", p, best_p.get()))
            with b.if_then(better):
                b.store(e, best)
                best_p.set(p)
        b.store(b.load(best), b.gep(out_id, [k]))
        b.store(best_p.get(), b.gep(out_w, [k]))
        picked.add(best_p.get())
    with for_range(b, _c(0), used, name="n") as k:
        w = b.gep(out_w, [k])
        b.store(b.fdiv(b.load(w), picked.get()), w)


def _moe_add(b, args, it):
    y, x, weights, which, first = args
    w = b.load(_f32p(b, weights, which))
    v = b.fmul(w, b.load(_f32p(b, x, it.index)))
    at = _f32p(b, y, it.index)
    old = b.select(b.icmp_signed("!=", first, _c(0)), const(f32, 0.0), b.load(at))
    b.store(b.fadd(old, v), at)


def _silu_mul(b, args, it):
    g, u, y = args
    _silu_mul_at(b, g, u, y, it.index)


def _silu_mul_round(b, args, it):
    """y = silu(g) * u for one rounding group, and yq = y rounded by `code`."""
    g, u, y, yq, code = args
    size = _group_size(b, code)
    at = b.mul(it.index, size)
    with _lane_loop(b, it, size, "j") as j:
        _silu_mul_at(b, g, u, y, b.add(at, j))
    _round_group(b, it, _f32p(b, y, at), _f32p(b, yq, at), code)


def _add(b, args, it):
    a, c, y = args
    v = b.fadd(b.load(_f32p(b, a, it.index)), b.load(_f32p(b, c, it.index)))
    b.store(v, _f32p(b, y, it.index))


def _add_bias(b, args, it):
    x, bias, n_cols = args
    p = _f32p(b, x, it.index)
    b.store(b.fadd(b.load(p), b.load(_f32p(b, bias, b.urem(it.index, n_cols)))), p)


def _rope(neox: bool) -> Body:
    """Rotate pair i of (token, head) by the angle of position p0 + token, read from a table
    of (cos, sin) per (position, i) that the host computes once, as the CPU does."""

    def body(b, args, it):
        x, table, pos, n_head, hd, half = args
        p0 = _load_pos(b, pos)
        i, th = b.urem(it.index, half), b.udiv(it.index, half)
        h, t = b.urem(th, n_head), b.udiv(th, n_head)
        cs = b.mul(b.add(b.mul(b.add(p0, t), half), i), _c(2))
        cos, sin = b.load(_f32p(b, table, cs)), b.load(_f32p(b, table, b.add(cs, _c(1))))
        row = b.mul(b.add(b.mul(t, n_head), h), hd)
        ia, ib = (i, b.add(i, half)) if neox else (b.mul(i, _c(2)), b.add(b.mul(i, _c(2)), _c(1)))
        pa, pb = _f32p(b, x, b.add(row, ia)), _f32p(b, x, b.add(row, ib))
        va, vb = b.load(pa), b.load(pb)
        b.store(b.fsub(b.fmul(va, cos), b.fmul(vb, sin)), pa)
        b.store(b.fadd(b.fmul(va, sin), b.fmul(vb, cos)), pb)

    return body


def _half_bodies(target: Target) -> tuple[Body, Body]:
    """f16 -> f32, and the KV store (f32 -> f16 at the device's position)."""
    hw = hardware_half(target)

    def to_float(b, args, it):
        src, dst = args
        h = b.load(b.gep(b.bitcast(src, ptr(i16)), [it.index]))
        b.store(emit_f16_to_f32(b, h, hw), _f32p(b, dst, it.index))

    def kv_store(b, args, it):
        src, cache, pos, row = args  # element i of the batch goes to cache[pos * row + i]
        h = emit_f32_to_f16(b, b.load(_f32p(b, src, it.index)), hw)
        at = b.add(b.mul(_load_pos(b, pos), row), it.index)
        b.store(h, b.gep(b.bitcast(cache, ptr(i16)), [at]))

    return to_float, kv_store


def _round_act(b, args, it):
    """y = x rounded by `code`, one rounding group per item (see `_round_group`)."""
    x, y, code = args
    at = b.mul(it.index, _group_size(b, code))
    _round_group(b, it, _f32p(b, x, at), _f32p(b, y, at), code)


def _attention(target: Target) -> Body:
    """Causal attention of one query (token t, head h) over the f16 KV cache positions
    [0, p0 + t]: lanes take keys in turn with an online softmax (running max, sum and
    weighted values), then merge their partial results across the lanes."""
    hw = hardware_half(target)

    def body(b, args, it):
        q, kc, vc, out, n_head, n_kv, hd, pos, scale, window, cap = args
        p0 = _load_pos(b, pos)
        t, h = b.udiv(it.index, n_head), b.urem(it.index, n_head)
        # keys [first, p]: all up to the query's position, or the last `window` of them
        p = b.add(p0, t)
        lo = b.add(b.sub(p, window), _c(1))
        first = b.select(b.and_(b.icmp_signed(">", window, _c(0)),
                                b.icmp_signed(">", lo, _c(0))), lo, _c(0))
        kvh = b.udiv(h, b.udiv(n_head, n_kv))
        stride = b.mul(n_kv, hd)  # halves per cache position
        qr = _f32p(b, q, b.mul(it.index, hd))
        kh, vh = b.bitcast(kc, ptr(i16)), b.bitcast(vc, ptr(i16))
        acc = b.bitcast(alloca_entry(b, f32, MAX_HEAD_DIM, name="o"), ptr(f32))
        with for_range(b, _c(0), hd, name="z") as d:
            b.store(const(f32, 0.0), b.gep(acc, [d]))
        m, s = _Acc(b, name="m"), _Acc(b, name="s")
        m.set(const(f32, float("-inf")))
        s.set(const(f32, 0.0))
        with _lane_loop(b, it, b.sub(b.add(p, _c(1)), first), "key") as jj:
            j = b.add(first, jj)
            krow = b.add(b.mul(j, stride), b.mul(kvh, hd))
            dot = _Acc(b, name="dot")
            dot.set(const(f32, 0.0))
            with for_range(b, _c(0), hd, name="d") as d:
                kv = emit_f16_to_f32(b, b.load(b.gep(kh, [b.add(krow, d)])), hw)
                dot.add_product(b.load(b.gep(qr, [d])), kv)
            score = b.fmul(dot.get(), scale)
            capped = b.fcmp_ordered(">", cap, const(f32, 0.0))
            score = b.select(capped, b.fmul(_tanh(b, b.fdiv(score, cap)), cap), score)
            m_new = _fmax(b, m.get(), score)
            corr, p = _exp(b, b.fsub(m.get(), m_new)), _exp(b, b.fsub(score, m_new))
            s.set(b.fadd(b.fmul(s.get(), corr), p))
            m.set(m_new)
            with for_range(b, _c(0), hd, name="dv") as d:
                vv = emit_f16_to_f32(b, b.load(b.gep(vh, [b.add(krow, d)])), hw)
                a = b.gep(acc, [d])
                b.store(b.fadd(b.fmul(b.load(a), corr), b.fmul(p, vv)), a)
        top = it.reduce(b, m.get(), "max")
        f = _exp(b, b.fsub(m.get(), top))  # 0 for a lane that saw no key (m = -inf)
        total = it.reduce(b, b.fmul(s.get(), f), "add")
        orow = _f32p(b, out, b.mul(it.index, hd))
        with for_range(b, _c(0), hd, name="o") as d:
            v = it.reduce(b, b.fmul(b.load(b.gep(acc, [d])), f), "add")
            with b.if_then(it.first_lane(b)):
                b.store(b.fdiv(v, total), b.gep(orow, [d]))

    return body


def build_common_module(target: Target) -> ir.Module:
    """Every kernel that is not a weight product: norms, softmax, activations, RoPE, f16
    conversion and attention."""
    m = ir.Module(name="gpu_common")
    to_float, kv_store = _half_bodies(target)
    bodies = {"rms_norm": _rms_norm(False), "rms_norm_round": _rms_norm(True),
              "add_rms_norm": _add_rms_norm(False), "add_rms_norm_round": _add_rms_norm(True),
              "softmax": _softmax, "silu_mul": _silu_mul, "silu_mul_round": _silu_mul_round,
              "gelu_mul": _gelu_mul(target), "moe_route": _moe_route, "moe_add": _moe_add,
              "add": _add, "add_bias": _add_bias, "rope_normal": _rope(False),
              "rope_neox": _rope(True), "f16_to_f32": to_float, "kv_store": kv_store,
              "round_act": _round_act, "attention": _attention(target)}
    for name, spec in COMMON.items():
        build_kernel(m, spec, target, bodies[name])
    return m
