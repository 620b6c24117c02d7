"""Importance-matrix files as llama.cpp reads and writes them: the GGUF form
(`<name>.in_sum2` + `<name>.counts` tensors, `imatrix.*` keys) and the legacy `.dat`
form (per entry: name, ncall, values already divided and rescaled to ncall chunks)."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError
from ..gguf import GGMLType, GGUFReader, TensorSpec, Value, ValueType, write_gguf
from ..gguf.constants import GGUF_MAGIC
from ..partial import write_whole

KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUFFIX_SUMS = ".in_sum2"
SUFFIX_COUNTS = ".counts"
DEFAULT_CHUNK_SIZE = 512  # llama-imatrix's default context (-c)


@dataclass
class Entry:
    in_sum2: np.ndarray  # float32 (n_mat, n_per_row): sum of x^2 per input column
    counts: np.ndarray  # float32 (n_mat,): tokens that went through each matrix


@dataclass
class Imatrix:
    entries: dict[str, Entry]  # "blk.0.attn_q.weight" -> Entry
    datasets: list[str]
    chunk_count: int
    chunk_size: int
    # A legacy .dat holds per entry (sum/count)*ncall and counts = [ncall], with one flat
    # row (the file does not record n_mat): importance() divides by ncall instead.
    legacy: bool = False
    has_metadata: bool = field(default=True, repr=False)  # GGUF: all three imatrix.* keys

    def importance(self, name: str) -> np.ndarray | None:
        """The weights llama-quantize hands the quantizer for tensor `name`, as its
        load_imatrix computes them: float32 (n_mat, n_per_row), one row per expert (a
        legacy file gives one flat row: reshape it to (-1, n_per_row)); None if absent."""
        e = self.entries.get(name)
        if e is None:
            return None
        sums = np.asarray(e.in_sum2, np.float32)
        if self.legacy:
            ncall = int(e.counts[0]) if len(e.counts) else 0
            return (sums / np.float32(ncall)) if ncall > 0 else sums.copy()
        out = np.empty_like(sums)
        for j, c in enumerate(e.counts):
            c = np.float32(c)
            out[j] = sums[j] / c if c > 0 else np.float32(1)
        return out


def _fail(path: str | os.PathLike, cause: str) -> UserError:
    return UserError(f"{os.fspath(path)}: {cause}")


def load(path: str | os.PathLike) -> Imatrix:
    """Read an imatrix file, GGUF or legacy .dat (told apart by the GGUF magic)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise _fail(path, "no such file") from None
    except IsADirectoryError:
        raise _fail(path, "is a folder, not an imatrix file") from None
    except OSError as e:
        raise _fail(path, f"cannot read: {e.strerror or e}") from None
    if head == GGUF_MAGIC:
        return _load_gguf(path)
    return _load_dat(path)


def _load_gguf(path: str) -> Imatrix:
    with GGUFReader(path) as r:
        pairs: dict[str, list] = {}
        for t in r.tensors:
            for suffix, slot in ((SUFFIX_SUMS, 0), (SUFFIX_COUNTS, 1)):
                if t.name.endswith(suffix) and len(t.name) > len(suffix):
                    pairs.setdefault(t.name[: -len(suffix)], [None, None])[slot] = t
        if not pairs:
            kind = r.get("general.type") or r.architecture or "unknown"
            raise _fail(path, f"is a GGUF file but not an imatrix (no *{SUFFIX_SUMS} tensors; "
                              f"general.type/architecture: {kind})")
        entries = {}
        for name in sorted(pairs):
            sums, counts = pairs[name]
            if sums is None or counts is None:
                raise _fail(path, f"mismatched sums and counts for {name}")
            if sums.type != GGMLType.F32 or counts.type != GGMLType.F32:
                raise _fail(path, f"sums and counts for {name} must be F32")
            s = np.array(sums.data, np.float32).reshape(-1)
            c = np.array(counts.data, np.float32).reshape(-1)
            if len(c) == 0 or len(s) % len(c):
                raise _fail(path, f"{name}: {len(s)} sums do not split into {len(c)} matrices")
            # llama.cpp rounds the stored counts to integers as it reads them
            c = np.round(c.astype(np.float64)).astype(np.float32)
            entries[name] = Entry(s.reshape(len(c), -1), c)
        ds = r.metadata.get(KEY_DATASETS)
        datasets = (
            [str(x) for x in ds.value]
            if ds is not None and ds.type == ValueType.ARRAY and ds.item_type == ValueType.STRING
            else []
        )
        has_meta = all(k in r.metadata for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE))
        return Imatrix(
            entries,
            datasets,
            int(r.get(KEY_CHUNK_COUNT, 0)),
            int(r.get(KEY_CHUNK_SIZE, 0)),
            legacy=False,
            has_metadata=has_meta,
        )


def _load_dat(path: str) -> Imatrix:
    with open(path, "rb") as f:
        buf = f.read()
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(buf):
            raise _fail(path, f"not an imatrix file (neither GGUF nor a legacy .dat: "
                              f"{what} runs past the end)")
        b = buf[pos : pos + n]
        pos += n
        return b

    def i32(what: str) -> int:
        return struct.unpack("<i", take(4, what))[0]

    n_entries = i32("entry count") if len(buf) >= 4 else 0
    if n_entries < 1:
        raise _fail(path, "not an imatrix file (neither GGUF nor a legacy .dat with entries)")
    entries = {}
    for i in range(n_entries):
        n = i32(f"name length of entry {i + 1}")
        if not 0 < n <= 4096:
            raise _fail(path, f"not an imatrix file (entry {i + 1} has a name of {n} bytes)")
        name = take(n, f"name of entry {i + 1}").split(b"\0")[0].decode("utf-8", "replace")
        ncall = i32(f"ncall of {name}")
        nval = i32(f"value count of {name}")
        if nval < 1:
            raise _fail(path, f"not an imatrix file ({name} has {nval} values)")
        vals = np.frombuffer(take(4 * nval, f"values of {name}"), "<f4").astype(np.float32)
        entries[name] = Entry(vals.reshape(1, nval), np.array([ncall], np.float32))
    chunk_count, datasets = 0, []
    if pos < len(buf):  # the trailer (chunk count, dataset name) is optional
        if pos + 4 <= len(buf):
            chunk_count = i32("chunk count")
            if pos + 4 <= len(buf):
                n = i32("dataset name length")
                if n > 0 and pos + n <= len(buf):
                    datasets.append(take(n, "dataset").split(b"\0")[0].decode("utf-8", "replace"))
    return Imatrix(entries, datasets, chunk_count, 0, legacy=True)


def _raw(im: Imatrix, chunk_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Entries as raw (float32 sums (n_mat, n_per_row), int64 counts): a legacy file's
    values and ncall scaled by `chunk_size`, as llama-imatrix does when it loads one."""
    out = {}
    for name, e in im.entries.items():
        if im.legacy:
            ncall = int(e.counts[0])
            out[name] = (
                np.asarray(e.in_sum2, np.float32) * np.float32(chunk_size),
                np.array([ncall * chunk_size], np.int64),
            )
        else:
            c = np.round(np.asarray(e.counts, np.float64)).astype(np.int64)
            out[name] = (np.asarray(e.in_sum2, np.float32), c)
    return out


def combine(ims: list[Imatrix], chunk_size: int = DEFAULT_CHUNK_SIZE) -> Imatrix:
    """Sum several imatrices as `llama-imatrix --in-file A --in-file B -c chunk_size` does:
    sums and counts add per entry (float32 sums, integer counts; a single count broadcasts
    over experts), legacy files are scaled to raw sums by `chunk_size`, datasets
    concatenate, and the chunk count is the largest count over `chunk_size`."""
    if chunk_size <= 0:
        raise UserError(f"chunk size must be positive, got {chunk_size}")
    acc: dict[str, list] = {}
    datasets: list[str] = []
    for k, im in enumerate(ims):
        for name, (s, c) in _raw(im, chunk_size).items():
            cur = acc.get(name)
            if cur is None:
                acc[name] = [s.reshape(-1).copy(), c.copy(), s.shape]
                continue
            vals, counts, shape = cur
            if im.legacy:
                if s.size != vals.size:
                    raise UserError(f"imatrix {k + 1}: {name} has {s.size} values, "
                                    f"the others {vals.size}")
                vals += s.reshape(-1)
                counts += c[0]
                continue
            if s.size != vals.size:
                raise UserError(f"imatrix {k + 1}: mismatched sums size for {name}: "
                                f"{s.size} != {vals.size}")
            if len(counts) == 1 and len(c) > 1:
                counts = np.full(len(c), counts[0], np.int64)
                cur[2] = s.shape
            elif len(c) != len(counts):
                raise UserError(f"imatrix {k + 1}: mismatched counts size for {name}: "
                                f"{len(c)} != {len(counts)}")
            vals += s.reshape(-1)
            counts += c
            cur[1] = counts
        datasets.extend(im.datasets)
    entries = {}
    max_count = 0
    for name in sorted(acc):
        vals, counts, _ = acc[name]
        entries[name] = Entry(vals.reshape(len(counts), -1), counts.astype(np.float32))
        if len(counts):
            max_count = max(max_count, int(counts.max()))
    return Imatrix(entries, datasets, max_count // chunk_size, chunk_size)


def save(im: Imatrix, path: str | os.PathLike, fmt: str = "gguf") -> None:
    """Write `im` as llama-imatrix would (`fmt` "gguf" or "dat"), atomically: into a
    temporary file next to `path`, renamed over it at the end."""
    path = os.fspath(path)
    if fmt not in ("gguf", "dat"):
        raise UserError(f"unknown imatrix format {fmt!r} (use gguf or dat)")
    if not im.entries:
        raise _fail(path, "nothing to save: the imatrix has no entries")
    if fmt == "gguf":
        _save_gguf(im, path)
    else:
        _save_dat(im, path)


def _save_gguf(im: Imatrix, path: str) -> None:
    if im.legacy:
        im = combine([im], im.chunk_size or DEFAULT_CHUNK_SIZE)
    meta = {
        "general.type": "imatrix",
        KEY_DATASETS: Value(ValueType.ARRAY, list(im.datasets), ValueType.STRING),
        KEY_CHUNK_COUNT: Value(ValueType.UINT32, int(im.chunk_count)),
        KEY_CHUNK_SIZE: Value(ValueType.UINT32, int(im.chunk_size)),
    }
    tensors = []
    for name in sorted(im.entries):
        e = im.entries[name]
        counts = np.asarray(e.counts, np.float32).reshape(-1)
        sums = np.ascontiguousarray(e.in_sum2, np.float32).reshape(len(counts), -1)
        # ggml drops trailing dimensions of 1: one matrix gives 1-D tensors
        one = len(counts) == 1
        tensors.append((TensorSpec(name + SUFFIX_SUMS, sums.shape[1:] if one else sums.shape,
                                   GGMLType.F32), sums))
        tensors.append((TensorSpec(name + SUFFIX_COUNTS, (1,) if one else (len(counts), 1),
                                   GGMLType.F32), counts))
    write_gguf(path, meta, tensors, overwrite=True)


def _save_dat(im: Imatrix, path: str) -> None:
    out = [b""]
    n_entries = 0
    for name in sorted(im.entries):
        e = im.entries[name]
        counts = np.round(np.asarray(e.counts, np.float64)).astype(np.int64)
        if im.legacy:
            ncall = int(counts[0])
            vals = np.asarray(e.in_sum2, np.float32).reshape(-1)
        else:
            if len(counts) == 0 or not counts.any():
                continue  # llama-imatrix skips entries with no data at all
            if im.chunk_size <= 0:
                raise _fail(path, "cannot write a .dat without a chunk size")
            cs = im.chunk_size
            ncall = int((counts.max() + cs - 1) // cs)
            sums = np.asarray(e.in_sum2, np.float32).reshape(len(counts), -1)
            vals = np.empty_like(sums)
            for j, c in enumerate(counts):
                # an expert that saw no tokens is stored as 1 (value 1 over count 1)
                v, cf = (sums[j], np.float32(c)) if c else (np.float32(1), np.float32(1))
                vals[j] = (v / cf) * np.float32(ncall)
            vals = vals.reshape(-1)
        b = name.encode()
        out.append(struct.pack("<i", len(b)) + b + struct.pack("<ii", ncall, vals.size))
        out.append(vals.astype("<f4").tobytes())
        n_entries += 1
    out[0] = struct.pack("<i", n_entries)
    out.append(struct.pack("<i", int(im.chunk_count)))
    ds = im.datasets[-1].encode() if im.datasets else b""
    out.append(struct.pack("<i", len(ds)) + ds)
    write_whole(path, b"".join(out), lambda cause: _fail(path, cause))
