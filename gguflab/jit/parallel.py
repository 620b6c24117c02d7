"""Run compiled work on all cores.

- `parallel_rows(fn, n_rows)` splits a range of rows into slices that the team's threads
  take in turn, `fn` (Python, calling compiled kernels that release the GIL) behind a
  ctypes callback: quantizing, prompt processing.
- `run_jobs(jobs, n_jobs)` is for compiled jobs, such as the many short calls of decoding
  (a 135M model makes hundreds a token): a `Team` of worker threads that wait in compiled
  code, spinning on one shared word, take parts of the posted jobs and run them without
  ever touching Python. A hand-off costs about a cache-line transfer, not a sleep and a
  wake-up. A worker that finds nothing to do for a while goes to sleep on an Event;
  whoever posts a job runs every part nobody else took, so a sleeping (or busy) worker
  only costs speed, never a hang.

A job is `fn(i64* args, i64 part, i64 n_parts)` (a compiled function's address) with up to
`JOB_ARGS` int64 arguments and a number of parts; `pack_job` writes one into a job table.

`Team.run_program(phases, n)` runs a sequence of job tables, each finished before the next
starts (a barrier between), without coming back to Python: a decoding step's ~300
products, norms and rotations in one call, as ggml runs a graph. A phase of serial steps is
one job of one part, `steps_part()`, that calls each step's function in turn (see
`STEP_WORDS`).
"""

from __future__ import annotations

import ctypes
import os
import struct
import threading
from collections.abc import Callable
from functools import cache

import numpy as np
from llvmlite import ir

from .builders import const, for_range, i64, ptr, void
from .core import compile_kernels, host_cpu

JOB_ARGS = 14
JOB_WORDS = 2 + JOB_ARGS  # fn, n_parts, args...
MAX_JOBS = 16
SPIN_LIMIT = 1 << 17  # pause loops an idle worker spins before sleeping (a few ms)
# a sleeping worker also looks for work on its own, after NAP_MIN seconds, then twice as
# long each time it finds none (up to NAP_MAX), spinning NAP_SPIN pauses each look: a
# worker that fell asleep while the caller was busy in Python (a garbage collection) and
# missed the wake-up before a long compiled call (a prompt's whole batch) joins in soon
NAP_MIN, NAP_MAX, NAP_SPIN = 0.001, 0.064, 1 << 10
PART_BITS = 20  # the ticket word: seq (24 bits) | total parts (20) | next part (20)

# the control block, in int64 words; fields that different threads write sit on separate
# cache lines
TICKET, DONE, JOBS, N_JOBS, N_WORKERS, YIELD, QUIT, SLEEP = 0, 8, 16, 17, 18, 19, 24, 32
YIELD_EVERY = 64
# a serial step: a function's address and 8 int64 arguments. The function takes at most 8
# arguments, all integers or pointers, and is called with all 8: the C calling conventions
# of the targets we compile for (x86-64 SysV and Windows, AArch64) pass the first of those
# in registers and leave any stack ones to the caller, so the ones it does not take are
# ignored.
STEP_ARGS = 8
STEP_WORDS = 1 + STEP_ARGS
_JOB = struct.Struct(f"<{JOB_WORDS}q")


@cache
def _cores() -> int:
    """The cores this process may run on (asked once: decoding asks hundreds of times a
    token)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


_threads: int | None = None  # set_threads(): `-t N` for everything this process runs


def set_threads(n: int | None) -> None:
    """Threads for every kernel call that does not name its own count (None: all cores)."""
    global _threads
    if n is not None and n < 1:
        raise ValueError("threads must be at least 1")
    _threads = n


def default_threads() -> int:
    return _threads or _cores()


SLICES_PER_THREAD = 4  # (parallel_rows: slices are taken first come, first served)


def row_parts(n_rows: int, threads: int, min_rows: int = 1, align: int = 1) -> int:
    """Parts n_rows rows are cut into on `threads` threads: up to SLICES_PER_THREAD a thread,
    each of at least `min_rows` rows (and `align`); part k of n runs rows [bound(k),
    bound(k + 1)) with bound(k) = n_rows * k // n // align * align and bound(n) = n_rows
    (`emit_part_rows` is the same cut in IR, for a compiled job's parts)."""
    if threads == 1:
        return 1
    return max(1, min(threads * SLICES_PER_THREAD, n_rows // max(1, min_rows, align)))


def emit_part_rows(b: ir.IRBuilder, n_rows: ir.Value, align: ir.Value, part: ir.Value,
                   n_parts: ir.Value) -> tuple[ir.Value, ir.Value]:
    """IR: rows [r0, r1) of part `part` of `n_parts` (i64 values), cut as `row_parts` says."""

    def bound(p):
        r = b.mul(b.sdiv(b.sdiv(b.mul(n_rows, p), n_parts), align), align)
        return b.select(b.icmp_signed("==", p, n_parts), n_rows, r)

    return bound(part), bound(b.add(part, const(i64, 1)))


_SLICE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64)


def parallel_rows(
    fn: Callable[[int, int], object], n_rows: int, threads: int | None = None, min_rows: int = 1,
    align: int = 1
) -> None:
    """Call `fn(start, stop)` over [0, n_rows) in contiguous slices of at least `min_rows`
    rows (cut at multiples of `align`), on at most `threads` threads, the calling one
    included. Each thread takes the next slice as it finishes one, up to SLICES_PER_THREAD
    slices a thread: a thread that is slowed (a busy core, a virtual CPU descheduled) does
    fewer, rather than everyone waiting for its fixed share.

    The slices are one team job (see `Team`) whose function is `fn` behind a ctypes
    callback, for kernels called a slice at a time from Python (the quantizer's rows, the
    general route's norms and element-wise steps, the host build of the GPU kernels).
    Compiled kernels post their parts as team jobs themselves
    (`run_jobs`), without coming back to Python for each slice."""
    threads = threads or default_threads()
    parts = row_parts(n_rows, threads, min_rows, align)
    if parts == 1:
        fn(0, n_rows)
        return
    bounds = [n_rows * k // parts // align * align for k in range(parts)] + [n_rows]
    errors: list[BaseException] = []

    def part(_args: int, k: int, _n: int) -> None:
        if errors or bounds[k] >= bounds[k + 1]:
            return
        try:
            fn(bounds[k], bounds[k + 1])
        except BaseException as e:  # (a callback cannot raise: the caller re-raises it)
            errors.append(e)

    slice_fn = _SLICE(part)
    table = JobTable()  # its own: a slice may itself call parallel_rows
    table.add(ctypes.cast(slice_fn, ctypes.c_void_p).value, parts)
    table.run(threads)
    if errors:
        raise errors[0]


# -- the team's compiled side ----------------------------------------------------------------


def _pause(b: ir.IRBuilder) -> None:
    """The spin-wait hint: tells the core (and its SMT sibling) that we are waiting."""
    triple = host_cpu().triple
    if triple.startswith(("x86_64", "i686", "i386")):
        name, args = "llvm.x86.sse2.pause", []
    elif triple.startswith("aarch64"):
        name, args = "llvm.aarch64.hint", [ir.Constant(ir.IntType(32), 1)]  # yield
    else:
        return
    m = b.module
    f = m.globals.get(name) or ir.Function(m, ir.FunctionType(void, [a.type for a in args]),
                                           name)
    b.call(f, args)


def _word(b: ir.IRBuilder, ctrl: ir.Value, i: int) -> ir.Value:
    return b.gep(ctrl, [const(i64, i)])


def _backoff(b: ir.IRBuilder, ctrl: ir.Value, count: ir.Value) -> None:
    """One round of a spin wait: a pause, and every YIELD_EVERY rounds the OS's yield (the
    function at ctrl[YIELD], if any): on a machine with more threads than cores, the thread
    we wait for may be the one waiting for our core."""
    _pause(b)
    fn = b.load(_word(b, ctrl, YIELD))
    due = b.icmp_signed("==", b.and_(count, const(i64, YIELD_EVERY - 1)),
                        const(i64, YIELD_EVERY - 1))
    with b.if_then(b.and_(due, b.icmp_signed("!=", fn, const(i64, 0)))):
        b.call(b.inttoptr(fn, ptr(ir.FunctionType(ir.IntType(32), []))), [])


def _build_team_module() -> ir.Module:
    m = ir.Module(name="team")
    c = lambda v: const(i64, v)  # noqa: E731
    mask = (1 << PART_BITS) - 1
    job_fn = ir.FunctionType(void, [ptr(i64), i64, i64])

    # take(ctrl) -> the next unclaimed part of the posted jobs, or -1
    take = ir.Function(m, ir.FunctionType(i64, [ptr(i64)]), "take")
    take.linkage = "internal"
    b = ir.IRBuilder(take.append_basic_block("entry"))
    loop, claim, none = (take.append_basic_block(n) for n in ("loop", "claim", "none"))
    b.branch(loop)
    b.position_at_end(loop)
    t = b.load_atomic(_word(b, take.args[0], TICKET), "acquire", 8)
    nxt, total = b.and_(t, c(mask)), b.and_(b.lshr(t, c(PART_BITS)), c(mask))
    b.cbranch(b.icmp_signed("<", nxt, total), claim, none)
    b.position_at_end(claim)
    ok = b.extract_value(b.cmpxchg(_word(b, take.args[0], TICKET), t, b.add(t, c(1)),
                                   "seq_cst", "seq_cst"), 1)
    won = take.append_basic_block("won")
    b.cbranch(ok, won, loop)
    b.position_at_end(won)
    b.ret(nxt)
    b.position_at_end(none)
    b.ret(c(-1))

    # run(ctrl, part): find the job the global part number falls in, run it, count it done
    run = ir.Function(m, ir.FunctionType(void, [ptr(i64), i64]), "run")
    run.linkage = "internal"
    ctrl, g = run.args
    b = ir.IRBuilder(run.append_basic_block("entry"))
    jobs = b.inttoptr(b.load(_word(b, ctrl, JOBS)), ptr(i64))
    n_jobs = b.load(_word(b, ctrl, N_JOBS))
    head = run.append_basic_block("head")
    body, call, done = (run.append_basic_block(n) for n in ("body", "call", "done"))
    entry = b.block
    b.branch(head)
    b.position_at_end(head)
    j = b.phi(i64)
    rest = b.phi(i64)
    j.add_incoming(c(0), entry)
    rest.add_incoming(g, entry)
    b.cbranch(b.icmp_signed("<", j, n_jobs), body, done)
    b.position_at_end(body)
    rec = b.gep(jobs, [b.mul(j, c(JOB_WORDS))])
    n_parts = b.load(b.gep(rec, [c(1)]))
    nxt_block = run.append_basic_block("next")
    b.cbranch(b.icmp_signed("<", rest, n_parts), call, nxt_block)
    b.position_at_end(nxt_block)
    j.add_incoming(b.add(j, c(1)), nxt_block)
    rest.add_incoming(b.sub(rest, n_parts), nxt_block)
    b.branch(head)
    b.position_at_end(call)
    fn = b.inttoptr(b.load(rec), ptr(job_fn))
    b.call(fn, [b.gep(rec, [c(2)]), rest, n_parts])
    b.branch(done)
    b.position_at_end(done)
    b.atomic_rmw("add", _word(b, ctrl, DONE), c(1), "release")
    b.ret_void()

    # team_run(ctrl, jobs, n_jobs) -> sleeping workers: post, help, wait for every part
    fn = ir.Function(m, ir.FunctionType(i64, [ptr(i64), ptr(i64), i64]), "team_run")
    ctrl, jobs, n_jobs = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    b.store(b.ptrtoint(jobs, i64), _word(b, ctrl, JOBS))
    b.store(n_jobs, _word(b, ctrl, N_JOBS))
    acc = b.alloca(i64)
    b.store(c(0), acc)
    with for_range(b, c(0), n_jobs) as j:
        p = b.load(b.gep(jobs, [b.add(b.mul(j, c(JOB_WORDS)), c(1))]))
        b.store(b.add(b.load(acc), p), acc)
    total = b.load(acc)
    b.store_atomic(c(0), _word(b, ctrl, DONE), "release", 8)
    old = b.load_atomic(_word(b, ctrl, TICKET), "acquire", 8)
    seq = b.and_(b.add(b.lshr(old, c(2 * PART_BITS)), c(1)), c((1 << 24) - 1))
    ticket = b.or_(b.shl(seq, c(2 * PART_BITS)), b.shl(total, c(PART_BITS)))
    b.store_atomic(ticket, _word(b, ctrl, TICKET), "seq_cst", 8)
    help_, work, wait = (fn.append_basic_block(n) for n in ("help", "work", "wait"))
    b.branch(help_)
    b.position_at_end(help_)
    part = b.call(take, [ctrl])
    b.cbranch(b.icmp_signed(">=", part, c(0)), work, wait)
    b.position_at_end(work)
    b.call(run, [ctrl, part])
    b.branch(help_)
    b.position_at_end(wait)
    spin, finished = fn.append_basic_block("spin"), fn.append_basic_block("finished")
    rounds = b.phi(i64)
    rounds.add_incoming(c(0), help_)
    b.cbranch(b.icmp_signed("<", b.load_atomic(_word(b, ctrl, DONE), "acquire", 8), total),
              spin, finished)
    b.position_at_end(spin)
    _backoff(b, ctrl, rounds)
    rounds.add_incoming(b.add(rounds, c(1)), b.block)
    b.branch(wait)
    b.position_at_end(finished)
    b.store(c(0), acc)
    with for_range(b, c(0), b.load(_word(b, ctrl, N_WORKERS))) as w:
        flag = b.load_atomic(b.gep(ctrl, [b.add(c(SLEEP), b.mul(w, c(8)))]), "monotonic", 8)
        b.store(b.add(b.load(acc), flag), acc)
    b.ret(b.load(acc))

    # team_work(ctrl, worker, spin_limit) -> 1 to quit, 0 after spin_limit idle pauses
    fn = ir.Function(m, ir.FunctionType(i64, [ptr(i64), i64, i64]), "team_work")
    ctrl, w, limit = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    entry = b.block
    loop, got, idle, sleep, quit_ = (fn.append_basic_block(n)
                                     for n in ("loop", "got", "idle", "sleep", "quit"))
    b.branch(loop)
    b.position_at_end(loop)
    spins = b.phi(i64)
    spins.add_incoming(c(0), entry)
    check = fn.append_basic_block("check")
    stop = b.load_atomic(_word(b, ctrl, QUIT), "monotonic", 8)
    b.cbranch(b.icmp_signed("!=", stop, c(0)), quit_, check)
    b.position_at_end(check)
    part = b.call(take, [ctrl])
    b.cbranch(b.icmp_signed(">=", part, c(0)), got, idle)
    b.position_at_end(got)
    b.call(run, [ctrl, part])
    spins.add_incoming(c(0), got)
    b.branch(loop)
    b.position_at_end(idle)
    _backoff(b, ctrl, spins)
    more = b.add(spins, c(1))
    spins.add_incoming(more, b.block)
    b.cbranch(b.icmp_signed("<", more, limit), loop, sleep)
    b.position_at_end(sleep)
    b.store_atomic(c(1), b.gep(ctrl, [b.add(c(SLEEP), b.mul(w, c(8)))]), "seq_cst", 8)
    b.ret(c(0))
    b.position_at_end(quit_)
    b.ret(c(1))

    # team_program(ctrl, phases, n_phases): team_run over each (jobs, n_jobs) pair in turn
    team_run = m.globals["team_run"]
    fn = ir.Function(m, ir.FunctionType(i64, [ptr(i64), ptr(i64), i64]), "team_program")
    ctrl, phases, n_phases = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    acc = b.alloca(i64)
    b.store(c(0), acc)
    with for_range(b, c(0), n_phases) as k:
        jobs = b.inttoptr(b.load(b.gep(phases, [b.mul(k, c(2))])), ptr(i64))
        n = b.load(b.gep(phases, [b.add(b.mul(k, c(2)), c(1))]))
        b.store(b.or_(b.load(acc), b.call(team_run, [ctrl, jobs, n])), acc)
    b.ret(b.load(acc))

    # steps(args, part, n_parts): the steps at args[0] (a count, then STEP_WORDS each)
    fn = ir.Function(m, job_fn, "steps")
    argv = fn.args[0]
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    steps = b.inttoptr(b.load(argv), ptr(i64))
    step_fn = ir.FunctionType(void, [i64] * STEP_ARGS)
    with for_range(b, c(0), b.load(steps)) as k:
        rec = b.gep(steps, [b.add(b.mul(k, c(STEP_WORDS)), c(1))])
        target = b.inttoptr(b.load(rec), ptr(step_fn))
        b.call(target, [b.load(b.gep(rec, [c(1 + a)])) for a in range(STEP_ARGS)])
    b.ret_void()
    return m


_I64 = ctypes.c_int64


@cache
def _team_kernels():
    run = ctypes.CFUNCTYPE(_I64, ctypes.c_void_p, ctypes.c_void_p, _I64)
    work = ctypes.CFUNCTYPE(_I64, ctypes.c_void_p, _I64, _I64)
    step = ctypes.CFUNCTYPE(None, ctypes.c_void_p, _I64, _I64)
    mod = compile_kernels(_build_team_module, {"team_run": run, "team_work": work,
                                               "team_program": run, "steps": step},
                          key="parallel.team")
    return mod["team_run"], mod["team_work"], mod["team_program"], mod["steps"]


def steps_part() -> int:
    """The address of the job that runs a list of serial steps (args[0]: the list's
    address; the list: the number of steps, then each step's function address and its
    STEP_ARGS arguments)."""
    return ctypes.cast(_team_kernels()[3], ctypes.c_void_p).value


@cache
def _sched_yield() -> int:
    """The address of the C library's sched_yield, or 0 where there is none."""
    try:
        return ctypes.cast(ctypes.CDLL(None).sched_yield, ctypes.c_void_p).value or 0
    except (AttributeError, OSError, TypeError):
        return 0


class Team:
    """`n_threads - 1` worker threads plus whoever calls `run`."""

    def __init__(self, n_threads: int):
        self._run, self._work, self._program = _team_kernels()[:3]
        self.n_workers = n_threads - 1
        self.ctrl = np.zeros(SLEEP + 8 * max(1, self.n_workers), np.int64)
        self.ctrl[N_WORKERS] = self.n_workers
        self.ctrl[YIELD] = _sched_yield()
        self._addr = self.ctrl.ctypes.data
        self._lock = threading.Lock()
        self._wake = [threading.Event() for _ in range(self.n_workers)]
        for w in range(self.n_workers):
            threading.Thread(target=self._worker, args=(w,), daemon=True,
                             name=f"gguflab-team-{w}").start()

    def _worker(self, w: int) -> None:
        limit, nap = SPIN_LIMIT, NAP_MIN
        while self._work(self._addr, w, limit) == 0:
            if self._wake[w].wait(nap):
                self._wake[w].clear()
                limit, nap = SPIN_LIMIT, NAP_MIN
            else:
                limit, nap = NAP_SPIN, min(2 * nap, NAP_MAX)

    def run(self, jobs: int, n_jobs: int) -> None:
        """Run every part of the `n_jobs` jobs at address `jobs`; returns when all are done.
        A second thread calling meanwhile runs its jobs alone rather than wait."""
        self._call(self._run, jobs, n_jobs)

    def run_program(self, phases: int, n_phases: int) -> None:
        """Run the phases at address `phases` (pairs of a job table's address and its
        number of jobs) one after the other, each to its end before the next begins."""
        self._call(self._program, phases, n_phases)

    def _call(self, fn, a: int, n: int) -> None:
        if not self._lock.acquire(blocking=False):
            _solo()._call(fn, a, n)
            return
        try:
            # workers asleep are woken before the call, not only after: one call may be a
            # whole program (a prompt's batch), which they would otherwise miss entirely
            self._wake_sleepers()
            if fn(self._addr, a, n):
                self._wake_sleepers()
        finally:
            self._lock.release()

    def _wake_sleepers(self) -> None:
        for w in range(self.n_workers):
            if self.ctrl[SLEEP + 8 * w]:
                self.ctrl[SLEEP + 8 * w] = 0
                self._wake[w].set()


_teams: dict = {}
_tls = threading.local()


def _solo() -> Team:
    t = getattr(_tls, "solo", None)
    if t is None:
        t = _tls.solo = Team(1)
    return t


def team(threads: int | None = None) -> Team:
    """The process's team for `threads` threads (one per process: threads do not survive
    a fork)."""
    n = threads or default_threads()
    if n == 1:
        return _solo()
    key = (os.getpid(), n)
    t = _teams.get(key)
    if t is None:
        t = _teams[key] = Team(n)
    return t


class JobTable:
    """A per-thread table of up to MAX_JOBS jobs, filled with `add` then run with `run`."""

    def __init__(self):
        self.buf = ctypes.create_string_buffer(MAX_JOBS * JOB_WORDS * 8)
        self.addr = ctypes.addressof(self.buf)
        self.n = 0

    def add(self, fn: int, n_parts: int, *args: int) -> None:
        if self.n == MAX_JOBS:
            raise RuntimeError("job table full")
        _JOB.pack_into(self.buf, self.n * JOB_WORDS * 8, fn, n_parts, *args,
                       *(0,) * (JOB_ARGS - len(args)))
        self.n += 1

    def run(self, threads: int | None = None) -> None:
        n, self.n = self.n, 0
        if n:
            team(threads).run(self.addr, n)


def run_jobs(records: list[list[int]], threads: int | None = None) -> None:
    """Job records (fn, n_parts, args...) run on the team as one phase, in a table of their
    own (the caller may itself be a job's part, using this thread's table)."""
    table = JobTable()
    for rec in records:
        table.add(*rec)
    table.run(threads)


def job_table() -> JobTable:
    """This thread's job table."""
    t = getattr(_tls, "jobs", None)
    if t is None:
        t = _tls.jobs = JobTable()
    return t
