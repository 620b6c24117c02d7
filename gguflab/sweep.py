"""`gguflab sweep`: quantize one model to several types and measure each against it (size,
bits per weight, perplexity, KL-divergence, speed), so the size/quality trade-off for *this*
model is a table, not llama.cpp's Llama-3-8B hints. With an importance matrix each type is
measured twice, side by side: `Q4_K_M` and `Q4_K_M+imat` (types that cannot be made without
one get only their `+imat` row).

The figures come from the same `quantize_model` and `perplexity` that `gguflab quantize` and
`gguflab perplexity` run: one computation, not two paths. Results are cached next to the
model, keyed by the files' content hashes and the settings, so a re-run measures only what
is new."""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from . import fmt
from .errors import UserError
from .events import Event, Finished, Log, Measured, Progress, Started, TensorDone
from .gguf import GGUFReader, Keys, LlamaFileType
from .partial import write_whole
from .plot import Point, scatter
from .quant.mixes import MIXES, Mix, is_quantized, parse_mix, requires_imatrix

if TYPE_CHECKING:
    from .quant.pipeline import ModelPlan

DEFAULT_TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]
IMAT_SUFFIX = "+imat"  # the label of a type's row quantized with the importance matrix
PP_TOKENS, TG_TOKENS = 64, 32  # the fixed speed run: prompt tokens, then greedy tokens
CACHE_VERSION = 2  # 2: llama-perplexity KLD base files, rows with kld_99 and rms_dp
HASH_BLOCK = 8 << 20
ROW_FIELDS = ("type", "file", "size_bytes", "bpw", "ppl", "ppl_err", "delta_ppl", "mean_kld",
              "kld_err", "kld_99", "rms_dp", "same_top_p", "pp_tps", "tg_tps", "fits", "cached",
              "is_base")
OPTIONAL_FIELDS = ("hellaswag",)  # in every row too, None unless asked for (acc_norm in %)


# -- input ------------------------------------------------------------------------------


def parse_types(text: str | list[str]) -> list[Mix]:
    """Mix names, comma-separated or a list; aliases (Q4_K) become their names, duplicates
    go. Unknown names raise UserError naming the valid ones."""
    names = text.split(",") if isinstance(text, str) else list(text)
    mixes: list[Mix] = []
    for name in (n.strip() for n in names):
        if not name:
            continue
        m = parse_mix(name)
        if m.alias_of:
            m = parse_mix(m.alias_of)
        if m.default_type is None:
            raise UserError(f"{m.name} is not a quantization type to sweep (it copies the input)")
        if m not in mixes:
            mixes.append(m)
    if not mixes:
        raise UserError("no types to sweep (e.g. --types Q8_0,Q4_K_M)")
    return mixes


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'8G', '512M', '8GiB', '1.5G' or plain bytes -> bytes (binary units, as GPUs count)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in _UNITS else (t, "")
    try:
        value = float(num)
    except ValueError:
        raise UserError(f"cannot read {text!r} as a size (e.g. 8G, 512M)") from None
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"size {text!r} must be positive")
    return int(value * _UNITS[unit])


def file_type_name(r: GGUFReader) -> str:
    """The model's type as llama-quantize names it (F16, Q4_K_M, ...)."""
    ft = r.get(Keys.FILE_TYPE)
    if ft is None:
        return "unknown"
    ft = int(ft) & ~LlamaFileType.GUESSED
    for m in MIXES:
        if int(m.ftype) == ft and m.alias_of is None and m.default_type is not None:
            return m.name
    try:
        return LlamaFileType(ft).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return f"ftype {ft}"


# -- the cache --------------------------------------------------------------------------


def _stat_key(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def content_hash(path: str) -> str:
    """BLAKE2b of the whole file. Every byte counts (a sampled hash would miss a changed
    tensor); it costs one read, at disk speed, and `_Cache.hash` remembers it per file
    (size, mtime, inode), as git's index does, so a re-run only stats the file."""
    h = hashlib.blake2b(digest_size=16)
    buf = bytearray(HASH_BLOCK)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


class _Cache:
    """`<stem>.sweep-cache.json`: measured rows by key, and each file's hash by its stat
    (with where a quantized file came from, so it is reused only for the same base)."""

    def __init__(self, path: str, fresh: bool):
        self.path = path
        self.files: dict[str, dict[str, Any]] = {}
        self.rows: dict[str, dict[str, Any]] = {}
        self.kld_base: dict[str, Any] = {}
        if fresh or not os.path.exists(path):
            return
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, ValueError):
            return  # a damaged cache is only a slower run
        if isinstance(d, dict) and d.get("version") == CACHE_VERSION:
            self.files, self.rows = d.get("files", {}), d.get("rows", {})
            self.kld_base = d.get("kld_base", {})

    def hash(self, path: str) -> str:
        path = os.path.abspath(path)
        entry = self.files.get(path)
        stat = _stat_key(path)
        if entry and entry.get("stat") == stat:
            return entry["hash"]
        self.files[path] = {"stat": stat, "hash": content_hash(path)}
        return self.files[path]["hash"]

    def knows(self, path: str) -> bool:
        """Whether `hash(path)` is only a stat (else it reads the whole file)."""
        entry = self.files.get(os.path.abspath(path))
        return bool(entry) and entry.get("stat") == _stat_key(path)

    def made(self, path: str) -> dict[str, Any] | None:
        """Provenance of a file this sweep wrote, if it is still the same file."""
        entry = self.files.get(os.path.abspath(path))
        if entry and os.path.exists(path) and entry.get("stat") == _stat_key(path):
            return entry.get("made")
        return None

    def record_made(self, path: str, made: dict[str, Any]) -> None:
        self.hash(path)
        self.files[os.path.abspath(path)]["made"] = made

    def save(self) -> None:
        _write_atomic(self.path, json.dumps({"version": CACHE_VERSION, "files": self.files,
                                             "rows": self.rows, "kld_base": self.kld_base},
                                            indent=1))


def _write_atomic(path: str, text: str) -> None:
    write_whole(path, text, lambda cause: UserError(f"{path}: {cause}"))


def _key(*parts: Any) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=16).hexdigest()


# -- measuring --------------------------------------------------------------------------


@dataclass
class _Settings:
    """Everything besides the files that a measured figure depends on."""

    text_hash: str
    n_ctx: int
    chunks: int
    threads: int
    n_gpu_layers: int | str  # a count or "auto"
    flash_attn: str  # -fa: on, off or auto


class _Cancelled(Exception):
    pass


def _with_progress(work: Callable[[Callable[[int, int, float], None]], Any],
                   step: Callable[[int, int], Progress]) -> Iterator[Event]:
    """Run `work(on_chunk)` in a thread and yield a Progress per chunk, so a long perplexity
    shows progress and closing the generator stops it at the next chunk boundary."""
    q: queue.Queue = queue.Queue()
    stop = threading.Event()
    result: dict[str, Any] = {}

    def on_chunk(i: int, n: int, ppl: float) -> None:
        if stop.is_set():
            raise _Cancelled
        q.put((i, n))

    def run() -> None:
        try:
            result["value"] = work(on_chunk)
        except BaseException as e:  # handed to the generator's thread
            result["error"] = e
        q.put(None)

    t = threading.Thread(target=run, name="gguflab-sweep", daemon=True)
    t.start()
    try:
        while (item := q.get()) is not None:
            yield step(*item)
    finally:
        stop.set()
        t.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def _hellaswag_acc(model, tok, tasks, n_ctx: int, n_tasks: int,
                   on_task: Callable[[int, int, float], None]) -> float:
    """HellaSwag acc_norm in % as `gguflab perplexity --hellaswag` scores it."""
    from .runner.tasks import iter_hellaswag

    steps = iter_hellaswag(model, lambda s: tok.encode(s, add_special=True,
                                                       parse_special=False),
                           tasks, n_ctx, n_tasks)
    while True:
        try:
            i, n, _ = next(steps)
        except StopIteration as stop:
            return stop.value.acc
        on_task(i, n, 0.0)


def _speed(model, tokens: list[int]) -> tuple[float, float]:
    """Prompt and generation tok/s: one PP_TOKENS batch, then TG_TOKENS greedy steps (every
    step runs, end-of-text or not, so types compare on the same work)."""
    prompt = (tokens * (PP_TOKENS // max(1, len(tokens)) + 1))[:PP_TOKENS]
    warm = model.new_cache(8)  # compile (or load) the batch and the single-token kernels
    model.forward(prompt[:4], warm)
    model.forward(prompt[4:5], warm)
    cache = model.new_cache(PP_TOKENS + TG_TOKENS)
    t0 = time.perf_counter()
    logits = model.forward(prompt, cache)
    pp = PP_TOKENS / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(TG_TOKENS):
        logits = model.forward([int(np.argmax(logits))], cache)
    tg = TG_TOKENS / (time.perf_counter() - t0)
    return pp, tg


def _kv_bytes(r: GGUFReader, n_ctx: int) -> int:
    """The F16 KV cache that -c needs on the GPU next to the weights."""
    from .runner.model import HParams

    hp = HParams.from_gguf(r)
    return 2 * 2 * hp.n_layer * n_ctx * hp.n_head_kv * hp.head_dim


def _bpw(r: GGUFReader) -> float:
    """Bits per weight as llama.cpp reports them: tensor bytes over parameters."""
    n = sum(t.n_elements for t in r.tensors) or 1
    return 8 * sum(t.nbytes for t in r.tensors) / n


def _is_quantized_model(r: GGUFReader) -> bool:
    return any(is_quantized(t.type) for t in r.tensors if len(t.shape) > 1)


def _same_tensors(a: GGUFReader, b: GGUFReader) -> bool:
    return (sorted((t.name, tuple(t.shape)) for t in a.tensors)
            == sorted((t.name, tuple(t.shape)) for t in b.tensors))


# -- the sweep --------------------------------------------------------------------------


def output_paths(model: str, out_dir: str | None) -> tuple[str, str, str, str]:
    """(json, markdown, cache, KLD base) paths for a model's sweep."""
    folder = out_dir or os.path.dirname(os.path.abspath(model))
    stem = os.path.join(folder, os.path.splitext(os.path.basename(model))[0])
    return (stem + ".sweep.json", stem + ".sweep.md", stem + ".sweep-cache.json",
            stem + ".sweep-base.kld")


def quant_path(model: str, mix: Mix, out_dir: str | None, imatrix: bool = False) -> str:
    """`<stem>-<TYPE>.gguf`, or `<stem>-<TYPE>-imat.gguf` quantized with the imatrix."""
    folder = out_dir or os.path.dirname(os.path.abspath(model))
    stem = os.path.splitext(os.path.basename(model))[0]
    return os.path.join(folder, f"{stem}-{mix.name}{'-imat' if imatrix else ''}.gguf")


def plan_needs_imatrix(plan: ModelPlan, mix: Mix) -> bool:
    """Whether quantizing as `plan` says needs an importance matrix: llama.cpp's per-tensor
    rule on every tensor the plan converts."""
    return any(p.converted and requires_imatrix(p.name, p.dst_type, mix) for p in plan.tensors)


def sweep_model(model: str, types: str | list[str], text_file: str | None, n_ctx: int = 512,
                chunks: int = -1, threads: int | None = None, out_dir: str | None = None,
                force: bool = False, n_gpu_layers: int | str = 0,
                vram_bytes: int | None = None, imatrix: str | None = None,
                hellaswag: str | None = None, hellaswag_tasks: int = 400,
                flash_attn: str = "auto") -> Iterator[Event]:
    """Measure `model` and its quantizations to `types`, yielding Started, Log, Progress,
    one Measured(type, row) per row as soon as it is known, then Finished(json_path,
    {"rows", "markdown"}). `force` re-quantizes and re-measures everything. `n_ctx` 0: 512,
    halved (down to 128) while the text is shorter than two chunks, so the shipped text
    works with no arguments. `imatrix`: also measure every type quantized with it (rows
    `TYPE+imat`, files `<stem>-TYPE-imat.gguf`). `hellaswag`: a HellaSwag task file, scored
    as llama-perplexity --hellaswag --hellaswag-tasks `hellaswag_tasks` (column HellaSwag).
    `flash_attn`: llama.cpp's -fa setting for every measurement (part of the cache key)."""
    from .catalog import default_eval_text
    from .jit.parallel import default_threads
    from .quant.pipeline import QuantizeOptions, load_importance, plan_model, quantize_model
    from .runner.load import load_model
    from .runner.model import flash_attn_mode
    from .runner.perplexity import chunks_of, perplexity
    from .runner.tokenizer import Tokenizer

    mixes = parse_types(types)
    if chunks == 0:
        raise UserError("--chunks 0 measures nothing: give a count, or -1 for the whole text")
    if not os.path.isfile(model):
        raise UserError(f"{model}: no such model file")
    if out_dir is not None and not os.path.isdir(out_dir):
        raise UserError(f"{out_dir}: output folder does not exist")
    text_file = text_file or default_eval_text()
    try:
        with open(text_file, "rb") as f:
            text_bytes = f.read()
        text = text_bytes.decode("utf-8")
    except OSError as e:
        raise UserError(f"{text_file}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{text_file}: not UTF-8 text (byte {e.start})") from None

    hs_tasks, hs_extra = None, {}  # the HellaSwag tasks, and what they add to cache keys
    if hellaswag is not None:
        from .runner.tasks import parse_hellaswag

        try:
            with open(hellaswag, "rb") as f:
                hs_bytes = f.read()
        except OSError as e:
            raise UserError(f"{hellaswag}: {e.strerror}") from None
        hs_tasks = parse_hellaswag(hs_bytes, hellaswag)
        hs_extra = {"hellaswag": hashlib.blake2b(hs_bytes, digest_size=16).hexdigest(),
                    "hellaswag_tasks": hellaswag_tasks}
    base_reader = GGUFReader(model)
    tok = Tokenizer.from_gguf(base_reader)
    tokens = tok.encode(text, add_special=True, parse_special=False)  # as `perplexity` does
    if n_ctx <= 0:
        n_ctx = 512
        while n_ctx > 128 and len(tokens) < 2 * n_ctx:
            n_ctx //= 2
    n_chunk = chunks_of(tokens, n_ctx, chunks)  # too short a text fails here, before any work
    requant = _is_quantized_model(base_reader)
    opts = QuantizeOptions(allow_requantize=requant, threads=threads, overwrite=force)
    imat_opts = imat_hash = None
    if imatrix is not None:
        if not os.path.isfile(imatrix):
            raise UserError(f"{imatrix}: no such imatrix file")
        imat_opts = QuantizeOptions(allow_requantize=requant, threads=threads,
                                    overwrite=force, imatrix=load_importance(imatrix))
    # (mix, with the imatrix): every type must be possible before the first is written
    variants: list[tuple[Mix, bool]] = []
    for m in mixes:
        if imat_opts is None:
            plan_model(base_reader, m, opts)
            variants.append((m, False))
            continue
        if not plan_needs_imatrix(plan_model(base_reader, m, replace(opts, dry_run=True)), m):
            plan_model(base_reader, m, opts)
            variants.append((m, False))
        plan_model(base_reader, m, imat_opts)
        variants.append((m, True))

    json_path, md_path, cache_path, kld_path = output_paths(model, out_dir)
    settings = _Settings(hashlib.blake2b(text_bytes, digest_size=16).hexdigest(), n_ctx,
                         n_chunk, threads or default_threads(), n_gpu_layers,
                         flash_attn_mode(flash_attn))
    cache = _Cache(cache_path, fresh=force)
    if imatrix is not None:
        imat_hash = cache.hash(imatrix)
    base_name = file_type_name(base_reader)
    steps = n_chunk + 2  # per row: quantize, the chunks, the speed run
    total = steps * (1 + len(variants))
    done = 0
    labels = [m.name + (IMAT_SUFFIX if with_imat else "") for m, with_imat in variants]
    yield Started("sweep", os.path.abspath(model), json_path, total,
                  info={"types": labels, "base_type": base_name, "imatrix": imatrix,
                        "n_ctx": n_ctx, "chunks": n_chunk, "n_tokens": len(tokens),
                        "text": os.path.abspath(text_file)})
    if requant:
        yield Log("warning", f"{os.path.basename(model)} is already quantized ({base_name}): "
                             "the types are requantized from it, so their quality is worse "
                             "than from an F16/BF16/F32 original, and the base is not lossless")
    def measure(path: str, label: str, base_path: str | None, save_base: str | None):
        """One perplexity run (with KLD against the base when `base_path`) and the speed."""
        lm = load_model(path, max(n_ctx, PP_TOKENS + TG_TOKENS), n_gpu_layers)
        m = lm.model
        m.flash_attn = settings.flash_attn
        if lm.plan is not None:  # as `-ngl` in run and perplexity: the last layers on the GPU
            yield Log("info", f"{label}: {lm.plan.summary()}")
        res = yield from _with_progress(
            lambda on_chunk: perplexity(m, tokens, n_ctx, add_bos=tok.add_bos,
                                        bos_id=tok.bos_id, n_chunks=n_chunk,
                                        base_path=base_path, save_base=save_base,
                                        on_chunk=on_chunk),
            lambda i, n: Progress(done + 1 + i, total))
        yield Log("info", f"{label}: speed run ({PP_TOKENS}-token prompt, {TG_TOKENS} tokens)")
        pp, tg = _speed(m, tokens)
        if hs_tasks is not None:
            yield Log("info", f"{label}: HellaSwag over {min(hellaswag_tasks, len(hs_tasks))} "
                              "tasks")
            hs = yield from _with_progress(
                lambda on_chunk: _hellaswag_acc(m, tok, hs_tasks, n_ctx, hellaswag_tasks,
                                                on_chunk),
                lambda i, n: Progress(done, total))
            res.hellaswag = hs
        return res, pp, tg, m.reader

    def row_of(label: str, path: str, r: GGUFReader, res, pp: float, tg: float,
               is_base: bool) -> dict[str, Any]:
        k = res.kld or {"mean_kld": 0.0, "kld_err": 0.0, "same_top_p": 1.0, "delta_ppl": 0.0,
                        "kld_99": 0.0, "rms_dp": 0.0}
        return {"type": label, "file": os.path.abspath(path), "size_bytes": os.path.getsize(path),
                "bpw": _bpw(r),
                "ppl": res.ppl, "ppl_err": res.ppl_err, "delta_ppl": k["delta_ppl"],
                "mean_kld": k["mean_kld"], "kld_err": k["kld_err"], "kld_99": k["kld_99"],
                "rms_dp": k["rms_dp"], "same_top_p": k["same_top_p"], "pp_tps": pp, "tg_tps": tg,
                "is_base": is_base, "hellaswag": getattr(res, "hellaswag", None)}

    kv_bytes = _kv_bytes(base_reader, n_ctx)  # the same shapes in every type

    def finish_row(row: dict[str, Any], cached: bool) -> dict[str, Any]:
        row = dict(row, cached=cached)
        row.setdefault("hellaswag", None)  # a row cached before the column existed
        row["fits"] = None if vram_bytes is None else row["size_bytes"] + kv_bytes <= vram_bytes
        return row

    # the base: its perplexity, and its log-probs saved once for every type's KLD
    if not cache.knows(model):
        yield Log("info", f"hashing {os.path.basename(model)} "
                          f"({fmt.size(os.path.getsize(model))}, once) for the cache")
    base_hash = cache.hash(model)
    base_key = _key("base", base_hash, vars(settings) | hs_extra)
    rows: list[dict[str, Any]] = []
    kld_ok = (cache.kld_base.get("key") == base_key and os.path.exists(kld_path)
              and cache.kld_base.get("stat") == _stat_key(kld_path))
    cached_base = cache.rows.get(base_key)
    if cached_base is None or not kld_ok:
        yield Log("info", f"{base_name} (base): perplexity over {n_chunk} chunks of {n_ctx}")
        res, pp, tg, _ = yield from measure(model, base_name, None, kld_path)
        cached_base = row_of(base_name, model, base_reader, res, pp, tg, True)
        cache.rows[base_key] = cached_base
        cache.kld_base = {"key": base_key, "stat": _stat_key(kld_path)}
        cache.save()
        base_row = finish_row(cached_base, False)
    else:
        base_row = finish_row(cached_base, True)
    rows.append(base_row)
    done += steps
    yield Progress(done, total)
    yield Measured(base_name, base_row)

    for (mix, with_imat), label in zip(variants, labels):
        path = quant_path(model, mix, out_dir, with_imat)
        made = cache.made(path)
        expected = {"from": base_hash, "mix": mix.name}
        if with_imat:  # the imatrix's hash is part of what the file is
            expected = {**expected, "mix": label, "imatrix": imat_hash}
        # a file this sweep made with another imatrix (or base) is its own to replace
        stale = with_imat and made is not None and made.get("mix") == label and made != expected
        if force or stale or not os.path.exists(path):
            yield Log("info", f"{label}: quantizing to {os.path.basename(path)}")
            q_opts = imat_opts if with_imat else opts
            if stale:
                q_opts = replace(q_opts, overwrite=True)
            with closing(quantize_model(model, path, mix, q_opts)) as job:  # cancel: no partial
                for ev in job:
                    if (isinstance(ev, Log) and ev.level != "info"
                            and not ev.text.startswith("requantizing")):  # said once above
                        yield Log(ev.level, f"{label}: {ev.text}")
                    elif isinstance(ev, TensorDone):
                        yield Progress(done, total)  # a point where a cancel can land
            cache.record_made(path, expected)
            cache.save()
        elif made is None or made != expected:
            _check_reusable(path, mix, base_reader, with_imat)
            yield Log("warning", f"{label}: reusing {os.path.basename(path)}, which this "
                                 "sweep did not write (same file type and tensors); --force "
                                 "requantizes it")
        done += 1
        q_hash = cache.hash(path)
        key = (_key("quant", q_hash, base_hash, vars(settings) | hs_extra, imat_hash)
               if with_imat else _key("quant", q_hash, base_hash, vars(settings) | hs_extra))
        cached_row = cache.rows.get(key)
        if cached_row is None:
            if not (os.path.exists(kld_path) and cache.kld_base.get("key") == base_key):
                raise UserError(f"{kld_path}: the base's log-probs went missing during the "
                                "sweep")
            yield Log("info", f"{label}: perplexity and KL-divergence")
            res, pp, tg, r = yield from measure(path, label, kld_path, None)
            cached_row = row_of(label, path, r, res, pp, tg, False)
            cache.rows[key] = cached_row
            cache.save()
            row = finish_row(cached_row, False)
        else:
            row = finish_row(cached_row, True)
        rows.append(row)
        done = steps * len(rows)
        yield Progress(done, total)
        yield Measured(label, row)

    info = {"model": os.path.abspath(model), "base_type": base_name,
            "text": os.path.abspath(text_file), "text_hash": settings.text_hash,
            "n_ctx": n_ctx, "chunks": n_chunk, "n_tokens": len(tokens),
            "threads": settings.threads, "n_gpu_layers": n_gpu_layers,
            "flash_attn": settings.flash_attn,
            "imatrix": os.path.abspath(imatrix) if imatrix else None,
            "vram_bytes": vram_bytes, "speed_run": {"prompt": PP_TOKENS, "generate": TG_TOKENS}}
    _write_atomic(json_path, json.dumps({**info, "rows": rows}, indent=1) + "\n")
    _write_atomic(md_path, render_markdown(rows, info))
    yield Finished(json_path, {"rows": rows, "markdown": md_path, "cache": cache_path})


def _check_reusable(path: str, mix: Mix, base: GGUFReader, with_imatrix: bool = False) -> None:
    """A quantized file the sweep did not write is used only when it looks like `mix` of
    this model (made with an imatrix when `with_imatrix`); anything else is the user's and
    is not overwritten."""
    try:
        r = GGUFReader(path)
    except UserError as e:
        raise UserError(f"{path}: exists and is not usable ({e}); move it or use --force") \
            from None
    ft = r.get(Keys.FILE_TYPE)
    if ft is None or int(ft) != int(mix.ftype) or not _same_tensors(r, base):
        raise UserError(f"{path}: exists but is not {mix.name} of this model; move it or use "
                        "--force to replace it")
    if with_imatrix and r.get("quantize.imatrix.file") is None:
        raise UserError(f"{path}: exists but was not quantized with an imatrix; move it or use "
                        "--force to replace it")


# -- rendering --------------------------------------------------------------------------


def _short_size(n: int) -> str:
    """llama-quantize's help style: 3.80G; M below a GiB so small models read too."""
    return f"{n / (1 << 30):5.2f}G" if n >= 1 << 30 else f"{n / (1 << 20):6.2f}M"


def help_line(row: dict[str, Any]) -> str:
    """One row as llama-quantize's help lists a type: `Q4_K_M :  3.80G, +0.0532 ppl`."""
    line = f"{row['type']:8s}: {_short_size(row['size_bytes'])}"
    if row["is_base"]:
        line += f", ppl {row['ppl']:.4f} (base)"
    else:
        line += f", {row['delta_ppl']:+.4f} ppl, KLD {row['mean_kld']:.6f}"
    if row.get("hellaswag") is not None:
        line += f", HellaSwag {row['hellaswag']:.2f}%"
    return line + (" (cached)" if row["cached"] else "")


def _cells(row: dict[str, Any]) -> list[str]:
    fits = {None: "", True: "yes", False: "no"}[row["fits"]]
    return [row["type"] + (" (base)" if row["is_base"] else ""), fmt.size(row["size_bytes"]),
            f"{row['bpw']:.2f}", f"{row['ppl']:.4f} ± {row['ppl_err']:.4f}",
            f"{row['delta_ppl']:+.4f}", f"{row['mean_kld']:.6f}", f"{row['kld_99']:.6f}",
            f"{100 * row['rms_dp']:.3f}%",
            f"{100 * row['same_top_p']:.2f}%", f"{row['pp_tps']:.1f}", f"{row['tg_tps']:.1f}",
            "" if row.get("hellaswag") is None else f"{row['hellaswag']:.2f}%", fits]


HEADERS = ["type", "size", "bpw", "ppl", "Δppl", "mean KLD", "KLD 99%", "RMS Δp", "same top",
           "pp tok/s", "tg tok/s", "HellaSwag", "fits"]
OPTIONAL = {"fits": "fits", "HellaSwag": "hellaswag"}  # columns shown when a row has them


def _shown(rows: list[dict[str, Any]]) -> list[bool]:
    return [h not in OPTIONAL or any(r.get(OPTIONAL[h]) is not None for r in rows)
            for h in HEADERS]


def render_table(rows: list[dict[str, Any]]) -> str:
    """The sweep as aligned columns for the terminal."""
    show = _shown(rows)
    table = [[c for c, s in zip(HEADERS, show) if s]]
    table += [[c for c, s in zip(_cells(r), show) if s] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    out = []
    for n, line in enumerate(table):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(line, widths))).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def render_markdown(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    show = _shown(rows)
    head = [h for h, s in zip(HEADERS, show) if s]
    lines = [f"# Sweep of {os.path.basename(info['model'])}", "",
             f"Base: {info['base_type']}. Text: {os.path.basename(info['text'])} "
             f"({info['n_tokens']} tokens), {info['chunks']} chunks of {info['n_ctx']}. "
             f"Speed: {PP_TOKENS}-token prompt, {TG_TOKENS} greedy tokens, "
             f"{info['threads']} threads."
             + (f" Imatrix: {os.path.basename(info['imatrix'])} (rows +imat)."
                if info.get("imatrix") else ""), "",
             "| " + " | ".join(head) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(c for c, s in zip(_cells(r), show) if s) + " |")
    if len(rows) > 1:
        lines += ["", "```text", plot_rows(rows, "kld"), "```"]
    return "\n".join(lines) + "\n"


def plot_rows(rows: list[dict[str, Any]], metric: str = "kld", width: int = 64,
              height: int = 14) -> str:
    """Size (x) against mean KLD (log scale) or Δppl (y), one labelled point per type;
    '*' fits the GPU memory given, 'o' does not, '+' when none was given."""
    if metric not in ("kld", "ppl"):
        raise UserError(f"unknown plot metric {metric!r}: use kld or ppl")
    quant = [r for r in rows if not r["is_base"]]
    key = "mean_kld" if metric == "kld" else "delta_ppl"
    points = [Point(r["size_bytes"] / (1 << 20), r[key], r["type"], r["fits"]) for r in quant]
    log_y = metric == "kld" and all(p.y > 0 for p in points)
    text = scatter(points, "size (MiB)", "mean KLD vs base" if metric == "kld"
                   else "Δppl vs base", width, height, log_y=log_y)
    if any(r["fits"] is not None for r in quant):
        text += "\n* fits the GPU memory given   o does not"
    return text
