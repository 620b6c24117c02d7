"""Our reader against gguf-py's on the real SmolLM2 file, and a byte-exact copy."""

from __future__ import annotations

import filecmp

import gguf as ggufpy
import numpy as np
import pytest

from gguflab.gguf import GGMLType, GGUFReader, TensorSpec, ValueType, write_gguf


@pytest.fixture(scope="module")
def ours(smollm2):
    return GGUFReader(smollm2)


@pytest.fixture(scope="module")
def theirs(smollm2):
    return ggufpy.GGUFReader(smollm2)


def test_counts(ours):
    assert len(ours.tensors) == 272
    assert len(ours.metadata) == 33
    assert ours.version == 3 and ours.alignment == 32


def test_metadata_equals_gguf_py(ours, theirs):
    theirs_fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert list(theirs_fields) == list(ours.metadata)
    for key, f in theirs_fields.items():
        v = ours.metadata[key]
        assert v.type == ValueType(int(f.types[0])), key
        if v.type == ValueType.ARRAY:
            assert v.item_type == ValueType(int(f.types[-1])), key
        want = f.contents()
        got = v.to_python()
        if isinstance(want, float):
            assert np.float32(got) == np.float32(want), key
        else:
            assert got == want, key


def test_tensors_equal_gguf_py(ours, theirs):
    assert [t.name for t in ours] == [t.name for t in theirs.tensors]
    for a, b in zip(ours, theirs.tensors):
        assert list(a.ne) == b.shape.tolist()
        assert a.type == GGMLType(int(b.tensor_type))
        assert a.n_elements == b.n_elements and a.nbytes == b.n_bytes
        assert a.offset == b.data_offset
        assert np.array_equal(a.raw, b.data.reshape(-1).view(np.uint8))


def test_views_are_zero_copy_and_shaped(ours):
    emb = ours.tensor("token_embd.weight")
    assert emb.type == GGMLType.Q8_0 and emb.shape == (49152, 576)
    assert emb.data.shape == (49152, 576 // 32 * 34)
    assert not emb.data.flags.owndata
    norm = ours.tensor("output_norm.weight")
    assert norm.data.dtype == np.float32 and norm.data.shape == (576,)


def test_copy_through_writer_is_byte_identical(ours, smollm2, tmp_path):
    out = tmp_path / "copy.gguf"
    write_gguf(out, ours.metadata, [(TensorSpec(t.name, t.shape, t.type), t.raw) for t in ours])
    assert filecmp.cmp(smollm2, out, shallow=False)
