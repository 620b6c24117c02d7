"""Write GGUF v3, streaming: header and tensor infos first, then each tensor's data
as the caller produces it, into `NAME.partial`, renamed over NAME only at the end."""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from ..partial import PARTIAL_SUFFIX, PartialFile
from .constants import (
    DEFAULT_ALIGNMENT,
    GGML_MAX_DIMS,
    GGUF_MAGIC,
    GGUF_VERSION_WRITE,
    VALUE_DTYPES,
    GGMLType,
    Keys,
    ValueType,
    tensor_bytes,
    type_info,
)
from .reader import GGUFError, Value


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: numpy-order shape (rows last) and its storage type."""

    name: str
    shape: tuple[int, ...]
    type: GGMLType

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.type, self.shape)


def infer_value(x: Any) -> Value:
    """A typed `Value` for a plain Python/numpy value (ints become INT32 when they fit)."""
    if isinstance(x, Value):
        return x
    if isinstance(x, (bool, np.bool_)):
        return Value(ValueType.BOOL, bool(x))
    if isinstance(x, (int, np.integer)):
        x = int(x)
        return Value(ValueType.INT32 if -(2**31) <= x < 2**31 else ValueType.INT64, x)
    if isinstance(x, (float, np.floating)):
        return Value(ValueType.FLOAT32, float(x))
    if isinstance(x, str):
        return Value(ValueType.STRING, x)
    if isinstance(x, np.ndarray):
        for vt, dt in VALUE_DTYPES.items():
            if dt == x.dtype.newbyteorder("<") and vt != ValueType.BOOL:
                return Value(ValueType.ARRAY, x, vt)
        if x.dtype == np.bool_:
            return Value(ValueType.ARRAY, x.astype(np.uint8), ValueType.BOOL)
        raise TypeError(f"no GGUF array type for numpy dtype {x.dtype}")
    if isinstance(x, (list, tuple)):
        items = list(x)
        if all(isinstance(i, str) for i in items):
            return Value(ValueType.ARRAY, items, ValueType.STRING)
        if all(isinstance(i, (bool, np.bool_)) for i in items) and items:
            return Value(ValueType.ARRAY, np.array(items, np.uint8), ValueType.BOOL)
        if all(isinstance(i, (int, np.integer)) for i in items):
            return Value(ValueType.ARRAY, np.array(items, np.int32), ValueType.INT32)
        if all(isinstance(i, (int, float, np.number)) for i in items):
            return Value(ValueType.ARRAY, np.array(items, np.float32), ValueType.FLOAT32)
        return Value(ValueType.ARRAY, [infer_value(i) for i in items], ValueType.ARRAY)
    raise TypeError(f"no GGUF value type for {type(x).__name__}")


def _pack_string(out: BinaryIO, s: str) -> None:
    b = s.encode("utf-8", "surrogateescape")
    out.write(struct.pack("<Q", len(b)))
    out.write(b)


def _pack_value(out: BinaryIO, v: Value) -> None:
    if v.type == ValueType.STRING:
        _pack_string(out, v.value)
    elif v.type == ValueType.ARRAY:
        item = v.item_type
        out.write(struct.pack("<IQ", item, len(v.value)))
        if item in VALUE_DTYPES:
            out.write(np.asarray(v.value).astype(VALUE_DTYPES[item], copy=False).tobytes())
        elif item == ValueType.STRING:
            for s in v.value:
                _pack_string(out, s)
        else:
            for sub in v.value:
                _pack_value(out, sub if isinstance(sub, Value) else infer_value(sub))
    else:
        out.write(np.array(v.value).astype(VALUE_DTYPES[v.type]).tobytes())


class GGUFWriter:
    """Stream a GGUF file: give every tensor's spec up front, then `write_tensor` each in
    order. Used as a context manager it renames the partial file into place on success
    and deletes it on any error; `path` is never touched until then."""

    def __init__(
        self,
        path: str | os.PathLike,
        metadata: Mapping[str, Any],
        tensors: Sequence[TensorSpec],
        *,
        alignment: int | None = None,
        overwrite: bool = False,
    ):
        self.path = os.fspath(path)
        self.partial = self.path + PARTIAL_SUFFIX
        self.metadata = {k: infer_value(v) for k, v in metadata.items()}
        if alignment is not None and alignment != DEFAULT_ALIGNMENT:
            self.metadata.setdefault(Keys.ALIGNMENT, Value(ValueType.UINT32, alignment))
        al = self.metadata.get(Keys.ALIGNMENT)
        self.alignment = int(al.value) if al is not None else DEFAULT_ALIGNMENT
        if self.alignment <= 0 or self.alignment & (self.alignment - 1):
            raise GGUFError(self.path, f"alignment must be a power of two, got {self.alignment}")
        self.specs = list(tensors)
        self._check_specs()

        parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(parent):
            raise GGUFError(self.path, f"output folder {parent} does not exist")
        if os.path.exists(self.path) and not overwrite:
            raise GGUFError(self.path, "already exists (use --force to overwrite)")
        self._next = 0
        self._out = PartialFile(self.path, lambda cause: GGUFError(self.path, cause))
        self._file: BinaryIO | None = self._out.file
        try:
            self._write_header()
        except OSError as e:
            self.abort()
            raise GGUFError(self.path, f"cannot write: {e.strerror or e}") from None
        except BaseException:
            self.abort()
            raise

    def _check_specs(self) -> None:
        seen = set()
        for s in self.specs:
            if s.name in seen:
                raise GGUFError(self.path, f"duplicate tensor name {s.name!r}")
            seen.add(s.name)
            if not 1 <= len(s.shape) <= GGML_MAX_DIMS:
                raise GGUFError(self.path, f"tensor {s.name!r}: {len(s.shape)} dimensions")
            try:
                type_info(s.type).row_bytes(s.shape[-1])
            except ValueError as e:
                raise GGUFError(self.path, f"tensor {s.name!r}: {e}") from None

    def _pad(self, n: int) -> int:
        return -(-n // self.alignment) * self.alignment

    def _write_header(self) -> None:
        out = io.BytesIO()
        out.write(GGUF_MAGIC)
        out.write(struct.pack("<IQQ", GGUF_VERSION_WRITE, len(self.specs), len(self.metadata)))
        for key, v in self.metadata.items():
            _pack_string(out, key)
            out.write(struct.pack("<I", v.type))
            _pack_value(out, v)
        offset = 0
        self.offsets = []
        for s in self.specs:
            _pack_string(out, s.name)
            out.write(struct.pack("<I", len(s.shape)))
            out.write(struct.pack(f"<{len(s.shape)}Q", *reversed(s.shape)))
            out.write(struct.pack("<IQ", s.type, offset))
            self.offsets.append(offset)
            offset += self._pad(s.nbytes)
        head = out.getvalue()
        self._file.write(head)
        if self.specs:  # no tensors, no data section to align: gguf-py's vocab-only files
            self._file.write(b"\0" * (self._pad(len(head)) - len(head)))
        self.data_offset = self._pad(len(head))

    @property
    def next_spec(self) -> TensorSpec | None:
        return self.specs[self._next] if self._next < len(self.specs) else None

    def write_tensor(self, name: str, data: np.ndarray | bytes | memoryview) -> None:
        """Write the next tensor's bytes (an array in its storage dtype, or raw bytes)."""
        self.begin_tensor(name)
        self.write_part(data)
        self.end_tensor()

    def begin_tensor(self, name: str) -> None:
        """Start the next tensor, whose bytes then come in any number of `write_part`s."""
        spec = self.next_spec
        if spec is None or spec.name != name:
            expected = spec.name if spec else "no more tensors"
            raise GGUFError(self.path, f"tensor {name!r} written out of order (expected {expected})")
        self._written = 0

    def write_part(self, data: np.ndarray | bytes | memoryview) -> None:
        spec = self.next_spec
        if self._file is None:
            raise GGUFError(self.path, "writing was aborted")
        if isinstance(data, np.ndarray):
            if data.dtype.byteorder == ">":
                data = data.astype(data.dtype.newbyteorder("<"))
            buf = memoryview(np.ascontiguousarray(data)).cast("B")
        else:
            buf = memoryview(data).cast("B")
        if self._written + buf.nbytes > spec.nbytes:
            self.abort()  # bytes already in the file would be wrong: nothing more can be written
            raise GGUFError(self.path, self._size_error(spec, self._written + buf.nbytes))
        try:
            self._file.write(buf)
        except OSError as e:
            raise GGUFError(self.path, f"cannot write: {e.strerror or e}") from None
        self._written += buf.nbytes

    def end_tensor(self) -> None:
        spec = self.next_spec
        if self._written != spec.nbytes:
            self.abort()
            raise GGUFError(self.path, self._size_error(spec, self._written))
        try:
            self._file.write(b"\0" * (self._pad(spec.nbytes) - spec.nbytes))
        except OSError as e:
            raise GGUFError(self.path, f"cannot write: {e.strerror or e}") from None
        self._next += 1

    @staticmethod
    def _size_error(spec: TensorSpec, got: int) -> str:
        return (f"tensor {spec.name!r}: got {got} bytes, its shape {list(reversed(spec.shape))} "
                f"as {spec.type.name} takes {spec.nbytes}")

    def finish(self) -> None:
        """Flush and rename the partial file into place. No fsync: like llama.cpp, leave
        writeback to the OS (syncing a multi-GB file costs more than the quantizing)."""
        if self._next != len(self.specs):
            self.abort()
            raise GGUFError(self.path, f"only {self._next} of {len(self.specs)} tensors written")
        self._file = None
        self._out.commit()

    def abort(self) -> None:
        """Close and remove the partial file; the target path is left as it was."""
        self._file = None
        self._out.abort()

    def __enter__(self) -> GGUFWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()


def write_gguf(
    path: str | os.PathLike,
    metadata: Mapping[str, Any],
    tensors: Iterable[tuple[TensorSpec, Any]],
    *,
    alignment: int | None = None,
    overwrite: bool = False,
) -> None:
    """Write a whole file. Each tensor's data may be an array, bytes, or a zero-argument
    callable that produces one, called only when that tensor is written."""
    pairs = list(tensors)
    with GGUFWriter(
        path, metadata, [s for s, _ in pairs], alignment=alignment, overwrite=overwrite
    ) as w:
        for spec, data in pairs:
            w.write_tensor(spec.name, data() if callable(data) else data)
