"""Read GGUF v2/v3: a thin, validating view over a numpy memmap of the file.

Every count and length read off the file is checked against the bytes that are
left before anything is allocated for it, so a hostile or truncated file gets a
`GGUFError` naming the file and the cause, never a hang or a huge allocation.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UserError
from .constants import (
    DEFAULT_ALIGNMENT,
    GGML_MAX_DIMS,
    GGUF_MAGIC,
    GGUF_VERSIONS_READ,
    VALUE_DTYPES,
    GGMLType,
    Keys,
    TypeInfo,
    ValueType,
    type_info,
)

MAX_ARRAY_DEPTH = 4  # nested arrays deeper than this are refused, no file needs them


class GGUFError(UserError):
    """A GGUF file that cannot be read (or written): the message names the file and the cause."""

    def __init__(self, path: str | os.PathLike, cause: str):
        self.path = os.fspath(path)
        self.cause = cause
        super().__init__(f"{self.path}: {cause}")


@dataclass(frozen=True)
class Value:
    """One typed metadata value. Arrays hold `item_type` items: a numpy array for
    numbers (a zero-copy view when read from a file), a list for strings and arrays."""

    type: ValueType
    value: Any
    item_type: ValueType | None = None

    def to_python(self) -> Any:
        if self.type != ValueType.ARRAY:
            return self.value
        if self.item_type == ValueType.ARRAY:
            return [v.to_python() for v in self.value]
        if isinstance(self.value, np.ndarray):
            if self.item_type == ValueType.BOOL:
                return [bool(x) for x in self.value]
            return self.value.tolist()
        return list(self.value)


class ReaderTensor:
    """A tensor in a GGUF file: name, numpy-order shape, type and its bytes in place."""

    __slots__ = ("name", "shape", "type", "offset", "nbytes", "_mm")

    def __init__(
        self,
        name: str,
        shape: tuple[int, ...],
        type: GGMLType,
        offset: int,
        nbytes: int,
        mm: np.memmap,
    ):
        self.name = name
        self.shape = shape  # numpy order: ggml's ne reversed, rows last
        self.type = type
        self.offset = offset  # absolute offset of the data in the file
        self.nbytes = nbytes
        self._mm = mm

    @property
    def info(self) -> TypeInfo:
        return type_info(self.type)

    @property
    def ne(self) -> tuple[int, ...]:
        """ggml's order: ne[0] is the row length."""
        return tuple(reversed(self.shape))

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def raw(self) -> np.ndarray:
        """The tensor's bytes, a zero-copy uint8 view."""
        return self._mm[self.offset : self.offset + self.nbytes]

    @property
    def data(self) -> np.ndarray:
        """Zero-copy view: elements for float/int types (bf16 as raw uint16), and for
        block-quantized types uint8 rows of `row_bytes` each."""
        info = self.info
        if info.block_size == 1:
            return self.raw.view(info.dtype).reshape(self.shape)
        return self.raw.reshape(*self.shape[:-1], info.row_bytes(self.shape[-1]))

    def __repr__(self) -> str:
        return f"ReaderTensor({self.name!r}, {list(self.ne)}, {self.type.name})"


_U64 = struct.Struct("<Q")


class _Cursor:
    """Bounds-checked little-endian reads from a buffer."""

    def __init__(self, path: str, buf: memoryview, size: int):
        self.path, self.buf, self.size, self.pos = path, buf, size, 0

    def fail(self, cause: str) -> GGUFError:
        return GGUFError(self.path, cause)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(
                f"truncated: {what} needs {n} bytes at offset {self.pos}, "
                f"file has {self.size - self.pos} left"
            )

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v[0] if len(v) == 1 else v

    def u32(self, what: str) -> int:
        return self.unpack("<I", what)

    def u64(self, what: str) -> int:
        return self.unpack("<Q", what)

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        # surrogateescape keeps invalid UTF-8 (some vocabularies have it) byte-exact on rewrite
        return raw.decode("utf-8", "surrogateescape")

    def strings(self, n: int, what: str) -> list[str]:
        """n strings in a row (a vocabulary: the one loop that must be quick)."""
        buf, pos, size, out = self.buf, self.pos, self.size, []
        length = _U64.unpack_from
        for _ in range(n):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, f"length of {what}")
            (k,) = length(buf, pos)
            pos += 8
            if pos + k > size:
                self.pos = pos
                self.need(k, what)
            out.append(str(buf[pos:pos + k], "utf-8", "surrogateescape"))
            pos += k
        self.pos = pos
        return out


class GGUFReader:
    """Parse a GGUF file's header, metadata and tensor infos; tensor data stay on disk."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            size = os.stat(self.path).st_size
            if os.path.isdir(self.path):
                raise GGUFError(self.path, "is a folder, not a GGUF file")
        except FileNotFoundError:
            raise GGUFError(self.path, "no such file") from None
        except PermissionError:
            raise GGUFError(self.path, "permission denied") from None
        if size < 4 + 4 + 8 + 8:
            raise GGUFError(self.path, f"too short to be GGUF ({size} bytes)")
        try:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            raise GGUFError(self.path, f"cannot map file: {e}") from None
        self.file_size = size
        self.metadata: dict[str, Value] = {}
        self.tensors: list[ReaderTensor] = []
        self._parse(_Cursor(self.path, memoryview(self._mm), size))
        self._by_name = {t.name: t for t in self.tensors}

    # -- parsing -------------------------------------------------------------------------

    def _parse(self, c: _Cursor) -> None:
        magic = bytes(c.buf[0:4])
        if magic != GGUF_MAGIC:
            raise c.fail(f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
        c.pos = 4
        version = c.u32("version")
        if version not in GGUF_VERSIONS_READ:
            swapped = struct.unpack("<I", struct.pack(">I", version))[0]
            if swapped in GGUF_VERSIONS_READ:
                raise c.fail("big-endian GGUF is not supported")
            raise c.fail(
                f"unsupported GGUF version {version} (this reads versions "
                f"{', '.join(map(str, GGUF_VERSIONS_READ))})"
            )
        self.version = version
        n_tensors = c.u64("tensor count")
        n_kv = c.u64("metadata count")
        # smallest possible entries: key (8-byte length) + type (4) + a 1-byte value,
        # and name (8) + n_dims (4) + one dim (8) + type (4) + offset (8)
        if n_kv * 13 > c.size - c.pos:
            raise c.fail(f"metadata count {n_kv} cannot fit in the file")
        if n_tensors * 32 > c.size - c.pos:
            raise c.fail(f"tensor count {n_tensors} cannot fit in the file")

        for i in range(n_kv):
            key = c.string(f"key of metadata entry {i}")
            if key in self.metadata:
                raise c.fail(f"duplicate metadata key {key!r}")
            vtype = self._value_type(c, c.u32(f"type of {key}"), key)
            self.metadata[key] = self._value(c, vtype, key, 0)

        align = self.metadata.get(Keys.ALIGNMENT)
        self.alignment = DEFAULT_ALIGNMENT
        if align is not None:
            if (
                align.type != ValueType.UINT32
                or align.value <= 0
                or align.value & (align.value - 1)
            ):
                raise c.fail(f"{Keys.ALIGNMENT} must be a power-of-two uint32, got {align.value!r}")
            self.alignment = int(align.value)

        infos = []
        names = set()
        for i in range(n_tensors):
            name = c.string(f"name of tensor {i}")
            if name in names:
                raise c.fail(f"duplicate tensor name {name!r}")
            names.add(name)
            n_dims = c.u32(f"n_dims of {name}")
            if not 1 <= n_dims <= GGML_MAX_DIMS:
                raise c.fail(
                    f"tensor {name!r} has {n_dims} dimensions (1..{GGML_MAX_DIMS} allowed)"
                )
            ne = [c.u64(f"dimension of {name}") for _ in range(n_dims)]
            raw_type = c.u32(f"type of {name}")
            try:
                info = type_info(raw_type)
            except ValueError as e:
                raise c.fail(f"tensor {name!r}: {e}") from None
            offset = c.u64(f"offset of {name}")
            infos.append((name, ne, info, offset))

        self.data_offset = -(-c.pos // self.alignment) * self.alignment
        for name, ne, info, offset in infos:
            if ne[0] % info.block_size:
                raise c.fail(
                    f"tensor {name!r}: row of {ne[0]} is not a multiple of "
                    f"{info.name}'s block size {info.block_size}"
                )
            if offset % self.alignment:
                raise c.fail(
                    f"tensor {name!r}: data offset {offset} is not aligned to {self.alignment}"
                )
            n_rows = 1
            for d in ne[1:]:
                n_rows *= d
            nbytes = n_rows * info.row_bytes(ne[0])
            start = self.data_offset + offset
            if start + nbytes > self.file_size:
                raise c.fail(
                    f"tensor {name!r}: data [{start}, {start + nbytes}) runs past "
                    f"the end of the file ({self.file_size} bytes): truncated?"
                )
            self.tensors.append(
                ReaderTensor(
                    name, tuple(int(d) for d in reversed(ne)), info.type, start, nbytes, self._mm
                )
            )

    def _value_type(self, c: _Cursor, raw: int, key: str) -> ValueType:
        try:
            return ValueType(raw)
        except ValueError:
            raise c.fail(f"metadata {key!r} has unknown value type {raw}") from None

    def _value(self, c: _Cursor, vtype: ValueType, key: str, depth: int) -> Value:
        if vtype == ValueType.STRING:
            return Value(vtype, c.string(f"value of {key}"))
        if vtype == ValueType.ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise c.fail(f"metadata {key!r}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
            item = self._value_type(c, c.u32(f"item type of {key}"), key)
            n = c.u64(f"length of {key}")
            if item in VALUE_DTYPES:
                dt = VALUE_DTYPES[item]
                c.need(n * dt.itemsize, f"{n} items of {key}")
                arr = np.frombuffer(c.buf, dtype=dt, count=n, offset=c.pos)
                c.pos += n * dt.itemsize
                return Value(vtype, arr, item)
            c.need(n * 8, f"{n} items of {key}")  # every string or array item takes >= 8 bytes
            if item == ValueType.STRING:
                items = c.strings(n, f"item of {key}")
            else:
                items = [self._value(c, item, key, depth + 1) for _ in range(n)]
            return Value(vtype, items, item)
        dt = VALUE_DTYPES[vtype]
        c.need(dt.itemsize, f"value of {key}")
        v = np.frombuffer(c.buf, dtype=dt, count=1, offset=c.pos)[0]
        c.pos += dt.itemsize
        if vtype == ValueType.BOOL:
            return Value(vtype, bool(v))
        return Value(vtype, v.item())

    # -- access --------------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """Metadata value as plain Python (arrays as numpy arrays or lists)."""
        v = self.metadata.get(key)
        return default if v is None else v.value

    @property
    def architecture(self) -> str | None:
        return self.get(Keys.ARCHITECTURE)

    def arch_get(self, key: str, default: Any = None) -> Any:
        """`{arch}.`-templated key (see Keys) for this file's architecture."""
        arch = self.architecture
        return default if arch is None else self.get(Keys.arch(key, arch), default)

    def tensor(self, name: str) -> ReaderTensor:
        try:
            return self._by_name[name]
        except KeyError:
            raise GGUFError(self.path, f"no tensor named {name!r}") from None

    def __iter__(self) -> Iterator[ReaderTensor]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def tensor_data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def release(self, t: ReaderTensor) -> None:
        """Tell the OS this process is done with a tensor's pages, so that streaming through
        a model larger than memory keeps the resident set small (views of it stay valid:
        the pages are read again from the file if touched)."""
        mm = getattr(self._mm, "_mmap", None)
        if mm is None or not hasattr(mm, "madvise"):
            return
        page = mmap.PAGESIZE
        start = t.offset // page * page
        end = min(self.file_size, t.offset + t.nbytes)
        if end > start:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        """Drop this reader's references to the mapping (views handed out keep it alive)."""
        self._by_name, self.tensors, self.metadata, self._mm = {}, [], {}, None

    def __enter__(self) -> GGUFReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
