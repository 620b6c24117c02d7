"""Hostile and broken files: always a GGUFError naming the file and the cause."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gguflab.gguf import GGMLType, GGUFError, GGUFReader


@pytest.fixture(scope="module")
def header(smollm2):
    """The real file's header (metadata + tensor infos) and its full size."""
    r = GGUFReader(smollm2)
    with open(smollm2, "rb") as f:
        return f.read(r.data_offset), r.file_size


def _write_sparse(path, head: bytes, size: int) -> None:
    """`head` followed by zeros up to `size`, without writing the zeros."""
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)


def _read(path):
    try:
        return GGUFReader(path)
    except GGUFError as e:
        assert str(path) in str(e)
        return None


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_fuzz_truncation(header, tmp_path, data):
    head, size = header
    cut = data.draw(st.integers(0, len(head) + 4096))
    p = tmp_path / "t.gguf"
    p.write_bytes(head[:cut])
    assert _read(p) is None or cut >= len(head)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_fuzz_byte_flips(header, tmp_path, data):
    head, size = header
    buf = bytearray(head)
    # flips near the start hit counts, types and lengths; anywhere else hits strings and infos
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.one_of(st.integers(0, 256), st.integers(0, len(buf) - 1)))
        buf[pos] = data.draw(st.integers(0, 255))
    p = tmp_path / "f.gguf"
    _write_sparse(p, bytes(buf), size)
    r = _read(p)
    if r is not None:  # whatever parsed must be self-consistent
        for t in r.tensors:
            assert t.offset + t.nbytes <= r.file_size
            assert t.offset % r.alignment == 0


def _header(version=3, n_tensors=0, n_kv=0, magic=b"GGUF"):
    return magic + struct.pack("<IQQ", version, n_tensors, n_kv)


def _kv_string(key: str, value: bytes, declared_len: int | None = None) -> bytes:
    k = key.encode()
    n = len(value) if declared_len is None else declared_len
    return struct.pack("<Q", len(k)) + k + struct.pack("<IQ", 8, n) + value


@pytest.mark.parametrize(
    "blob, cause",
    [
        (b"", "too short"),
        (b"GGML" + bytes(20), "not a GGUF file"),
        (_header(version=1), "unsupported GGUF version 1"),
        (_header(version=4), "unsupported GGUF version 4"),
        (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
        (_header(n_kv=2**63), "metadata count"),
        (_header(n_tensors=2**40), "tensor count"),
        (_header(n_kv=1) + _kv_string("a", b"xy", declared_len=2**62), "truncated"),
        (_header(n_kv=1) + struct.pack("<Q", 2**60) + b"key", "truncated"),
        (
            _header(n_kv=1) + struct.pack("<Q", 1) + b"k" + struct.pack("<I", 99) + bytes(8),
            "unknown value type 99",
        ),
        (
            _header(n_kv=1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 4, 2**61),
            "truncated",
        ),
        (_header(n_kv=2) + _kv_string("a", b"x") + _kv_string("a", b"y"), "duplicate metadata key"),
    ],
)
def test_broken_headers(tmp_path, blob, cause):
    p = tmp_path / "bad.gguf"
    p.write_bytes(blob + bytes(64) if blob else b"")
    with pytest.raises(GGUFError, match=cause) as e:
        GGUFReader(p)
    assert str(p) in str(e.value)


def _one_tensor_file(tmp_path, *, dims=(32, 2), ttype=0, offset=0, n_dims=None, data=256):
    name = b"w"
    info = struct.pack("<Q", len(name)) + name + struct.pack("<I", n_dims or len(dims))
    info += struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", ttype, offset)
    head = _header(n_tensors=1) + info
    head += bytes(-len(head) % 32)
    p = tmp_path / "t.gguf"
    p.write_bytes(head + bytes(data))
    return p


@pytest.mark.parametrize(
    "kwargs, cause",
    [
        (dict(ttype=77), "unknown tensor type id 77"),
        (dict(ttype=31), "Q4_0_4_4 .* was removed"),
        (dict(offset=8), "not aligned"),
        (dict(dims=(32, 2**40)), "runs past the end"),
        (dict(data=100), "runs past the end"),
        (dict(dims=(30, 2), ttype=int(GGMLType.Q4_0)), "not a multiple of Q4_0's block size 32"),
        (dict(dims=(1, 1, 1, 1, 1), n_dims=5), "5 dimensions"),
    ],
)
def test_broken_tensor_infos(tmp_path, kwargs, cause):
    p = _one_tensor_file(tmp_path, **kwargs)
    with pytest.raises(GGUFError, match=cause):
        GGUFReader(p)


def test_good_minimal_file_reads(tmp_path):
    p = _one_tensor_file(tmp_path)
    r = GGUFReader(p)
    assert r.tensor("w").shape == (2, 32) and r.tensor("w").data.dtype == np.float32


def test_bad_alignment_key(tmp_path):
    p = tmp_path / "a.gguf"
    blob = (
        _header(n_kv=1) + struct.pack("<Q", 17) + b"general.alignment" + struct.pack("<II", 4, 48)
    )
    p.write_bytes(blob + bytes(64))
    with pytest.raises(GGUFError, match="power-of-two"):
        GGUFReader(p)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(GGUFError, match="no such file"):
        GGUFReader(tmp_path / "nope.gguf")
    with pytest.raises(GGUFError, match="folder"):
        GGUFReader(tmp_path)
