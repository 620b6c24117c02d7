"""Where the GPU backend's kernels run: a `Device` hands out buffers as addresses, copies
arrays in and out, and launches kernels by name over a count of items.

- `HostDevice`: numpy buffers and the host-CPU build of the very same kernel bodies. It
  exercises the whole offload path (uploads, device KV cache, kernel order) without a GPU,
  and is what the tests run.
- `CudaDevice`: the CUDA driver API through `cuda-bindings` (imported only when one is
  made). PTX comes from `emit_ptx` and the driver JIT-compiles it, so no CUDA toolkit is
  needed at run time.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading
import time
from collections import defaultdict
from typing import Protocol

import numpy as np

from ...errors import UserError
from ...gguf import GGMLType
from ...jit import Target, cache_dir, compile_kernels, emit_ptx, parallel_rows
from ...jit.core import store_cached
from . import kernels as K

BLOCK_THREADS = 128  # threads per CUDA block: 4 warps
MAX_GRID = 1 << 16  # blocks per launch; the kernels' grid-stride loops cover any item count
# items of a multi-lane kernel (rows, heads) per host thread below which one thread is better
HOST_MIN_ITEMS = 64


def _kernel_index() -> dict[str, tuple[K.KernelSpec, str]]:
    """Every kernel by name: its spec and the module that holds it ("common" or a type)."""
    out = {name: (spec, "common") for name, spec in K.COMMON.items()}
    for t in K.WEIGHT_TYPES:
        for spec in K.weight_specs(t):
            out[spec.name] = (spec, t.name)
    return out


KERNELS = _kernel_index()


def build_module(key: str, target: Target):
    """The IR module `key` ("common" or a weight type name) for `target`."""
    if key == "common":
        return K.build_common_module(target)
    return K.build_weight_module(GGMLType[key], target)


class Device(Protocol):
    """What the offload path needs from a device. Pointers are plain integers."""

    name: str

    def alloc(self, nbytes: int) -> int: ...
    def upload(self, arr: np.ndarray) -> int: ...
    def write(self, dst: int, arr: np.ndarray) -> None: ...
    def read(self, src: int, out: np.ndarray) -> np.ndarray: ...
    def launch(self, kernel: str, n_items: int, *args: int | float) -> None: ...
    def synchronize(self) -> None: ...
    # recording: launches between begin and end are kept (not run) as a graph to replay
    def begin_capture(self) -> None: ...
    def end_capture(self) -> object: ...
    def replay(self, graph: object) -> None: ...
    def release(self, graph: object) -> None: ...
    def mem_info(self) -> tuple[int, int]: ...
    def close(self) -> None: ...


class HostDevice:
    """A device in host memory that runs the host-compiled kernels (on all cores)."""

    name = "host"

    def __init__(self, threads: int | None = None):
        self.threads = threads
        self._buffers: dict[int, np.ndarray] = {}
        self._modules: dict[str, object] = {}
        self._fns: dict[str, object] = {}
        self.allocated = 0
        self.profile = False  # when set, `timings` adds up the seconds of each kernel
        self.timings: dict[str, float] = defaultdict(float)
        self._recording: list | None = None

    def alloc(self, nbytes: int) -> int:
        buf = np.zeros(max(1, nbytes) + 64, np.uint8)
        addr = buf.ctypes.data
        pad = -addr % 64  # 64-byte aligned, as cuMemAlloc's 256 would be
        self._buffers[addr + pad] = buf
        self.allocated += nbytes
        return addr + pad

    def upload(self, arr: np.ndarray) -> int:
        p = self.alloc(arr.nbytes)
        self.write(p, arr)
        return p

    def write(self, dst: int, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr)
        ctypes.memmove(dst, arr.ctypes.data, arr.nbytes)

    def read(self, src: int, out: np.ndarray) -> np.ndarray:
        ctypes.memmove(out.ctypes.data, src, out.nbytes)
        return out

    def kernel(self, name: str):
        fn = self._fns.get(name)
        if fn is None:
            spec, key = KERNELS[name]
            if key not in self._modules:
                sigs = {s.name: s.host_signature() for s, k in KERNELS.values() if k == key}
                self._modules[key] = compile_kernels(build_module(key, Target.CPU), sigs)
            fn = self._fns[name] = self._modules[key][name]
        return fn

    def launch(self, kernel: str, n_items: int, *args: int | float) -> None:
        fn = self.kernel(kernel)
        if n_items <= 0:
            return
        if self._recording is not None:  # as a CUDA graph does: the arguments as they are now
            self._recording.append((kernel, n_items, args))
            return
        t0 = time.perf_counter() if self.profile else 0.0
        if KERNELS[kernel][0].lanes == 1 or n_items < 2 * HOST_MIN_ITEMS:
            fn(*args, 0, n_items)
        else:
            parallel_rows(lambda a, b: fn(*args, a, b), n_items, self.threads, HOST_MIN_ITEMS)
        if self.profile:
            self.timings[kernel] += time.perf_counter() - t0

    def synchronize(self) -> None:
        """Launches run to completion on the host: nothing to wait for."""

    def begin_capture(self) -> None:
        if self._recording is not None:
            raise UserError("the host device is already recording")
        self._recording = []

    def end_capture(self) -> tuple:
        graph, self._recording = tuple(self._recording or ()), None
        return graph

    def replay(self, graph: tuple) -> None:
        for kernel, n_items, args in graph:
            self.launch(kernel, n_items, *args)

    def release(self, graph: tuple) -> None:
        """A recording is plain data here."""

    def mem_info(self) -> tuple[int, int]:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return max(0, total - self.allocated), total

    def close(self) -> None:
        self._buffers.clear()
        self.allocated = 0


# -- CUDA ----------------------------------------------------------------------------------


def import_driver():
    """The `cuda-bindings` driver module; ImportError when it is not installed."""
    from cuda.bindings import driver  # noqa: PLC0415  (optional dependency, imported lazily)

    return driver


class CudaError(UserError):
    """A driver call failed (out of memory, a lost device...): one line for the user."""


def check(cu, result, what: str = "") -> tuple:
    """Unwrap a driver call's (CUresult, values...) tuple; CudaError on failure."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        try:
            _, msg = cu.cuGetErrorString(err)
            text = msg.decode() if isinstance(msg, bytes) else str(msg)
        except Exception:  # noqa: BLE001  (the code alone still says what happened)
            text = "unknown error"
        raise CudaError(f"CUDA error {int(err)} ({text}){' ' + what if what else ''}")
    return tuple(values)


def cached_ptx(key: str, sm: str) -> str:
    """PTX of module `key` for GPU `sm`, cached on disk beside the host objects."""
    text = str(build_module(key, Target.NVPTX))
    digest = hashlib.sha256(f"{sm}\0{text}".encode()).hexdigest()[:32]
    path = os.path.join(cache_dir(), f"{digest}.ptx")
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        pass
    ptx = emit_ptx(text, sm)
    store_cached(path, ptx.encode())
    return ptx


_C_ARG = {"p": ctypes.c_uint64, "i": ctypes.c_int64, "f": ctypes.c_float}


class CudaDevice:
    """GPU `index` through the driver API: its primary context, lazily loaded PTX modules,
    and kernel launches of BLOCK_THREADS threads per block."""

    def __init__(self, index: int = 0):
        try:
            cu = import_driver()
        except ImportError as e:
            raise UserError(f"the CUDA backend needs cuda-bindings ({e}): "
                            "pip install 'gguflab[cuda]'") from None
        self.cu, self.index = cu, index
        try:
            self._open(cu, index)
        except UserError:
            raise
        except Exception as e:  # no libcuda, a driver mismatch...: one line, not a traceback
            lines = str(e).strip().splitlines() or [type(e).__name__]
            raise CudaError(f"the CUDA driver is not usable: {lines[0]}") from None
        self._thread = threading.get_ident()  # the context is current on this thread
        self._modules: dict[str, object] = {}
        self._fns: dict[str, object] = {}
        self._allocs: list = []
        self.profile = False  # when set, each launch is synchronised and timed into `timings`
        self.timings: dict[str, float] = defaultdict(float)

    def _open(self, cu, index: int) -> None:
        check(cu, cu.cuInit(0))
        (self.dev,) = check(cu, cu.cuDeviceGet(index))
        (self.ctx,) = check(cu, cu.cuDevicePrimaryCtxRetain(self.dev))
        check(cu, cu.cuCtxSetCurrent(self.ctx))
        (raw,) = check(cu, cu.cuDeviceGetName(256, self.dev))
        self.name = raw.split(b"\0", 1)[0].decode(errors="replace")
        attr = cu.CUdevice_attribute
        (major,) = check(cu, cu.cuDeviceGetAttribute(
            attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, self.dev))
        (minor,) = check(cu, cu.cuDeviceGetAttribute(
            attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, self.dev))
        # PTX for the newest target we emit that the GPU can run; the driver JITs it up
        cc = (int(major), int(minor))
        self.sm = "sm_90" if cc >= (9, 0) else "sm_80" if cc >= (8, 0) else f"sm_{cc[0]}{cc[1]}"
        # a stream of our own: copies and launches go in order on it, and it can be recorded
        # (the legacy default stream cannot)
        (self.stream,) = check(cu, cu.cuStreamCreate(0))

    def _bind(self) -> None:
        """Make the context current on this thread (a UI may call from a worker thread)."""
        if threading.get_ident() != self._thread:
            check(self.cu, self.cu.cuCtxSetCurrent(self.ctx))
            self._thread = threading.get_ident()

    def _function(self, name: str):
        fn = self._fns.get(name)
        if fn is None:
            key = KERNELS[name][1]
            if key not in self._modules:
                ptx = cached_ptx(key, self.sm).encode() + b"\0"
                (self._modules[key],) = check(self.cu, self.cu.cuModuleLoadData(ptx),
                                              f"loading the {key} kernels ({self.sm} PTX)")
            (fn,) = check(self.cu, self.cu.cuModuleGetFunction(self._modules[key],
                                                               name.encode()))
            self._fns[name] = fn
        return fn

    def alloc(self, nbytes: int) -> int:
        self._bind()
        (p,) = check(self.cu, self.cu.cuMemAlloc(max(1, nbytes)),
                     f"allocating {nbytes / (1 << 20):.1f} MiB on GPU {self.index}")
        self._allocs.append(p)
        return int(p)

    def upload(self, arr: np.ndarray) -> int:
        p = self.alloc(arr.nbytes)
        self.write(p, arr)
        return p

    def write(self, dst: int, arr: np.ndarray) -> None:
        """Copy in, in order with the launches. From pageable memory the driver has staged
        the bytes when the call returns, so `arr` may go at once."""
        self._bind()
        arr = np.ascontiguousarray(arr)
        check(self.cu, self.cu.cuMemcpyHtoDAsync(self.cu.CUdeviceptr(dst), arr.ctypes.data,
                                                 arr.nbytes, self.stream))

    def read(self, src: int, out: np.ndarray) -> np.ndarray:
        """Copy out once every launch before it has run."""
        self._bind()
        check(self.cu, self.cu.cuMemcpyDtoHAsync(out.ctypes.data, self.cu.CUdeviceptr(src),
                                                 out.nbytes, self.stream))
        check(self.cu, self.cu.cuStreamSynchronize(self.stream))
        return out

    def launch(self, kernel: str, n_items: int, *args: int | float) -> None:
        if n_items <= 0:
            return
        self._bind()
        spec = KERNELS[kernel][0]
        values = [_C_ARG[k](v) for k, v in zip(spec.args, args)]
        values.append(ctypes.c_int64(n_items))
        params = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
        threads = n_items * (int(args[-1]) if spec.grouped else spec.lanes)
        grid = max(1, min(MAX_GRID, -(-threads // BLOCK_THREADS)))
        fn = self._function(kernel)
        t0 = time.perf_counter() if self.profile else 0.0
        check(self.cu, self.cu.cuLaunchKernel(fn, grid, 1, 1, BLOCK_THREADS, 1, 1, 0,
                                              self.stream, ctypes.addressof(params),
                                              0))
        if self.profile:
            self.synchronize()
            self.timings[kernel] += time.perf_counter() - t0

    def synchronize(self) -> None:
        self._bind()
        check(self.cu, self.cu.cuStreamSynchronize(self.stream))

    def begin_capture(self) -> None:
        """Record this thread's launches on the stream (copies are not allowed meanwhile)."""
        self._bind()
        mode = self.cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
        check(self.cu, self.cu.cuStreamBeginCapture(self.stream, mode), "recording a graph")

    def end_capture(self):
        """The recorded launches, instantiated: one `cuGraphLaunch` replays them."""
        self._bind()
        (graph,) = check(self.cu, self.cu.cuStreamEndCapture(self.stream), "recording a graph")
        try:
            (exe,) = check(self.cu, self.cu.cuGraphInstantiate(graph, 0), "instantiating a graph")
        finally:
            self.cu.cuGraphDestroy(graph)
        return exe

    def replay(self, graph) -> None:
        self._bind()
        check(self.cu, self.cu.cuGraphLaunch(graph, self.stream))

    def release(self, graph) -> None:
        self._bind()
        self.cu.cuGraphExecDestroy(graph)

    def mem_info(self) -> tuple[int, int]:
        self._bind()
        free, total = check(self.cu, self.cu.cuMemGetInfo())
        return int(free), int(total)

    def close(self) -> None:
        if getattr(self, "ctx", None) is None:
            return
        self._bind()
        for p in self._allocs:
            self.cu.cuMemFree(p)
        self._allocs.clear()
        for m in self._modules.values():
            self.cu.cuModuleUnload(m)
        self._modules.clear()
        self._fns.clear()
        self.cu.cuStreamDestroy(self.stream)
        self.cu.cuDevicePrimaryCtxRelease(self.dev)
        self.ctx = None
