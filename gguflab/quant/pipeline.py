"""quantize_model: GGUF in -> GGUF out, one tensor (one slab of rows) at a time, yielding
events. The output is what llama.cpp's `llama_model_quantize` writes, byte for byte."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .. import jit
from ..errors import UserError
from ..events import Event, Finished, Log, Progress, Started, TensorDone
from ..gguf import (
    GGMLType,
    GGUFReader,
    GGUFWriter,
    Keys,
    LlamaFileType,
    ReaderTensor,
    TensorSpec,
    Value,
    ValueType,
    tensor_bytes,
)
from ..gguf.constants import QUANTIZATION_VERSION
from .base import HIST_BINS, REGISTRY, get
from .mixes import (
    Mix,
    MixOptions,
    ModelFacts,
    Planner,
    is_quantized,
    llama_order,
    n_dims,
    requires_imatrix,
)

SLAB_ELEMENTS = 1 << 24  # rows are converted 64 MiB of float32 at a time: memory stays bounded
WEIGHT_BINS = 32  # bins of the input weights' distribution
WEIGHT_SAMPLE = 1 << 16  # weights per tensor that the distribution is taken from
HIST_SAMPLE = 1 << 20  # weights per tensor that the level histogram is counted on


@dataclass
class QuantizeOptions(MixOptions):
    allow_requantize: bool = False
    dry_run: bool = False
    threads: int | None = None
    overwrite: bool = False
    stats: bool = True  # histogram and relative RMSE per tensor (costs one dequantize)
    weights: bool = False  # with stats: each tensor's input distribution (the TUI's chart)


@dataclass
class TensorPlan:
    tensor: ReaderTensor
    ne: tuple[int, ...]  # ggml order, trailing 1s dropped as llama.cpp writes them
    dst_type: GGMLType
    note: str = ""

    @property
    def name(self) -> str:
        return self.tensor.name

    @property
    def src_type(self) -> GGMLType:
        return self.tensor.type

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.ne))

    @property
    def converted(self) -> bool:
        return self.src_type != self.dst_type

    @property
    def dst_bytes(self) -> int:
        return tensor_bytes(self.dst_type, self.shape)


@dataclass
class ModelPlan:
    facts: ModelFacts
    tensors: list[TensorPlan]
    metadata: dict[str, Value]
    n_fallback: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def src_bytes(self) -> int:
        return sum(t.tensor.nbytes for t in self.tensors)

    @property
    def dst_bytes(self) -> int:
        return sum(t.dst_bytes for t in self.tensors)

    @property
    def n_elements(self) -> int:
        return sum(t.tensor.n_elements for t in self.tensors)


def model_facts(r: GGUFReader) -> ModelFacts:
    arch = r.architecture
    if not arch:
        raise UserError(f"{r.path}: no general.architecture: not a model file")

    def hp(key: str, default=None):
        v = r.arch_get(key, default)
        if isinstance(v, (np.ndarray, list)):  # per-layer values: llama.cpp's rules use layer 0
            v = v[0] if len(v) else default
        return v

    n_layer = hp(Keys.BLOCK_COUNT)
    n_head = hp(Keys.HEAD_COUNT)
    if n_layer is None or n_head is None:
        raise UserError(f"{r.path}: missing {arch}.block_count or {arch}.attention.head_count")
    return ModelFacts(arch=arch, n_layer=int(n_layer), n_head=int(n_head),
                      n_head_kv=int(hp(Keys.HEAD_COUNT_KV, n_head)),
                      n_expert=int(hp(Keys.EXPERT_COUNT, 0)),
                      tensor_names=[t.name for t in r.tensors])


# the file type llama.cpp's loader guesses from the most common tensor type
def _source_ftype(r: GGUFReader) -> int:
    ft = r.get(Keys.FILE_TYPE)
    if ft is not None:
        return int(ft)
    counts = Counter(t.type for t in r.tensors)
    top = max(counts, key=counts.get) if counts else GGMLType.F32
    guess = REGISTRY[top].file_type if top in REGISTRY else None
    return int(guess if guess is not None else LlamaFileType.ALL_F32) | LlamaFileType.GUESSED


def plan_model(r: GGUFReader, mix: Mix, opts: QuantizeOptions) -> ModelPlan:
    """Every tensor's output type, in llama.cpp's order, and the output metadata; raises
    UserError for what cannot be done (before anything is written)."""
    facts = model_facts(r)
    planner = Planner(facts, mix, opts)
    plans = []
    requant: Counter[str] = Counter()
    for t in sorted(r.tensors, key=lambda t: llama_order(t.name)):
        ne = t.ne[: n_dims(t.ne)]
        dst = planner.choose(t.name, ne, t.type)
        plan = TensorPlan(t, ne, dst, planner.fallback_notes.get(t.name, ""))
        if plan.converted:
            if is_quantized(t.type):
                requant[t.type.name] += 1
            try:
                get(t.type), get(dst)  # both ways must exist before anything is written
            except UserError as e:
                raise UserError(f"{r.path}: tensor {t.name}: {e}") from None
        plans.append(plan)
    warnings = []
    needs_imatrix = [p.name for p in plans if requires_imatrix(p.name, p.dst_type, mix)]
    if needs_imatrix:
        msg = (f"{mix.name} needs an importance matrix for {len(needs_imatrix)} tensors (first: "
               f"{needs_imatrix[0]}), as in llama.cpp; gguflab has no imatrix yet: use Q2_K")
        if not opts.dry_run:
            raise UserError(f"{r.path}: {msg}")
        warnings.append(msg)
    if requant:
        kinds = ", ".join(f"{n} {k}" for k, n in requant.items())
        if not opts.allow_requantize:
            raise UserError(f"{r.path}: requantizing from already quantized tensors ({kinds}) is "
                            "disabled; use --allow-requantize (quality will be worse than from "
                            "F16/BF16/F32)")
        warnings.append(f"requantizing {kinds} tensors: the result will be worse than "
                        "quantizing from the F16/BF16/F32 original")
    by_reason = Counter(planner.fallback_notes.values())  # one line per kind of fallback
    for note, n in by_reason.items():
        first = next(k for k, v in planner.fallback_notes.items() if v == note)
        warnings.append(f"{n} tensor(s), e.g. {first}: {note}")

    meta = dict(r.metadata)
    ftype = _source_ftype(r) if mix.default_type is None else int(mix.ftype)
    for key, value in ((Keys.QUANTIZATION_VERSION, QUANTIZATION_VERSION), (Keys.FILE_TYPE, ftype)):
        meta.pop(key, None)  # llama.cpp's gguf_set_val removes the key and appends it
        meta[key] = Value(ValueType.UINT32, value)
    return ModelPlan(facts, plans, meta, planner.n_fallback, warnings)


def check_output_path(path: str, overwrite: bool) -> None:
    """Fail before any work when the output cannot be written."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(f"{path}: output folder {parent} does not exist")
    if os.path.exists(path) and not overwrite:
        raise UserError(f"{path}: already exists (use --force to overwrite)")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{path}: cannot write to {parent}")


def to_f32(t: ReaderTensor, rows: slice, threads: int | None) -> np.ndarray:
    """Rows of a tensor as float32 (2-D: rows x ne[0])."""
    data = t.data.reshape(-1, t.data.shape[-1])[rows]
    if t.type == GGMLType.F32:
        return np.asarray(data)
    if t.type == GGMLType.F16:
        return jit.f16_to_f32(data, threads)
    return get(t.type).dequantize(data, threads)


def quantize_model(src: str | os.PathLike, dst: str | os.PathLike | None, mix: Mix,
                   opts: QuantizeOptions | None = None) -> Iterator[Event]:
    """Quantize `src` into `dst` as `mix`, yielding Started, Log, Progress, TensorDone per
    tensor and Finished. Closing the generator early (cancel) removes the partial output."""
    opts = opts or QuantizeOptions()
    t_start = time.perf_counter()
    r = GGUFReader(src)
    plan = plan_model(r, mix, opts)
    dst = None if dst is None else os.fspath(dst)
    if not opts.dry_run:
        if dst is None:
            raise UserError("no output path")
        if os.path.abspath(dst) == os.path.abspath(r.path) and not opts.overwrite:
            raise UserError(f"{dst}: output is the input file (use --force to replace it)")
        check_output_path(dst, opts.overwrite)
    total = len(plan.tensors)
    yield Started("quantize", r.path, dst, total, plan.src_bytes,
                  {"mix": mix.name, "ftype": int(mix.ftype), "dry_run": opts.dry_run,
                   "n_elements": plan.n_elements, "planned_bytes": plan.dst_bytes})
    for w in plan.warnings:
        yield Log("warning", w)

    if opts.dry_run:
        for i, p in enumerate(plan.tensors, 1):
            yield _done(i, total, p, 0.0, None, None)
        yield Finished(None, _stats(plan, time.perf_counter() - t_start, plan.dst_bytes))
        return

    specs = [TensorSpec(p.name, p.shape, p.dst_type) for p in plan.tensors]
    bytes_done = 0
    with GGUFWriter(dst, plan.metadata, specs, alignment=r.alignment,
                    overwrite=opts.overwrite) as w:
        for i, p in enumerate(plan.tensors, 1):
            t0 = time.perf_counter()
            hist = rmse = weights = None
            if not p.converted:
                w.write_tensor(p.name, p.tensor.raw)
            else:
                hist, rmse, weights = yield from _convert(w, p, opts, bytes_done,
                                                          plan.src_bytes)
            bytes_done += p.tensor.nbytes
            r.release(p.tensor)
            yield _done(i, total, p, time.perf_counter() - t0, hist, rmse, weights)
    yield Finished(dst, _stats(plan, time.perf_counter() - t_start, os.path.getsize(dst)))


def _convert(w: GGUFWriter, p: TensorPlan, opts: QuantizeOptions, bytes_before: int,
             total_bytes: int):
    """Write one tensor converted slab by slab; returns (level histogram, relative RMSE,
    weight distribution), all None without stats."""
    qt = get(p.dst_type)
    t = p.tensor
    row = t.ne[0]
    n_rows = t.n_elements // row
    slab = max(1, SLAB_ELEMENTS // row)
    err2 = ref2 = 0.0
    hist = np.zeros(HIST_BINS, np.int64) if qt.n_levels else None
    hist_every = max(1, n_rows * row // HIST_SAMPLE)  # count levels on every k-th row
    sample = []  # input weights of every j-th row, for their distribution
    weights_every = max(1, n_rows * row // WEIGHT_SAMPLE)
    w.begin_tensor(p.name)
    for a in range(0, n_rows, slab):
        b = min(n_rows, a + slab)
        x = to_f32(t, slice(a, b), opts.threads)
        q = qt.quantize(x, opts.threads)
        w.write_part(q)
        if opts.stats:
            d = qt.dequantize(q, opts.threads)
            d -= x
            d = d.reshape(-1)
            xf = x.reshape(-1)
            err2 += float(np.dot(d, d))
            ref2 += float(np.dot(xf, xf))
            if hist is not None:
                hist += qt.histogram(q[(-a) % hist_every :: hist_every])
            if opts.weights:
                sample.append(x[(-a) % weights_every :: weights_every].reshape(-1).copy())
        if b < n_rows:
            frac = b / n_rows
            yield Progress(0, 0, bytes_before + int(frac * t.nbytes), total_bytes)
    w.end_tensor()
    if not opts.stats:
        return None, None, None
    rmse = (err2 / ref2) ** 0.5 if ref2 > 0 else 0.0
    weights = weight_histogram(sample) if opts.weights else None
    return (hist.tolist() if hist is not None else None), rmse, weights


def weight_histogram(parts: list[np.ndarray]) -> dict | None:
    """Distribution of input weights: counts in WEIGHT_BINS equal bins over [lo, hi]."""
    x = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    x = x[np.isfinite(x)]
    if not x.size:
        return None
    lo, hi = float(x.min()), float(x.max())
    counts, _ = np.histogram(x, WEIGHT_BINS, (lo, hi if hi > lo else lo + 1))
    return {"counts": counts.tolist(), "lo": lo, "hi": hi}


def _done(i: int, total: int, p: TensorPlan, seconds: float, hist, rmse,
          weights: dict | None = None) -> TensorDone:
    return TensorDone(index=i, total=total, name=p.name, shape=list(p.ne),
                      src_type=p.src_type.name, dst_type=p.dst_type.name,
                      bytes_in=p.tensor.nbytes, bytes_out=p.dst_bytes, seconds=seconds,
                      hist=hist, rmse=rmse, converted=p.converted, note=p.note,
                      weights=weights)


def _stats(plan: ModelPlan, seconds: float, file_size: int) -> dict:
    n = plan.n_elements or 1
    return {"model_bytes": plan.src_bytes, "quant_bytes": plan.dst_bytes,
            "model_bpw": 8 * plan.src_bytes / n, "quant_bpw": 8 * plan.dst_bytes / n,
            "n_elements": plan.n_elements, "seconds": seconds, "file_size": file_size,
            "n_fallback": plan.n_fallback, "n_tensors": len(plan.tensors)}
