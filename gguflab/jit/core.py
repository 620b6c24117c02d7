"""Compile llvmlite IR for the host CPU (or emit PTX), with an on-disk object cache.

`compile_kernels(module, {name: signature})` returns ctypes callables. ctypes releases
the GIL for the duration of each call, so a thread pool runs kernels in parallel.

GGUFLAB_DEBUG=1 prints compile and cache timings to stderr; GGUFLAB_DEBUG=2 also
prints the optimised IR (and the PTX for GPU modules).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import llvmlite
import llvmlite.binding as llvm
from llvmlite import ir

CACHE_VERSION = "2"  # bump when the generated code changes meaning without its IR changing
_lock = threading.Lock()


def debug_level() -> int:
    try:
        return int(os.environ.get("GGUFLAB_DEBUG", "0") or 0)
    except ValueError:
        return 1


def _log(msg: str) -> None:
    if debug_level() >= 1:
        print(f"[gguflab.jit] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> str:
    """Where compiled objects live: $GGUFLAB_CACHE_DIR, else ~/.cache/gguflab/jit."""
    base = os.environ.get("GGUFLAB_CACHE_DIR")
    if not base:
        base = os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gguflab"
        )
    return os.path.join(base, "jit")


@cache
def _init() -> None:
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()


@dataclass(frozen=True)
class HostCPU:
    """A JIT target: LLVM's CPU name and feature string (what the IR generators ask)."""

    triple: str
    name: str
    features: str

    def has(self, feature: str) -> bool:
        return f"+{feature}" in self.features.split(",")


# The x86-64 micro-architecture levels, with the features our IR generators look at. The
# kernels compute the same bits on each (see DESIGN.md: float reductions in a fixed order,
# explicit FMAs); a level only changes which instructions carry them out.
_V2 = "+cx16,+popcnt,+sahf,+sse3,+sse4.1,+sse4.2,+ssse3"
_V3 = _V2 + ",+avx,+avx2,+bmi,+bmi2,+f16c,+fma,+lzcnt,+movbe,+xsave"
_V4 = _V3 + ",+avx512f,+avx512bw,+avx512cd,+avx512dq,+avx512vl"
X86_LEVELS = {"x86-64-v2": _V2, "x86-64-v3": _V3, "x86-64-v4": _V4}
# LLVM CPU names people try, with the level whose features they have (scheduling stays the
# named CPU's)
_NAMED = {**dict.fromkeys(("haswell", "broadwell", "skylake", "alderlake", "znver1", "znver2",
                           "znver3"), _V3),
          **dict.fromkeys(("skylake-avx512", "cascadelake", "icelake-server", "tigerlake",
                           "sapphirerapids", "znver4", "znver5"), _V4)}


def cpu_target(name: str | None = None) -> HostCPU:
    """The target called `name`: "native" (or None) is this machine's CPU; an x86-64 level
    (`x86-64-v3`, `x86-64-v4`) is that level's feature set; any other LLVM CPU name brings
    LLVM's own features for it (the generators then see none)."""
    _init()
    triple = llvm.get_process_triple()
    if not name or name == "native":
        try:
            features = llvm.get_host_cpu_features().flatten()
        except RuntimeError:  # some platforms cannot report features
            features = ""
        return HostCPU(triple, llvm.get_host_cpu_name(), features)
    return HostCPU(triple, name, X86_LEVELS.get(name) or _NAMED.get(name, ""))


def _missing_features(cpu: HostCPU) -> list[str]:
    """Features `cpu` asks for that this machine lacks (running its code would trap)."""
    have = set(cpu_target("native").features.split(","))
    return [f[1:] for f in cpu.features.split(",") if f.startswith("+") and f not in have]


@cache
def host_cpu() -> HostCPU:
    """What kernels are compiled for: $GGUFLAB_CPU (`native`, the default, or e.g.
    `x86-64-v3`), refused in one line if this machine cannot run it."""
    name = os.environ.get("GGUFLAB_CPU", "native")
    cpu = cpu_target(name)
    missing = _missing_features(cpu) if name in X86_LEVELS or name in _NAMED else []
    if missing:
        from ..errors import UserError

        raise UserError(f"GGUFLAB_CPU={name}: this CPU lacks {', '.join(missing[:4])}")
    return cpu


@cache
def _target_machine(cpu: HostCPU) -> llvm.TargetMachine:
    target = llvm.Target.from_triple(cpu.triple)
    # jitdefault code model + PIC-free object: MCJIT relocates it in-process
    return target.create_target_machine(
        cpu=cpu.name, features=cpu.features, opt=3, codemodel="jitdefault"
    )


def _host_tm() -> llvm.TargetMachine:
    return _target_machine(host_cpu())


def optimise_for() -> HostCPU | None:
    """$GGUFLAB_OPTIMISE_FOR (a check, not a setting): run LLVM's optimisation pipeline as
    for that CPU, then emit code for `host_cpu()`. The IR the optimiser leaves for an
    AVX-512 CPU then runs on an AVX2 one, so a test there sees whether the optimiser
    changed the results (it must not: the kernels fix their float order)."""
    name = os.environ.get("GGUFLAB_OPTIMISE_FOR")
    return cpu_target(name) if name else None


def _optimise(mod: llvm.ModuleRef, tm: llvm.TargetMachine, level: int = 3) -> None:
    pto = llvm.create_pipeline_tuning_options(speed_level=level)
    pto.loop_vectorization = True
    pto.slp_vectorization = True
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(mod, pb)


def _parse(module: ir.Module | str) -> llvm.ModuleRef:
    text = str(module)
    mod = llvm.parse_assembly(text)
    mod.verify()
    return mod


class CompiledModule:
    """Compiled object code loaded into this process; keeps its engine alive."""

    def __init__(self, engine: llvm.ExecutionEngine, signatures: dict[str, ctypes._CFuncPtr]):
        self._engine = engine
        self.functions = {}
        for name, sig in signatures.items():
            addr = engine.get_function_address(name)
            if not addr:
                raise KeyError(f"kernel {name!r} not found in compiled module")
            fn = sig(addr)
            fn._module = self  # the callable keeps the code alive
            self.functions[name] = fn

    def __getitem__(self, name: str):
        return self.functions[name]


_engines: dict[str, CompiledModule] = {}


@cache
def source_hash() -> str:
    """A hash of gguflab's own Python source: what the IR builders are."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            h.update(os.path.relpath(path, root).encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read() + b"\0")
    return h.hexdigest()


def compile_kernels(module: ir.Module | str | Callable[[], ir.Module],
                    signatures: dict[str, type], *, key: str | None = None
                    ) -> CompiledModule:
    """Compile IR for the host CPU and return its functions as ctypes callables.

    `signatures` maps each function name to a `ctypes.CFUNCTYPE(...)` type. Object code
    is cached on disk, keyed by the IR, the CPU and llvmlite's LLVM version. `module` may
    also be a function that builds the IR, with `key` naming what it builds (the builder
    and its arguments): the object code is then looked up by that name, the CPU and a hash
    of gguflab's source first, so that a cached module costs no IR building and printing
    (about 0.3 s for a weight type's kernels).
    """
    _init()
    cpu = host_cpu()
    mid = optimise_for()
    if callable(module):
        if key is None:
            raise ValueError("a module builder needs a key naming what it builds")
        skey = "s" + hashlib.sha256("\0".join(
            [CACHE_VERSION, llvmlite.__version__, cpu.triple, cpu.name, cpu.features,
             f"{mid.name}:{mid.features}" if mid else "", source_hash(), key,
             *sorted(signatures)]).encode()).hexdigest()[:31]
        with _lock:
            if skey in _engines:
                return _engines[skey]
            path = os.path.join(cache_dir(), f"{skey}.o")
            try:
                with open(path, "rb") as f:
                    obj = f.read()
            except OSError:
                obj = None
            if obj is not None:
                t0 = time.perf_counter()
                _engines[skey] = _load(obj, signatures)
                _log(f"{key}: cache hit by source in {1e3 * (time.perf_counter() - t0):.1f} "
                     f"ms ({len(obj)} bytes, {cpu.name})")
                return _engines[skey]
        compiled = compile_kernels(module(), signatures)
        with _lock:
            _engines[skey] = compiled
            store_cached(os.path.join(cache_dir(), f"{skey}.o"), compiled.obj)
        return compiled
    tm = _host_tm()
    text = str(module) if isinstance(module, ir.Module) else module
    if isinstance(module, ir.Module) and module.triple in ("", "unknown-unknown-unknown"):
        text = text.replace(
            'target triple = "unknown-unknown-unknown"', f'target triple = "{cpu.triple}"', 1
        )
    key = hashlib.sha256(
        "\0".join(
            [CACHE_VERSION, llvmlite.__version__, cpu.triple, cpu.name, cpu.features,
             f"{mid.name}:{mid.features}" if mid else "", text]
        ).encode()
    ).hexdigest()[:32]
    with _lock:
        if key in _engines:
            return _engines[key]
        t0 = time.perf_counter()
        path = os.path.join(cache_dir(), f"{key}.o")
        obj = None
        try:
            with open(path, "rb") as f:
                obj = f.read()
            how = "cache hit"
        except OSError:
            pass
        if obj is None:
            mod = _parse(text)
            mod.triple = cpu.triple
            mod.data_layout = str(tm.target_data)
            _optimise(mod, _target_machine(mid) if mid else tm)
            if debug_level() >= 2:
                print(str(mod), file=sys.stderr)
            obj = tm.emit_object(mod)
            store_cached(path, obj)
            how = "compiled"
        compiled = _load(obj, signatures)
        _engines[key] = compiled
        _log(
            f"{'/'.join(signatures)}: {how} in {1e3 * (time.perf_counter() - t0):.1f} ms "
            f"({len(obj)} bytes, {cpu.name})"
        )
        return compiled


def _load(obj: bytes, signatures: dict[str, type]) -> CompiledModule:
    """Object code for the host CPU loaded into this process."""
    engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), _host_tm())
    engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
    engine.finalize_object()
    compiled = CompiledModule(engine, signatures)
    compiled.obj = obj
    if os.environ.get("GGUFLAB_PERF_MAP"):
        _perf_map(engine, obj)
    return compiled


def _perf_map(engine: llvm.ExecutionEngine, obj: bytes) -> None:
    """Name the loaded functions in /tmp/perf-PID.map, where `perf report` looks for JIT
    symbols (GGUFLAB_PERF_MAP=1; needs binutils' nm)."""
    import subprocess
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".o") as f:
        f.write(obj)
        f.flush()
        out = subprocess.run(["nm", "-S", "--defined-only", f.name], capture_output=True,
                             text=True).stdout
    with open(f"/tmp/perf-{os.getpid()}.map", "a") as m:
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 4 and parts[2] in "tT":
                addr = engine.get_function_address(parts[3])
                if addr:
                    m.write(f"{addr:x} {int(parts[1], 16):x} {parts[3]}\n")


def store_cached(path: str, data: bytes) -> None:
    """Best-effort atomic write into the cache; a read-only home just means no cache."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        _log(f"cannot cache compiled code at {path}: {e}")


# -- GPU ---------------------------------------------------------------------------------

NVPTX_TRIPLE = "nvptx64-nvidia-cuda"
PTX_VERSION = "+ptx78"  # PTX ISA 7.8: CUDA 11.8+ drivers, sm_80 and sm_90


def emit_ptx(module: ir.Module | str, sm: str = "sm_80") -> str:
    """Optimise IR for `nvptx64-nvidia-cuda` and return PTX text for GPU `sm`."""
    _init()
    t0 = time.perf_counter()
    text = str(module)
    mod = _parse(text)
    mod.triple = NVPTX_TRIPLE
    target = llvm.Target.from_triple(NVPTX_TRIPLE)
    tm = target.create_target_machine(cpu=sm, features=PTX_VERSION, opt=3)
    mod.data_layout = str(tm.target_data)
    _optimise(mod, tm)
    ptx = tm.emit_assembly(mod)
    _log(f"PTX for {sm}: {1e3 * (time.perf_counter() - t0):.1f} ms, {len(ptx)} chars")
    if debug_level() >= 2:
        print(ptx, file=sys.stderr)
    return ptx
