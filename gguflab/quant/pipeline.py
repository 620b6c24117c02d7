"""quantize_model: GGUF in -> GGUF out, one tensor (one slab of rows) at a time, yielding
events. The output is what llama.cpp's `llama_model_quantize` writes, byte for byte."""

from __future__ import annotations

import os
import re
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
    Category,
    Mix,
    MixOptions,
    ModelFacts,
    Planner,
    allows_quantization,
    category,
    ggml_type_name,
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
class Importance:
    """An importance matrix as llama-quantize hands it to the quantizer: per tensor name
    (the source model's names), float32 (n_mat, n_per_row): one row of weights per expert
    (one for 2-D tensors)."""

    weights: dict[str, np.ndarray]
    file: str = ""
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0


@dataclass
class QuantizeOptions(MixOptions):
    allow_requantize: bool = False
    dry_run: bool = False
    threads: int | None = None
    overwrite: bool = False
    stats: bool = True  # histogram and relative RMSE per tensor (costs one dequantize)
    weights: bool = False  # with stats: each tensor's input distribution (the TUI's chart)
    # --imatrix FILE (or the matrix itself, already loaded), filtered by name substrings as
    # --include-weights / --exclude-weights (not both)
    imatrix: str | os.PathLike | Importance | None = None
    include_weights: list[str] = field(default_factory=list)
    exclude_weights: list[str] = field(default_factory=list)
    # --override-kv: (key, value) set in the output after everything copied, in order
    kv_overrides: list[tuple[str, Value]] = field(default_factory=list)
    prune_layers: list[int] = field(default_factory=list)  # --prune-layers: blk.N to drop


# the types whose llama.cpp quantizer takes importance weights (the others ignore them)
LLAMA_WEIGHTED = {GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K,
                  GGMLType.Q1_0, GGMLType.Q2_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0,
                  GGMLType.Q5_1, GGMLType.IQ2_XXS, GGMLType.IQ2_XS, GGMLType.IQ2_S,
                  GGMLType.IQ3_XXS, GGMLType.IQ3_S, GGMLType.IQ1_S, GGMLType.IQ1_M,
                  GGMLType.IQ4_NL, GGMLType.IQ4_XS}


def load_importance(path: str | os.PathLike, include: list[str] | None = None,
                    exclude: list[str] | None = None) -> Importance:
    """Read an imatrix file (GGUF or legacy .dat) and keep the entries llama-quantize keeps:
    with `exclude`, those whose name contains none of the strings; with `include`, those
    that contain one."""
    include, exclude = include or [], exclude or []
    if include and exclude:
        raise UserError("--include-weights and --exclude-weights cannot be used together")
    try:
        from .. import imatrix as imatrix_mod
    except ImportError:
        raise UserError("this gguflab cannot read importance matrices yet") from None
    im = imatrix_mod.load(os.fspath(path))
    if not im.legacy and not im.has_metadata:
        raise UserError(f"{os.fspath(path)}: missing imatrix metadata (imatrix.datasets, "
                        "imatrix.chunk_count, imatrix.chunk_size)")
    names = [n for n in im.entries if not any(x in n for x in exclude)]
    if include:
        names = [n for n in names if any(x in n for x in include)]
    weights = {}
    for n in names:
        w = im.importance(n)
        if w is not None:
            weights[n] = np.asarray(w, np.float32)
    return Importance(weights, os.fspath(path), list(im.datasets), int(im.chunk_count or 0))


def filter_importance(imp: Importance, include: list[str], exclude: list[str]) -> Importance:
    if include and exclude:
        raise UserError("--include-weights and --exclude-weights cannot be used together")
    names = [n for n in imp.weights if not any(x in n for x in exclude)]
    if include:
        names = [n for n in names if any(x in n for x in include)]
    return Importance({n: imp.weights[n] for n in names}, imp.file, imp.datasets,
                      imp.chunk_count)


def parse_kv_override(text: str) -> tuple[str, Value]:
    """KEY=TYPE:VALUE (TYPE one of int, float, bool, str) as llama.cpp's --override-kv; the
    value as llama-quantize writes it (an int becomes a uint32 of its absolute value)."""
    key, sep, rest = text.partition("=")
    if not sep or len(key) >= 128:
        raise UserError(f"--override-kv: malformed KV override {text!r}: expected KEY=TYPE:VALUE")
    kind, colon, val = rest.partition(":")
    if not colon or kind not in ("int", "float", "bool", "str"):
        raise UserError(f"--override-kv: invalid type for KV override {text!r}: use "
                        "int:, float:, bool: or str:")
    try:
        if kind == "int":
            return key, Value(ValueType.UINT32, abs(int(val.strip())) & 0xFFFFFFFF)
        if kind == "float":
            return key, Value(ValueType.FLOAT32, float(val.strip()))
    except ValueError:
        raise UserError(f"--override-kv: {val!r} is not a number ({text!r})") from None
    if kind == "bool":
        if val not in ("true", "false"):
            raise UserError(f"--override-kv: invalid boolean value for KV override {text!r}: "
                            "true or false")
        return key, Value(ValueType.BOOL, val == "true")
    if len(val.encode()) > 127:
        raise UserError(f"--override-kv: malformed KV override {text!r}: value cannot exceed "
                        "127 chars")
    return key, Value(ValueType.STRING, val)


_BLK = re.compile(r"blk\.(\d+)\.")


def prune_names(names: list[str], prune: list[int]) -> tuple[dict[str, str | None], int]:
    """llama-quantize's --prune-layers: each name (in llama.cpp's order) -> its new name, or
    None when its layer is dropped; the layers left are renumbered densely. Also returns
    the new block count."""
    prune = sorted(set(prune))
    mapped: dict[int, str | None] = {}
    next_id = 0
    out: dict[str, str | None] = {}
    for name in names:
        m = _BLK.search(name) if prune else None
        if not m:
            out[name] = name
            continue
        blk = int(m.group(1))
        if blk not in mapped:
            if blk in prune:
                mapped[blk] = None
            elif blk < prune[0]:
                mapped[blk] = str(blk)
                next_id = blk + 1
            else:
                mapped[blk] = str(next_id)
                next_id += 1
        new = mapped[blk]
        out[name] = None if new is None else name[: m.start(1)] + new + name[m.end(1):]
    return out, next_id


@dataclass
class TensorPlan:
    tensor: ReaderTensor
    ne: tuple[int, ...]  # ggml order, trailing 1s dropped as llama.cpp writes them
    dst_type: GGMLType
    note: str = ""
    out_name: str | None = None  # the name written (--prune-layers renumbers layers)
    importance: np.ndarray | None = None  # (n_mat, n_per_row) importance weights, or None

    @property
    def name(self) -> str:
        return self.out_name or self.tensor.name

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
    info: list[str] = field(default_factory=list)

    @property
    def src_bytes(self) -> int:
        return sum(t.tensor.nbytes for t in self.tensors)

    @property
    def dst_bytes(self) -> int:
        return sum(t.dst_bytes for t in self.tensors)

    @property
    def n_elements(self) -> int:
        return sum(t.tensor.n_elements for t in self.tensors)


def model_facts(r: GGUFReader, overrides: list[tuple[str, Value]] | None = None) -> ModelFacts:
    """The hyperparameters the rules read, as llama.cpp's loader sees them (with the
    --override-kv values, which it applies when reading)."""
    arch = r.architecture
    if not arch:
        raise UserError(f"{r.path}: no general.architecture: not a model file")
    over = {k: v.value for k, v in overrides or []}

    def hp(key: str, default=None):
        full = Keys.arch(key, arch)
        v = over[full] if full in over else r.arch_get(key, default)
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


def _importance(opts: QuantizeOptions) -> Importance | None:
    """The importance data llama-quantize would pass on: None without a file, or when the
    name filters leave nothing."""
    if opts.imatrix is None:  # (llama-quantize ignores the name filters then)
        return None
    if isinstance(opts.imatrix, Importance):
        imp = filter_importance(opts.imatrix, opts.include_weights, opts.exclude_weights)
    else:
        imp = load_importance(opts.imatrix, opts.include_weights, opts.exclude_weights)
    if not imp.weights:
        return None
    for name, w in imp.weights.items():
        bad = w[~np.isfinite(w)]
        if bad.size:
            raise UserError(f"imatrix contains non-finite value {float(bad[0]):f} ({name})")
    return imp


def _imatrix_keys(imp: Importance) -> list[tuple[str, Value]]:
    """The quantize.imatrix.* keys llama-quantize records, as overrides after the user's."""
    out = [("quantize.imatrix.file", Value(ValueType.STRING, imp.file.encode()[:127].decode(
        "utf-8", "ignore")))]
    if imp.datasets:
        out.append(("quantize.imatrix.dataset", Value(
            ValueType.STRING, imp.datasets[0].encode()[:127].decode("utf-8", "ignore"))))
    out.append(("quantize.imatrix.entries_count", Value(ValueType.UINT32, len(imp.weights))))
    if imp.chunk_count > 0:
        out.append(("quantize.imatrix.chunks_count", Value(ValueType.UINT32, imp.chunk_count)))
    return out


def plan_model(r: GGUFReader, mix: Mix, opts: QuantizeOptions,
               importance: Importance | None = None) -> ModelPlan:
    """Every tensor's output type, in llama.cpp's order, and the output metadata; raises
    UserError for what cannot be done (before anything is written). `importance`: the
    loaded imatrix (default: loaded from `opts.imatrix`)."""
    imp = importance if importance is not None else _importance(opts)
    facts = model_facts(r, opts.kv_overrides)
    ordered = sorted(r.tensors, key=lambda t: llama_order(t.name))
    renamed, n_blocks = prune_names([t.name for t in ordered], opts.prune_layers)
    ordered = [t for t in ordered if renamed[t.name] is not None]
    facts.tensor_names = [renamed[t.name] for t in ordered]
    planner = Planner(facts, mix, opts, has_imatrix=imp is not None)
    plans = []
    requant: Counter[str] = Counter()
    needs_imatrix: list[TensorPlan] = []
    unweighted: Counter[str] = Counter()  # types we quantize without the weights llama.cpp uses
    no_data: list[str] = []
    imatrix_problems: list[str] = []  # what will fail when not a dry run
    for t in ordered:
        name = renamed[t.name]
        ne = t.ne[: n_dims(t.ne)]
        dst = planner.choose(name, ne, t.type)
        note = planner.fallback_notes.get(name, "")
        if name in planner.manual:
            a, b = planner.manual[name]
            note = note or f"manual override: {a.name} -> {b.name}"
        plan = TensorPlan(t, ne, dst, note, out_name=name if name != t.name else None)
        needs = requires_imatrix(name, dst, mix)
        if imp is None:
            if needs and allows_quantization(name, ne, mix, opts):
                needs_imatrix.append(plan)
        elif plan.converted:
            try:
                plan.importance = _tensor_importance(imp, plan, t.name)
                if plan.importance is None and needs:
                    raise UserError(f"Missing importance matrix for tensor {name} in a very "
                                    "low-bit quantization")
            except UserError as e:
                if not opts.dry_run:  # llama.cpp's dry run does not look at the imatrix's rows
                    raise UserError(f"{r.path}: {e}") from None
                imatrix_problems.append(str(e))
            if plan.importance is None and dst in LLAMA_WEIGHTED:
                no_data.append(name)
        if plan.converted:
            if is_quantized(t.type):
                requant[t.type.name] += 1
            if not opts.dry_run:
                try:
                    get(t.type), get(dst)  # both ways must exist before anything is written
                except UserError as e:
                    raise UserError(f"{r.path}: tensor {name}: {e}") from None
                if plan.importance is not None and dst in LLAMA_WEIGHTED \
                        and not get(dst).uses_imatrix:
                    unweighted[dst.name] += 1
        plans.append(plan)
    warnings, info = [], []
    if imp is not None:
        info.append(f"using {len(imp.weights)} importance matrix entries from {imp.file} "
                    f"computed on {imp.chunk_count} chunks")
    if needs_imatrix:
        p = needs_imatrix[0]
        msg = (f"this quantization requires an imatrix! - offending tensor: {p.name} - target "
               f"type: {ggml_type_name(p.dst_type)} ({len(needs_imatrix)} tensors of {mix.name} "
               "need an importance matrix: pass --imatrix FILE)")
        if not opts.dry_run:
            raise UserError(f"{r.path}: {msg}")
        warnings.append("dry run completed successfully, but actually completing this "
                        f"quantization will require an imatrix! ({msg})")
    if requant:
        kinds = ", ".join(f"{n} {k}" for k, n in requant.items())
        if not opts.allow_requantize and not opts.dry_run:  # (a dry run only reports)
            raise UserError(f"{r.path}: requantizing from already quantized tensors ({kinds}) is "
                            "disabled; use --allow-requantize (quality will be worse than from "
                            "F16/BF16/F32)")
        warnings.append(f"requantizing {kinds} tensors: the result will be worse than "
                        "quantizing from the F16/BF16/F32 original")
    if imatrix_problems:
        warnings.append(f"the quantization will fail: {imatrix_problems[0]}")
    if no_data:
        warnings.append(f"the importance matrix has no weights for {len(no_data)} tensor(s) "
                        f"(e.g. {no_data[0]}): quantized without")
    for k, n in unweighted.items():
        warnings.append(f"{n} {k} tensor(s) quantized without their importance weights: "
                        f"gguflab has no weighted {k} quantizer yet (llama.cpp uses them)")
    by_reason = Counter(planner.fallback_notes.values())  # one line per kind of fallback
    for note, n in by_reason.items():
        first = next(k for k, v in planner.fallback_notes.items() if v == note)
        warnings.append(f"{n} tensor(s), e.g. {first}: {note}")

    meta = dict(r.metadata)
    ftype = _source_ftype(r) if mix.default_type is None else int(mix.ftype)
    sets = [(Keys.QUANTIZATION_VERSION, Value(ValueType.UINT32, QUANTIZATION_VERSION)),
            (Keys.FILE_TYPE, Value(ValueType.UINT32, ftype))]
    for key in ("split.no", "split.count", "split.tensors.count"):
        meta.pop(key, None)
    sets += list(opts.kv_overrides) + (_imatrix_keys(imp) if imp is not None else [])
    if opts.prune_layers:
        sets.append((Keys.arch(Keys.BLOCK_COUNT, facts.arch), Value(ValueType.UINT32, n_blocks)))
    for key, value in sets:
        meta.pop(key, None)  # llama.cpp's gguf_set_val removes the key and appends it
        meta[key] = value
    return ModelPlan(facts, plans, meta, planner.n_fallback, warnings, info)


def _tensor_importance(imp: Importance, p: TensorPlan, src_name: str) -> np.ndarray | None:
    """The tensor's rows of importance (looked up under its name in the source model), or
    None; a size that does not fit is an error (but for the token embeddings, which go
    without), as in llama-quantize."""
    w = imp.weights.get(src_name)
    if w is None:
        return None
    n_mat = p.ne[2] if len(p.ne) > 2 else 1
    if w.size != p.ne[0] * n_mat:
        if category(p.name) == Category.TOKEN_EMBD:
            return None
        raise UserError(f"imatrix size {w.size} is different from tensor size "
                        f"{p.ne[0] * n_mat} for {p.name}")
    return w.reshape(n_mat, p.ne[0])


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
    for text in plan.info:
        yield Log("info", text)
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
    imp = p.importance
    # with importance weights a slab stays within one expert (each has its own row of them)
    per_mat = n_rows // imp.shape[0] if imp is not None else n_rows
    w.begin_tensor(p.name)
    for a in _slabs(n_rows, per_mat, slab):
        b = min(n_rows, a + slab, (a // per_mat + 1) * per_mat)
        x = to_f32(t, slice(a, b), opts.threads)
        if imp is not None:
            q = qt.quantize(x, opts.threads, imatrix=imp[a // per_mat])
        else:
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


def _slabs(n_rows: int, per_mat: int, slab: int) -> Iterator[int]:
    """First rows of the slabs: `slab` rows each, never crossing a multiple of `per_mat`."""
    for m in range(0, n_rows, per_mat):
        yield from range(m, min(n_rows, m + per_mat), slab)


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
