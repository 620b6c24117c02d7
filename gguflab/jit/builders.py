"""Small helpers to write kernels once and build them for the CPU or for NVPTX."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from llvmlite import ir

i1 = ir.IntType(1)
i8 = ir.IntType(8)
i16 = ir.IntType(16)
i32 = ir.IntType(32)
i64 = ir.IntType(64)
f16 = ir.HalfType()
f32 = ir.FloatType()
f64 = ir.DoubleType()
void = ir.VoidType()


def ptr(t: ir.Type) -> ir.PointerType:
    return t.as_pointer()


def const(t: ir.Type, v: int | float) -> ir.Constant:
    return ir.Constant(t, v)


class Target(enum.Enum):
    CPU = "cpu"
    NVPTX = "nvptx"


@contextmanager
def for_range(
    b: ir.IRBuilder, start: ir.Value, stop: ir.Value, step: ir.Value | int = 1, name: str = "i"
) -> Iterator[ir.Value]:
    """`for (i = start; i < stop; i += step)`; the body is emitted inside the `with`."""
    if isinstance(step, int):
        step = const(start.type, step)
    pre = b.block
    cond_bb = b.append_basic_block(f"{name}.cond")
    body_bb = b.append_basic_block(f"{name}.body")
    end_bb = b.append_basic_block(f"{name}.end")
    b.branch(cond_bb)
    b.position_at_end(cond_bb)
    idx = b.phi(start.type, name=name)
    idx.add_incoming(start, pre)
    b.cbranch(b.icmp_signed("<", idx, stop), body_bb, end_bb)
    b.position_at_end(body_bb)
    yield idx
    nxt = b.add(idx, step, name=f"{name}.next")
    idx.add_incoming(nxt, b.block)
    b.branch(cond_bb)
    b.position_at_end(end_bb)


def _nvvm_sreg(b: ir.IRBuilder, reg: str) -> ir.Value:
    mod = b.module
    name = f"llvm.nvvm.read.ptx.sreg.{reg}"
    fn = mod.globals.get(name) or ir.Function(mod, ir.FunctionType(i32, []), name)
    return b.zext(b.call(fn, []), i64)


def elementwise_kernel(
    module: ir.Module,
    name: str,
    arg_types: Sequence[ir.Type],
    target: Target,
    body: Callable[[ir.IRBuilder, list[ir.Value], ir.Value], None],
) -> ir.Function:
    """A kernel `name(args..., i64 n)` that runs `body(builder, args, i)` for i in [0, n).

    On the CPU it is a plain loop (LLVM vectorises it); on NVPTX each thread takes a
    grid-stride slice of the range.
    """
    fn = ir.Function(module, ir.FunctionType(void, [*arg_types, i64]), name)
    if target == Target.NVPTX:
        fn.calling_convention = "ptx_kernel"
    for a in fn.args[:-1]:
        if isinstance(a.type, ir.PointerType):
            a.add_attribute("noalias")
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    args, n = list(fn.args[:-1]), fn.args[-1]
    if target == Target.CPU:
        start, step = const(i64, 0), const(i64, 1)
    else:
        block, threads = _nvvm_sreg(b, "ctaid.x"), _nvvm_sreg(b, "ntid.x")
        start = b.add(b.mul(block, threads), _nvvm_sreg(b, "tid.x"))
        step = b.mul(_nvvm_sreg(b, "nctaid.x"), threads)
    with for_range(b, start, n, step) as i:
        body(b, args, i)
    b.ret_void()
    return fn


def alloca_entry(b: ir.IRBuilder, t: ir.Type, n: int = 1, name: str = "") -> ir.Value:
    """A stack array in the function's entry block: allocas inside loops would grow the
    stack every iteration and block SROA/mem2reg."""
    entry = b.function.entry_basic_block
    with b.goto_block(entry):
        if entry.instructions:
            b.position_before(entry.instructions[0])
        return b.alloca(t, size=const(i32, n) if n != 1 else None, name=name)


# -- vectors, bytes and intrinsics: the pieces every type's IR is written with ----------------


def vec(t: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(t, n)


def vconst(t: ir.Type, v, n: int) -> ir.Constant:
    """<n x t> with every lane `v`."""
    return ir.Constant(vec(t, n), [v] * n)


def splat(b: ir.IRBuilder, v: ir.Value, n: int) -> ir.Value:
    """<n x t> with every lane the scalar `v`."""
    one = b.insert_element(ir.Constant(vec(v.type, 1), ir.Undefined), v, const(i32, 0))
    return b.shuffle_vector(one, one, ir.Constant(vec(i32, n), [0] * n))


def shuffle(b: ir.IRBuilder, a: ir.Value, c: ir.Value, idx) -> ir.Value:
    idx = list(idx)
    return b.shuffle_vector(a, c, ir.Constant(vec(i32, len(idx)), idx))


def intrinsic(b: ir.IRBuilder, name: str, ret: ir.Type, args: list[ir.Value]) -> ir.Value:
    """A call to the LLVM intrinsic (or any external function) `name`, declared once per
    module."""
    m = b.module
    fn = m.globals.get(name)
    if fn is None:
        fn = ir.Function(m, ir.FunctionType(ret, [a.type for a in args]), name)
    return b.call(fn, args)


def fabs(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    suffix = f"v{v.type.count}f32" if isinstance(v.type, ir.VectorType) else "f32"
    return intrinsic(b, f"llvm.fabs.{suffix}", v.type, [v])


def lane_tree(b: ir.IRBuilder, v: ir.Value, combine) -> ir.Value:
    """Fold the lanes of `v` pairwise (halves) down to one scalar: a fixed order."""
    n = v.type.count
    while n > 1:
        h = n // 2
        v = combine(shuffle(b, v, v, range(h)), shuffle(b, v, v, range(h, n)))
        n = h
    return b.extract_element(v, const(i32, 0))


def lane_max(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """Largest lane; the lanes must not be NaN."""
    return lane_tree(b, v, lambda p, q: b.select(b.fcmp_ordered(">", p, q), p, q))


def lane_min(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    return lane_tree(b, v, lambda p, q: b.select(b.fcmp_ordered("<", p, q), p, q))


def at(b: ir.IRBuilder, base: ir.Value, offset: int | ir.Value, t: ir.Type) -> ir.Value:
    """A `t*` at byte `offset` of the i8* `base`."""
    if isinstance(offset, int):
        offset = const(i32, offset)
    return b.bitcast(b.gep(base, [offset]), ptr(t))


def load_bytes(b: ir.IRBuilder, base: ir.Value, offset: int | ir.Value, n: int) -> ir.Value:
    """The <n x i8> at byte `offset` of `base` (unaligned)."""
    return b.load(at(b, base, offset, vec(i8, n)), align=1)
