"""Read the weights of a Hugging Face model folder: memory-mapped, without torch, without
running any code from a pickle.

Two formats:

* safetensors: parsed here (8-byte little-endian header length, JSON header, data), the
  file memory-mapped, tensors handed out as zero-copy views.
* PyTorch zip (`torch.save`'s format since 1.6): `<prefix>/data.pkl` is unpickled by a
  restricted unpickler that knows only the handful of globals a state dict needs and maps
  them to stand-ins that describe tensors lazily (storage, offset, size, stride); every
  other global is refused before anything runs. Storages (`<prefix>/data/<key>`) are
  stored uncompressed by torch, so they too are views of a memory map of the zip.

Every length and offset read off a file is checked against the file before it is used,
so a truncated or hostile file gets a `CheckpointError` naming the file and the cause.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UserError

MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors library's own limit
MAX_PICKLE_BYTES = 256 << 20  # a state dict's data.pkl is ~100 bytes a tensor
MAX_EXPANDED_BYTES = 1 << 30  # a strided tensor with more elements than its storage


class CheckpointError(UserError):
    """Weights that cannot be read: the message names the file (or folder) and the cause."""

    def __init__(self, path: str | os.PathLike, cause: str):
        self.path = os.fspath(path)
        self.cause = cause
        super().__init__(f"{self.path}: {cause}")


class MissingTensorError(CheckpointError, KeyError):
    """`Checkpoint.info`/`load` of a name the checkpoint does not have (also a KeyError)."""

    def __str__(self) -> str:
        return f"{self.path}: {self.cause}"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # as stored: PyTorch / numpy order
    dtype: str  # "F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", ...


# dtype name -> numpy dtype of the array `load` returns (BF16: the raw bits)
NUMPY_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


def load_f32(arr: np.ndarray, dtype: str) -> np.ndarray:
    """A tensor from `Checkpoint.load` as float32 (BF16 bits are shifted into place)."""
    if dtype == "BF16":
        return (np.asarray(arr, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    if dtype not in NUMPY_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}")
    return np.asarray(arr).astype(np.float32, copy=False)


def _mapped(path: str) -> np.ndarray:
    """The whole file as a read-only uint8 array backed by a memory map."""
    try:
        return np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)
    except (OSError, ValueError) as e:
        raise CheckpointError(path, f"cannot map file: {e}") from None


def _file_size(path: str) -> int:
    try:
        if os.path.isdir(path):
            raise CheckpointError(path, "is a folder, not a weight file")
        return os.stat(path).st_size
    except FileNotFoundError:
        raise CheckpointError(path, "no such file") from None
    except PermissionError:
        raise CheckpointError(path, "permission denied") from None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _fits_numpy(shape: tuple[int, ...] | list[int], itemsize: int) -> bool:
    """numpy refuses shapes whose non-zero dims multiply past its index range, even empty."""
    return math.prod(max(d, 1) for d in shape) * itemsize < 1 << 62


# -- safetensors -----------------------------------------------------------------------------


class _SafetensorsFile:
    def __init__(self, path: str):
        self.path = path
        size = _file_size(path)
        if size < 8:
            raise self.fail(f"truncated: {size} bytes, too short for a safetensors header")
        self._mm = _mapped(path)
        (n,) = struct.unpack("<Q", bytes(self._mm[:8]))
        if n > size - 8:
            raise self.fail(
                f"truncated or not safetensors: header length {n} runs past the end of "
                f"the file ({size} bytes)"
            )
        if n > MAX_SAFETENSORS_HEADER:
            raise self.fail(
                f"header of {n} bytes is larger than the {MAX_SAFETENSORS_HEADER} allowed"
            )
        try:
            header = json.loads(
                bytes(self._mm[8 : 8 + n]).decode("utf-8"), object_pairs_hook=self._no_dups
            )
        except (UnicodeDecodeError, ValueError) as e:
            raise self.fail(f"bad safetensors header: {e}") from None
        if not isinstance(header, dict):
            raise self.fail("bad safetensors header: not a JSON object")
        data_start = 8 + n
        data_size = size - data_start
        entries = []
        for name, e in header.items():
            if name == "__metadata__":
                continue
            entries.append(self._entry(name, e, data_start, data_size))
        entries.sort(key=lambda t: t[1])  # file order
        self.entries: dict[str, tuple[TensorInfo, int, int]] = {e[0].name: e for e in entries}

    def fail(self, cause: str) -> CheckpointError:
        return CheckpointError(self.path, cause)

    def _no_dups(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for k, v in pairs:
            if k in d:
                raise ValueError(f"duplicate key {k!r}")
            d[k] = v
        return d

    def _entry(self, name: str, e: Any, data_start: int, data_size: int):
        if not isinstance(e, dict):
            raise self.fail(f"bad safetensors header: entry {name!r} is not an object")
        dtype, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if dtype not in NUMPY_DTYPES:
            raise self.fail(f"tensor {name!r}: unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise self.fail(f"tensor {name!r}: bad shape {shape!r}")
        if not _fits_numpy(shape, NUMPY_DTYPES[dtype].itemsize):
            raise self.fail(f"tensor {name!r}: shape {shape} is too large")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(_is_int(o) for o in offs)
            or not 0 <= offs[0] <= offs[1]
        ):
            raise self.fail(f"tensor {name!r}: bad data_offsets {offs!r}")
        begin, end = offs
        if end > data_size:
            raise self.fail(
                f"tensor {name!r}: data [{begin}, {end}) runs past the end of the data "
                f"({data_size} bytes): truncated?"
            )
        nbytes = math.prod(shape) * NUMPY_DTYPES[dtype].itemsize
        if end - begin != nbytes:
            raise self.fail(
                f"tensor {name!r}: data_offsets span {end - begin} bytes, "
                f"shape {shape} of {dtype} needs {nbytes}"
            )
        return TensorInfo(name, tuple(shape), dtype), data_start + begin, data_start + end

    def load(self, name: str) -> np.ndarray:
        info, begin, end = self.entries[name]
        return self._mm[begin:end].view(NUMPY_DTYPES[info.dtype]).reshape(info.shape)

    def close(self) -> None:
        self._mm = None


# -- PyTorch zip -----------------------------------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": "F32",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "DoubleStorage": "F64",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
}


class _StorageType:
    """Stand-in for `torch.FloatStorage` & co: only ever an argument, never called."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: str):
        self.dtype = dtype

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("a storage type has no state")


_STORAGE_TYPES = {name: _StorageType(dt) for name, dt in _STORAGE_DTYPES.items()}


class _Storage:
    """One `<prefix>/data/<key>` member: where its bytes are and what they hold."""

    __slots__ = ("key", "dtype", "numel", "offset", "nbytes", "member")

    def __init__(self, key: str, dtype: str, numel: int, offset: int | None, nbytes: int, member):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.offset = offset  # absolute offset in the zip file, None when compressed
        self.nbytes = nbytes
        self.member = member  # the ZipInfo, to read a compressed member

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("a storage has no state")


class _LazyTensor:
    """What `_rebuild_tensor_v2` would have built: a strided view of a storage."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("a tensor has no state")

    def contiguous(self) -> bool:
        expect = 1
        for n, s in zip(reversed(self.size), reversed(self.stride)):
            if n != 1 and s != expect:
                return False
            expect *= n
        return True


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> _LazyTensor:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
    if isinstance(size, list):
        size = tuple(size)
    if isinstance(stride, list):
        stride = tuple(stride)
    if (
        not _is_int(storage_offset)
        or storage_offset < 0
        or not isinstance(size, tuple)
        or not isinstance(stride, tuple)
        or len(size) != len(stride)
        or not all(_is_int(n) and n >= 0 for n in size)
        or not all(_is_int(s) and s >= 0 for s in stride)
    ):
        raise pickle.UnpicklingError(
            f"bad tensor geometry: offset {storage_offset!r}, size {size!r}, stride {stride!r}"
        )
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, *_meta
):
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_state):
    if not isinstance(data, _LazyTensor):
        raise pickle.UnpicklingError("parameter rebuilt from something that is not a tensor")
    return data


class _OrderedDict(dict):
    """`collections.OrderedDict` stand-in: a dict that ignores the `_metadata` attribute
    that `state_dict()` hangs on it (pickled as BUILD state)."""

    def __setstate__(self, state: Any) -> None:
        pass


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): st for name, st in _STORAGE_TYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: str, storage):
        super().__init__(io.BytesIO(data))
        self._path = path
        self._storage = storage

    def find_class(self, module: str, name: str) -> Any:
        obj = _ALLOWED_GLOBALS.get((module, name))
        if obj is None:
            if module == "torch" and name.endswith("Storage"):
                raise CheckpointError(
                    self._path, f"unsupported storage type torch.{name} (dtype not handled)"
                )
            raise CheckpointError(
                self._path, f"refusing to load: the pickle asks for {module}.{name}"
            )
        return obj

    def persistent_load(self, pid: Any) -> Any:
        if (
            not isinstance(pid, tuple)
            or len(pid) != 5
            or pid[0] != "storage"
            or not isinstance(pid[1], _StorageType)
            or not isinstance(pid[2], str)
            or not _is_int(pid[4])
            or pid[4] < 0
        ):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.200}")
        return self._storage(pid[2], pid[1].dtype, pid[4])


class _TorchZipFile:
    def __init__(self, path: str):
        self.path = path
        self.size = _file_size(path)
        with open(path, "rb") as f:
            head = f.read(512)
        if not head.startswith(b"PK\x03\x04"):
            if head[:1] == b"\x80" or head[257:262] == b"ustar":
                raise self.fail(
                    "legacy (pre-1.6) PyTorch format is not supported: re-save it with a "
                    "newer torch (torch.save) or convert it to safetensors"
                )
            raise self.fail("not a PyTorch checkpoint (not a zip archive)")
        try:
            with zipfile.ZipFile(path) as zf:
                members = {i.filename: i for i in zf.infolist()}
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise self.fail(f"bad zip archive (truncated?): {e}") from None
        pkls = [n for n in members if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            what = "no <prefix>/data.pkl" if not pkls else f"{len(pkls)} data.pkl files"
            raise self.fail(f"not a torch.save checkpoint: {what}")
        self.prefix = pkls[0][: -len("data.pkl")]
        self.members = members
        self._mm = _mapped(path)
        bo = members.get(self.prefix + "byteorder")
        if bo is not None:
            order = self._read_member(bo, 16).strip()
            if order != b"little":
                raise self.fail(
                    f"byte order {order.decode('ascii', 'replace')!r} is not supported "
                    "(only little-endian)"
                )
        pkl = self._read_member(members[pkls[0]], MAX_PICKLE_BYTES)
        self._storages: dict[str, _Storage] = {}
        try:
            obj = _RestrictedUnpickler(pkl, path, self._storage).load()
        except CheckpointError:
            raise
        except RecursionError:
            raise self.fail("cannot read data.pkl: nested too deeply") from None
        except Exception as e:
            raise self.fail(f"cannot read data.pkl: {type(e).__name__}: {e}") from None
        self.entries: dict[str, tuple[TensorInfo, _LazyTensor]] = {}
        for name, t in self._state_dict(obj).items():
            self._check_extent(name, t)
            self.entries[name] = (TensorInfo(name, t.size, t.storage.dtype), t)

    def fail(self, cause: str) -> CheckpointError:
        return CheckpointError(self.path, cause)

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        """Where a member's bytes start: after its local header (name and extra field)."""
        h = info.header_offset
        if h < 0 or h + 30 > self.size:
            raise self.fail(f"zip member {info.filename}: header runs past the end (truncated?)")
        local = bytes(self._mm[h : h + 30])
        if local[:4] != b"PK\x03\x04":
            raise self.fail(f"zip member {info.filename}: bad local header")
        n_name, n_extra = struct.unpack_from("<HH", local, 26)
        start = h + 30 + n_name + n_extra
        if start + info.compress_size > self.size:
            raise self.fail(
                f"zip member {info.filename}: data runs past the end of the file "
                f"({self.size} bytes): truncated?"
            )
        return start

    def _read_member(self, info: zipfile.ZipInfo, limit: int) -> bytes:
        if info.flag_bits & 1:
            raise self.fail(f"zip member {info.filename} is encrypted")
        if info.file_size > limit:
            raise self.fail(f"zip member {info.filename} is too large ({info.file_size} bytes)")
        start = self._data_offset(info)
        if info.compress_type == zipfile.ZIP_STORED:
            if info.compress_size != info.file_size:
                raise self.fail(f"zip member {info.filename}: stored sizes disagree")
            return bytes(self._mm[start : start + info.file_size])
        try:
            with zipfile.ZipFile(self.path) as zf:
                return zf.read(info)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
            raise self.fail(f"zip member {info.filename}: {e}") from None

    def _storage(self, key: str, dtype: str, numel: int) -> _Storage:
        st = self._storages.get(key)
        if st is not None:
            if st.dtype != dtype or st.numel != numel:
                raise self.fail(f"storage {key!r} is used as both {st.dtype} and {dtype}")
            return st
        info = self.members.get(f"{self.prefix}data/{key}")
        if info is None:
            raise self.fail(f"storage {key!r}: no member {self.prefix}data/{key} in the zip")
        nbytes = numel * NUMPY_DTYPES[dtype].itemsize
        if info.file_size != nbytes:
            raise self.fail(
                f"storage {key!r}: {info.file_size} bytes, {numel} elements of {dtype} need "
                f"{nbytes} (truncated?)"
            )
        if info.flag_bits & 1:
            raise self.fail(f"zip member {info.filename} is encrypted")
        offset = self._data_offset(info)
        stored = info.compress_type == zipfile.ZIP_STORED and info.compress_size == nbytes
        st = _Storage(key, dtype, numel, offset if stored else None, nbytes, info)
        self._storages[key] = st
        return st

    def _state_dict(self, obj: Any) -> dict[str, _LazyTensor]:
        def tensors_only(d: dict) -> bool:
            return bool(d) and all(isinstance(v, _LazyTensor) for v in d.values())

        if not isinstance(obj, dict):
            raise self.fail(f"the pickle holds a {type(obj).__name__}, not a dict of tensors")
        if not tensors_only(obj):
            for k in ("state_dict", "model"):
                inner = obj.get(k)
                if isinstance(inner, dict) and tensors_only(inner):
                    obj = inner
                    break
            else:
                bad = next((k for k, v in obj.items() if not isinstance(v, _LazyTensor)), None)
                what = (
                    "is empty"
                    if bad is None
                    else (f"entry {bad!r:.80} holds a {type(obj[bad]).__name__}")
                )
                raise self.fail(f"expected a dict of tensors (a state dict), but it {what}")
        for k in obj:
            if not isinstance(k, str):
                raise self.fail(f"tensor name {k!r:.80} is not a string")
        return obj

    def _check_extent(self, name: str, t: _LazyTensor) -> None:
        itemsize = NUMPY_DTYPES[t.storage.dtype].itemsize
        if not _fits_numpy(t.size, itemsize):
            raise self.fail(f"tensor {name!r}: size {t.size} is too large")
        if 0 in t.size:
            return
        n = math.prod(t.size)
        if n > t.storage.numel and n * itemsize > MAX_EXPANDED_BYTES:
            raise self.fail(
                f"tensor {name!r}: {n} elements expanded from a storage of "
                f"{t.storage.numel}, too large to materialise"
            )
        last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride))
        if last >= t.storage.numel:
            raise self.fail(
                f"tensor {name!r}: offset {t.offset}, size {t.size}, stride {t.stride} reach "
                f"element {last} of a storage of {t.storage.numel}"
            )

    def load(self, name: str) -> np.ndarray:
        info, t = self.entries[name]
        st = t.storage
        dt = NUMPY_DTYPES[st.dtype]
        if 0 in t.size:
            return np.empty(t.size, dtype=dt)
        if st.offset is not None:
            flat = self._mm[st.offset : st.offset + st.nbytes].view(dt)
        else:  # a compressed member (torch never writes one): read into memory
            flat = np.frombuffer(self._read_member(st.member, st.nbytes), dtype=dt)
        if t.contiguous():
            return flat[t.offset : t.offset + math.prod(t.size)].reshape(t.size)
        strided = np.lib.stride_tricks.as_strided(
            flat[t.offset :],
            shape=t.size,
            strides=tuple(s * dt.itemsize for s in t.stride),
            writeable=False,
        )
        return np.ascontiguousarray(strided)

    def close(self) -> None:
        self._mm = None


# -- finding the weight files ----------------------------------------------------------------

_LOOKED_FOR = (
    "model.safetensors, model.safetensors.index.json, *.safetensors, pytorch_model.bin, "
    "pytorch_model.bin.index.json, pytorch_model*.bin, consolidated.*.pth, *.pt, *.pth"
)


def _files(folder: str, pattern: str) -> list[str]:
    rx = re.compile(pattern)
    try:
        names = os.listdir(folder)
    except OSError as e:
        raise CheckpointError(folder, f"cannot list folder: {e.strerror or e}") from None
    return sorted(n for n in names if rx.fullmatch(n) and os.path.isfile(os.path.join(folder, n)))


def _read_index(folder: str, index: str) -> tuple[list[str], dict[str, str]]:
    """The shards an index.json names (in shard order) and its weight_map."""
    path = os.path.join(folder, index)
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(64 << 20).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(path, f"cannot read index: {e}") from None
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if (
        not isinstance(wm, dict)
        or not wm
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items())
    ):
        raise CheckpointError(path, "index has no weight_map of tensor name -> file")
    shards = sorted(set(wm.values()))
    for s in shards:
        parts = s.replace("\\", "/").split("/")
        if os.path.isabs(s) or ".." in parts or s == "":
            raise CheckpointError(path, f"index names a file outside the folder: {s!r}")
        if not os.path.isfile(os.path.join(folder, s)):
            raise CheckpointError(path, f"index names {s!r}, which is not in the folder")
    return shards, wm


def find_weight_files(folder: str | os.PathLike) -> tuple[list[str], dict[str, str] | None]:
    """The weight files of a model folder, in llama.cpp's order of preference, and the
    index's weight_map when the files came from an index (names relative to the folder)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        if os.path.isfile(folder):  # a single weight file
            return [os.path.basename(folder)], None
        raise CheckpointError(folder, "no such folder")
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return ["model.safetensors"], None
    if os.path.isfile(os.path.join(folder, "model.safetensors.index.json")):
        return _read_index(folder, "model.safetensors.index.json")
    found = _files(folder, r".+\.safetensors")
    if found:
        return found, None
    if os.path.isfile(os.path.join(folder, "pytorch_model.bin")):
        return ["pytorch_model.bin"], None
    if os.path.isfile(os.path.join(folder, "pytorch_model.bin.index.json")):
        return _read_index(folder, "pytorch_model.bin.index.json")
    for pattern in (r"pytorch_model.*\.bin", r"consolidated\..*\.pth", r".+\.pth?"):
        found = _files(folder, pattern)
        if found:
            return found, None
    raise CheckpointError(folder, f"no weights found (looked for {_LOOKED_FOR})")


def _open_file(path: str):
    if path.endswith(".safetensors"):
        return _SafetensorsFile(path)
    return _TorchZipFile(path)


class Checkpoint:
    """The tensors of a model folder (or of one weight file), read lazily and zero-copy.

    Arrays from `load` are read-only views of memory maps where the layout allows; they
    stay valid after `close`."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = os.fspath(folder)
        rel, weight_map = find_weight_files(self.folder)
        base = self.folder if os.path.isdir(self.folder) else os.path.dirname(self.folder)
        self.files: list[str] = [os.path.join(base, r) for r in rel]
        self._sources: list[Any] = []
        self._where: dict[str, Any] = {}
        try:
            for path in self.files:
                src = _open_file(path)
                self._sources.append(src)
                for name in src.entries:
                    other = self._where.get(name)
                    if other is not None:
                        raise CheckpointError(path, f"tensor {name!r} is also in {other.path}")
                    self._where[name] = src
            if weight_map is not None:
                for name, rel_file in weight_map.items():
                    path = os.path.join(base, rel_file)
                    src = self._where.get(name)
                    if src is None or src.path != path:
                        raise CheckpointError(
                            path,
                            f"the index puts tensor {name!r} in this file, but it is "
                            + ("not there" if src is None else f"in {src.path}"),
                        )
        except BaseException:
            self.close()
            raise

    def names(self) -> list[str]:
        return list(self._where)

    def names_by_file(self) -> list[tuple[str, list[str]]]:
        """Each weight file (in the order they were found) with its tensors' names, in the
        file's own order (a safetensors file's data order, a state dict's key order)."""
        return [(src.path, list(src.entries)) for src in self._sources]

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __len__(self) -> int:
        return len(self._where)

    def _src(self, name: str):
        src = self._where.get(name)
        if src is None:
            cause = "checkpoint is closed" if not self._sources else f"no tensor named {name!r}"
            raise MissingTensorError(self.folder, cause)
        return src

    def info(self, name: str) -> TensorInfo:
        return self._src(name).entries[name][0]

    def load(self, name: str) -> np.ndarray:
        return self._src(name).load(name)

    def close(self) -> None:
        for src in self._sources:
            src.close()
        self._sources, self._where = [], {}

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.folder!r}, {len(self.files)} files, {len(self._where)} tensors)"
