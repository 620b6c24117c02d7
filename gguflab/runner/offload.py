"""Which layers go to the GPU, decided before anything is loaded.

`probe_gpu()` asks the CUDA driver (through the optional `cuda-bindings`) for the device and
its free memory, and never raises: no bindings, no driver, no device or a failed init give
None and one line saying why. `plan_offload()` adds up what each layer would take on the
device (its weights as stored, its F16 KV cache for the context, and the activation scratch)
and places layers the way llama.cpp's `--n-gpu-layers N` does: the LAST N repeating layers,
and with N > n_layer the output layer too (999 = everything). `"auto"` takes the most that
fit; asking for more than fits is a UserError with the numbers.

Both are cheap and import nothing heavy, so the CLI and the TUI can call them to show the
plan.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from ..errors import UserError
from ..fmt import size

MIB = 1 << 20
MAX_BATCH = 512  # tokens per device pass: longer prompts go through in chunks of this many
# held back for what the driver takes at launch: the stack (local memory) of every resident
# thread (the attention kernel keeps a head's row there), and the loaded modules
RESERVE_BYTES = 512 * MIB
# GGUFLAB_GPU=host: a pretend GPU in host memory that runs the very kernels the GPU would
# (compiled for the CPU), so the whole offload path can be checked on a machine without one
HOST_GPU_NAME = "host emulation"
HOST_GPU_BYTES = 8 << 30
_LAYER = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    free_bytes: int
    total_bytes: int
    compute_capability: tuple[int, int]


def _driver_reason(cu, err) -> str:
    code = int(err)
    known = {100: "no CUDA device found", 35: "the NVIDIA driver is older than cuda-bindings",
             999: "the CUDA driver failed to start"}
    if code in known:
        return known[code]
    try:
        _, msg = cu.cuGetErrorString(err)
        return f"CUDA error {code}: {msg.decode() if isinstance(msg, bytes) else msg}"
    except Exception:  # noqa: BLE001  (a reason is all we want here)
        return f"CUDA error {code}"


def probe_gpu(main_gpu: int = 0) -> tuple[GpuInfo | None, str]:
    """(GpuInfo, "") for device `main_gpu`, or (None, why not) in one line. Never raises."""
    try:
        from cuda.bindings import driver as cu  # noqa: PLC0415  (optional, imported lazily)
    except ImportError:
        return None, "cuda-bindings is not installed"
    except Exception as e:  # noqa: BLE001  (a broken install is still "no GPU")
        return None, f"cuda-bindings cannot be imported: {_one_line(e)}"
    try:
        (err,) = _as_tuple(cu.cuInit(0))
        if int(err):
            return None, _driver_reason(cu, err)
        err, count = cu.cuDeviceGetCount()
        if int(err):
            return None, _driver_reason(cu, err)
        if count == 0:
            return None, "no CUDA device found"
        if not 0 <= main_gpu < count:
            return None, f"there is no GPU {main_gpu} (found {count})"
        err, dev = cu.cuDeviceGet(main_gpu)
        if int(err):
            return None, _driver_reason(cu, err)
        _, raw = cu.cuDeviceGetName(256, dev)
        name = raw.split(b"\0", 1)[0].decode(errors="replace")
        attr = cu.CUdevice_attribute
        _, major = cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
        _, minor = cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)
        err, ctx = cu.cuDevicePrimaryCtxRetain(dev)
        if int(err):
            return None, _driver_reason(cu, err)
        try:
            cu.cuCtxSetCurrent(ctx)
            err, free, total = cu.cuMemGetInfo()
        finally:
            cu.cuDevicePrimaryCtxRelease(dev)
        if int(err):
            return None, _driver_reason(cu, err)
        return GpuInfo(main_gpu, name, int(free), int(total), (int(major), int(minor))), ""
    except Exception as e:  # noqa: BLE001  (no libcuda, driver mismatch...: one line, no trace)
        return None, f"the CUDA driver is not usable: {_one_line(e)}"


def _as_tuple(r) -> tuple:
    return r if isinstance(r, tuple) else (r,)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


@dataclass
class OffloadPlan:
    """Where each layer runs and what the device part costs, in bytes."""

    gpu_layers: list[int]
    output_on_gpu: bool
    bytes_per_layer: list[int]  # weights of each repeating layer as stored in the file
    kv_bytes_per_layer: int  # F16 K and V for the context
    scratch_bytes: int  # activations for a batch, the RoPE table and RESERVE_BYTES
    needed_bytes: int  # what the placement takes on the device (0 with no layer there)
    free_bytes: int | None  # None: no usable GPU
    reason: str
    output_bytes: int = 0
    total_bytes: int | None = None
    n_layer: int = 0
    max_fit: int = 0  # the -ngl that auto would pick (n_layer + 1: all and the output)
    gpu_name: str = ""
    main_gpu: int = 0
    requested: int | str = 0
    notes: list[str] = field(default_factory=list)

    @property
    def on_gpu(self) -> bool:
        return self.free_bytes is not None and bool(self.gpu_layers or self.output_on_gpu)

    def summary(self) -> str:
        """One line for the user, e.g. `offload: 24/30 layers + output on GPU 0 (H100),
        812 MiB of 79.1 GiB free`."""
        if self.free_bytes is None:
            return f"no GPU ({self.reason}): running on the CPU"
        gpu = f"GPU {self.main_gpu}" + (f" ({self.gpu_name})" if self.gpu_name else "")
        gib = self.free_bytes / (1 << 30)
        free = f"{gib:.1f} GiB free" if gib >= 1 else f"{self.free_bytes / MIB:.0f} MiB free"
        if not self.on_gpu:
            return f"offload: 0/{self.n_layer} layers on {gpu} ({free}): running on the CPU"
        out = " + output" if self.output_on_gpu else ""
        return (f"offload: {len(self.gpu_layers)}/{self.n_layer} layers{out} on {gpu}, "
                f"{self.needed_bytes / MIB:.0f} MiB of {free}")


def _layer_bytes(reader, n_layer: int) -> tuple[list[int], int]:
    per = [0] * n_layer
    out = 0
    names = {t.name for t in reader.tensors}
    head = "output.weight" if "output.weight" in names else "token_embd.weight"
    for t in reader.tensors:
        m = _LAYER.match(t.name)
        if m and int(m.group(1)) < n_layer:
            per[int(m.group(1))] += t.nbytes
        elif t.name in (head, "output_norm.weight"):
            out += t.nbytes
    return per, out


def placement(n_layer: int, n_gpu_layers: int) -> tuple[list[int], bool]:
    """llama.cpp's meaning of -ngl N: the last N repeating layers; N > n_layer also puts
    the output layer on the GPU."""
    if n_gpu_layers < 0:
        raise UserError(f"-ngl {n_gpu_layers}: give a number of layers >= 0, or auto")
    k = min(n_gpu_layers, n_layer)
    return list(range(n_layer - k, n_layer)), n_gpu_layers > n_layer


def plan_offload(reader_or_path, n_ctx: int, n_gpu_layers: int | str,
                 free_bytes: int | None, total_bytes: int | None = None, *,
                 gpu_name: str = "", main_gpu: int = 0,
                 no_gpu_reason: str = "no GPU") -> OffloadPlan:
    """Place layers for a context of `n_ctx` given the device's free memory (None: there is
    no usable GPU, so nothing is placed and `no_gpu_reason` says why)."""
    from ..gguf import GGUFReader  # noqa: PLC0415  (keeps this module light to import)
    from .model import HParams  # noqa: PLC0415

    r = reader_or_path if hasattr(reader_or_path, "tensors") else GGUFReader(reader_or_path)
    hp = HParams.from_gguf(r)
    n = hp.n_layer
    if n_ctx <= 0:
        raise UserError(f"context size must be positive, got {n_ctx}")
    per, out_bytes = _layer_bytes(r, n)
    kv = 2 * n_ctx * hp.n_head_kv * hp.head_dim * 2
    batch = min(n_ctx, MAX_BATCH)
    acts = 4 * batch * (3 * hp.n_embd + 2 * hp.n_head * hp.head_dim
                        + 2 * hp.n_head_kv * hp.head_dim + 2 * hp.n_ff)
    rope_table = 4 * n_ctx * hp.rope_dim
    vocab = hp.n_vocab or 0

    def scratch(out: bool) -> int:
        return acts + rope_table + RESERVE_BYTES + (4 * batch * vocab if out else 0)

    def needed(k: int) -> int:
        layers, out = placement(n, k)
        if not layers and not out:
            return 0
        return (sum(per[i] for i in layers) + kv * len(layers)
                + (out_bytes if out else 0) + scratch(out))

    max_fit = 0
    if free_bytes is not None:
        max_fit = max((k for k in range(n + 2) if needed(k) <= free_bytes), default=0)
    if isinstance(n_gpu_layers, str):
        if n_gpu_layers.strip().lower() != "auto":
            raise UserError(f"-ngl {n_gpu_layers!r}: give a number of layers or auto")
        k, reason = max_fit, "auto: as many layers as fit in free memory"
    else:
        k, reason = int(n_gpu_layers), f"-ngl {n_gpu_layers}"
    layers, out = placement(n, k)
    plan = OffloadPlan(
        gpu_layers=layers, output_on_gpu=out, bytes_per_layer=per, kv_bytes_per_layer=kv,
        scratch_bytes=scratch(out), needed_bytes=needed(k), free_bytes=free_bytes,
        reason=reason, output_bytes=out_bytes, total_bytes=total_bytes, n_layer=n,
        max_fit=max_fit, gpu_name=gpu_name, main_gpu=main_gpu, requested=n_gpu_layers)
    if free_bytes is None:
        plan.gpu_layers, plan.output_on_gpu, plan.needed_bytes = [], False, 0
        plan.reason = no_gpu_reason
        return plan
    if plan.needed_bytes > free_bytes:
        raise UserError(
            f"-ngl {n_gpu_layers}: {len(layers)} layers{' + output' if out else ''} need "
            f"{size(plan.needed_bytes)} on GPU {main_gpu} but {size(free_bytes)} is free "
            f"(at most -ngl {max_fit} fits with --ctx-size {n_ctx}; try -ngl auto)")
    return plan


def parse_n_gpu_layers(text: str) -> int | str:
    """`-ngl` as typed: a count of layers or "auto" (an argparse `type`, so a bad value is
    argparse's one-line usage error)."""
    import argparse  # noqa: PLC0415

    t = str(text).strip().lower()
    if t == "auto":
        return "auto"
    try:
        v = int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of layers or auto") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{v}: give a number of layers >= 0, or auto")
    return v


def plan_for_cli(reader, n_ctx: int, n_gpu_layers: int | str,
                 main_gpu: int = 0) -> OffloadPlan:
    """Probe the GPU and plan in one call (GGUFLAB_NO_GPU=1 acts as if there were none)."""
    if os.environ.get("GGUFLAB_NO_GPU"):
        gpu, why = None, "GGUFLAB_NO_GPU is set"

    elif os.environ.get("GGUFLAB_GPU") == "host":
        gpu, why = GpuInfo(main_gpu, HOST_GPU_NAME, HOST_GPU_BYTES, HOST_GPU_BYTES, (0, 0)), ""
    else:
        gpu, why = probe_gpu(main_gpu)
    if gpu is None:
        return plan_offload(reader, n_ctx, n_gpu_layers, None, main_gpu=main_gpu,
                            no_gpu_reason=why)
    return plan_offload(reader, n_ctx, n_gpu_layers, gpu.free_bytes, gpu.total_bytes,
                        gpu_name=gpu.name, main_gpu=main_gpu)

