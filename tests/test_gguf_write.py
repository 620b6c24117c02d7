"""Files we write read back identically with gguf-py, and gguf-py's files with ours;
writing is atomic."""

from __future__ import annotations

import os

import gguf as ggufpy
import numpy as np
import pytest

from gguflab.gguf import (
    GGMLType,
    GGUFError,
    GGUFReader,
    GGUFWriter,
    TensorSpec,
    Value,
    ValueType,
    tensor_bytes,
    write_gguf,
)

VT = ValueType
METADATA = {
    "general.architecture": Value(VT.STRING, "llama"),
    "test.u8": Value(VT.UINT8, 255),
    "test.i8": Value(VT.INT8, -128),
    "test.u16": Value(VT.UINT16, 65535),
    "test.i16": Value(VT.INT16, -32768),
    "test.u32": Value(VT.UINT32, 2**32 - 1),
    "test.i32": Value(VT.INT32, -(2**31)),
    "test.u64": Value(VT.UINT64, 2**64 - 1),
    "test.i64": Value(VT.INT64, -(2**63)),
    "test.f32": Value(VT.FLOAT32, 0.1),
    "test.f64": Value(VT.FLOAT64, 1e300),
    "test.bool": Value(VT.BOOL, True),
    "test.string": Value(VT.STRING, "héllo ✓ \n"),
    "test.empty": Value(VT.STRING, ""),
    "test.arr_str": Value(VT.ARRAY, ["a", "", "Ġthe", "<0x0A>"], VT.STRING),
    "test.arr_i32": Value(VT.ARRAY, np.array([1, -2, 3], np.int32), VT.INT32),
    "test.arr_f32": Value(VT.ARRAY, np.array([0.5, -1.25], np.float32), VT.FLOAT32),
    "test.arr_u8": Value(VT.ARRAY, np.arange(10, dtype=np.uint8), VT.UINT8),
    "test.arr_bool": Value(VT.ARRAY, np.array([1, 0, 1], np.uint8), VT.BOOL),
    "test.arr_empty": Value(VT.ARRAY, np.zeros(0, np.int64), VT.INT64),
}


def _tensors(rng):
    f32 = rng.standard_normal((3, 64)).astype(np.float32)
    f16 = rng.standard_normal((2, 5, 32)).astype(np.float16)
    q8 = rng.integers(0, 256, tensor_bytes(GGMLType.Q8_0, (4, 64)), dtype=np.uint8)
    q4k = rng.integers(0, 256, tensor_bytes(GGMLType.Q4_K, (2, 256)), dtype=np.uint8)
    norm = rng.standard_normal(7).astype(np.float32)
    return [
        (TensorSpec("a.f32", (3, 64), GGMLType.F32), f32),
        (TensorSpec("b.f16", (2, 5, 32), GGMLType.F16), f16),
        (TensorSpec("c.q8_0", (4, 64), GGMLType.Q8_0), q8),
        (TensorSpec("d.q4_k", (2, 256), GGMLType.Q4_K), q4k),
        (TensorSpec("e.norm", (7,), GGMLType.F32), norm),
    ]


@pytest.mark.parametrize("alignment", [32, 64, 8])
def test_gguf_py_reads_what_we_write(tmp_path, alignment):
    tensors = _tensors(np.random.default_rng(1))
    path = tmp_path / "ours.gguf"
    write_gguf(path, METADATA, tensors, alignment=alignment)
    r = ggufpy.GGUFReader(path)
    fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    if alignment != 32:
        assert fields.pop("general.alignment").contents() == alignment
    assert list(fields) == list(METADATA)
    for k, v in METADATA.items():
        f = fields[k]
        assert int(f.types[0]) == v.type, k
        want = v.to_python()
        got = f.contents()
        if v.type == VT.FLOAT32:
            assert np.float32(got) == np.float32(want)
        elif v.type == VT.ARRAY and v.item_type == VT.FLOAT32:
            assert np.array_equal(np.float32(got), np.float32(want))
        elif v.type == VT.ARRAY and v.item_type == VT.BOOL:
            assert [bool(x) for x in got] == want
        else:
            assert got == want, k
    assert [t.name for t in r.tensors] == [s.name for s, _ in tensors]
    for t, (spec, data) in zip(r.tensors, tensors):
        assert t.shape.tolist() == list(reversed(spec.shape))
        assert int(t.tensor_type) == spec.type
        assert t.data_offset % alignment == 0
        assert t.data.tobytes() == data.tobytes()


def test_we_read_what_gguf_py_writes(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "theirs.gguf"
    w = ggufpy.GGUFWriter(path, "llama")
    w.add_uint32("llama.block_count", 3)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_string("general.name", "tiny")
    w.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "a"])
    w.add_array("tokenizer.ggml.scores", [0.0, -1.5, 2.0])
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    x = rng.standard_normal((8, 32)).astype(np.float32)
    h = rng.standard_normal((4, 64)).astype(np.float16)
    w.add_tensor("x", x)
    w.add_tensor("h", h)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    r = GGUFReader(path)
    assert r.get("general.architecture") == "llama"
    assert r.metadata["llama.block_count"] == Value(VT.UINT32, 3)
    assert r.metadata["llama.rope.freq_base"].type == VT.FLOAT32
    assert r.metadata["tokenizer.ggml.tokens"].value == ["<s>", "</s>", "a"]
    assert r.metadata["tokenizer.ggml.scores"].value.tolist() == [0.0, -1.5, 2.0]
    assert r.get("tokenizer.ggml.add_bos_token") is True
    assert np.array_equal(r.tensor("x").data, x)
    assert np.array_equal(r.tensor("h").data, h)
    assert r.tensor("h").shape == (4, 64)


def test_no_tensors_same_bytes_as_gguf_py(tmp_path):
    """A file of metadata only (a vocab) ends after its metadata, unpadded, as gguf-py
    writes it (and llama.cpp's converter with --vocab-only)."""
    theirs = tmp_path / "theirs.gguf"
    w = ggufpy.GGUFWriter(theirs, "llama")
    w.add_string("general.name", "vocab")
    w.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "abc"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    ours = tmp_path / "ours.gguf"
    write_gguf(ours, {"general.architecture": "llama", "general.name": "vocab",
                      "tokenizer.ggml.tokens": ["<s>", "</s>", "abc"]}, [])
    assert ours.read_bytes() == theirs.read_bytes()
    assert GGUFReader(ours).get("tokenizer.ggml.tokens") == ["<s>", "</s>", "abc"]


def test_error_midway_leaves_nothing_and_keeps_existing(tmp_path):
    target = tmp_path / "model.gguf"
    target.write_bytes(b"precious")
    specs = [TensorSpec("a", (4, 32), GGMLType.F32), TensorSpec("b", (4, 32), GGMLType.F32)]
    with pytest.raises(RuntimeError):
        with GGUFWriter(target, {"general.architecture": "llama"}, specs, overwrite=True) as w:
            w.write_tensor("a", np.zeros((4, 32), np.float32))
            assert os.path.exists(str(target) + ".partial")
            raise RuntimeError("cancelled")
    assert target.read_bytes() == b"precious"
    assert os.listdir(tmp_path) == ["model.gguf"]


def test_refuses_to_overwrite_without_force(tmp_path):
    target = tmp_path / "model.gguf"
    target.write_bytes(b"precious")
    with pytest.raises(GGUFError, match="already exists"):
        GGUFWriter(target, {}, [])
    assert target.read_bytes() == b"precious"


def test_missing_output_folder(tmp_path):
    with pytest.raises(GGUFError, match="does not exist"):
        GGUFWriter(tmp_path / "nope" / "m.gguf", {}, [])


def test_wrong_order_is_refused(tmp_path):
    specs = [TensorSpec("a", (2, 32), GGMLType.Q8_0), TensorSpec("b", (3,), GGMLType.F32)]
    with GGUFWriter(tmp_path / "m.gguf", {}, specs) as w:
        with pytest.raises(GGUFError, match="out of order"):
            w.write_tensor("b", np.zeros(3, np.float32))
        w.begin_tensor("a")
        w.write_part(b"\0" * 34)  # a tensor may come in parts
        w.write_part(b"\0" * 34)
        w.end_tensor()
        w.write_tensor("b", np.zeros(3, np.float32))
    assert GGUFReader(tmp_path / "m.gguf").tensor("a").nbytes == 68


@pytest.mark.parametrize("n", [67, 69])
def test_wrong_size_aborts(tmp_path, n):
    specs = [TensorSpec("a", (2, 32), GGMLType.Q8_0)]
    with pytest.raises(GGUFError, match="takes 68"):
        with GGUFWriter(tmp_path / "m.gguf", {}, specs) as w:
            w.write_tensor("a", b"\0" * n)
    assert not os.listdir(tmp_path)


def test_row_not_multiple_of_block(tmp_path):
    with pytest.raises(GGUFError, match="multiple of 32"):
        GGUFWriter(tmp_path / "m.gguf", {}, [TensorSpec("a", (2, 48), GGMLType.Q4_0)])
    assert not os.listdir(tmp_path)


def test_unfinished_file_is_not_renamed(tmp_path):
    specs = [TensorSpec("a", (2,), GGMLType.F32)]
    with pytest.raises(GGUFError, match="only 0 of 1"):
        with GGUFWriter(tmp_path / "m.gguf", {}, specs):
            pass
    assert not os.listdir(tmp_path)
