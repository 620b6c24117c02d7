"""The model browser's scan (no Textual): what it finds in folders, checked against gguf-py
and the files on disk."""

from __future__ import annotations

import json
import os

import gguf as ggufpy
import numpy as np
import pytest

from gguflab.gguf import GGUFReader, TensorSpec, Value, ValueType, write_gguf
from gguflab.synth import SynthConfig, write_synthetic_llama
from gguflab.tui.scan import default_model_dirs, model_details, scan_models

TINY = SynthConfig(n_layer=1, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, n_vocab=96)


def _params(path: str) -> int:
    return sum(int(t.n_elements) for t in ggufpy.GGUFReader(path).tensors)


def _file_type(path: str) -> str:
    ft = int(ggufpy.GGUFReader(path).fields["general.file_type"].contents())
    return ggufpy.LlamaFileType(ft).name.removeprefix("MOSTLY_")


@pytest.fixture
def folder(tmp_path):
    write_synthetic_llama(tmp_path / "tiny.gguf", TINY)
    (tmp_path / "broken.gguf").write_bytes(b"this is not a model at all, just text")
    (tmp_path / "notes.txt").write_text("not a model")
    return tmp_path


def test_gguf_rows_match_gguf_py(folder):
    entries = scan_models([str(folder)])
    assert [e.name for e in entries] == ["broken.gguf", "tiny.gguf"]
    tiny = entries[1]
    path = str(folder / "tiny.gguf")
    assert (tiny.kind, tiny.path, tiny.writing) == ("gguf", path, False)
    assert tiny.arch == ggufpy.GGUFReader(path).fields["general.architecture"].contents()
    assert tiny.n_params == _params(path)
    assert tiny.type_name == _file_type(path)
    assert tiny.size_bytes == os.path.getsize(path)


def test_corrupt_files_are_error_rows_with_one_line(folder):
    real = folder / "tiny.gguf"
    (folder / "truncated.gguf").write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    by_name = {e.name: e for e in scan_models([str(folder)])}
    for name in ("broken.gguf", "truncated.gguf"):
        e = by_name[name]
        with pytest.raises(Exception) as err:  # the reader's own verdict is the oracle
            GGUFReader(str(folder / name))
        assert e.kind == "error" and e.error and "\n" not in e.error
        assert e.error == err.value.cause
        assert e.size_bytes == (folder / name).stat().st_size
    assert "not a GGUF file" in by_name["broken.gguf"].error
    assert "truncated" in by_name["truncated.gguf"].error
    assert by_name["tiny.gguf"].kind == "gguf"  # the good file is still listed


def _write_splits(src: str, folder, count: int) -> list[str]:
    """Split a GGUF by tensors into `count` files named as llama-gguf-split names them."""
    r = GGUFReader(src)
    chunks = np.array_split(np.arange(len(r.tensors)), count)
    paths = []
    for i, idx in enumerate(chunks):
        meta = dict(r.metadata) if i == 0 else {}
        meta["split.no"] = Value(ValueType.UINT16, i)
        meta["split.count"] = Value(ValueType.UINT16, count)
        tensors = [
            (
                TensorSpec(r.tensors[j].name, r.tensors[j].shape, r.tensors[j].type),
                np.array(r.tensors[j].data),
            )
            for j in idx
        ]
        path = str(folder / f"model-{i + 1:05d}-of-{count:05d}.gguf")
        write_gguf(path, meta, tensors)
        paths.append(path)
    return paths


def test_split_gguf_is_one_model_with_summed_size(tmp_path):
    src = str(tmp_path / "src" / "whole.gguf")
    os.makedirs(os.path.dirname(src))
    write_synthetic_llama(src, TINY)
    splits = _write_splits(src, tmp_path, 3)
    entries = [x for x in scan_models([str(tmp_path)]) if "splits" in x.name]
    assert len(entries) == 1
    e = entries[0]
    assert e.kind == "gguf" and e.path == splits[0] and e.files == splits
    assert e.size_bytes == sum(os.path.getsize(p) for p in splits)
    assert e.n_params == sum(_params(p) for p in splits) == _params(src)
    d = model_details(e)
    assert [t.name for t in d.tensors] == [t.name for t in ggufpy.GGUFReader(src).tensors]

    os.remove(splits[1])
    [e] = [x for x in scan_models([str(tmp_path)]) if "splits" in x.name]
    assert e.kind == "error" and e.error == "split 2 of 3 is missing"


def test_partial_files_and_job_targets_show_as_writing(folder):
    (folder / "new-Q4_0.gguf.partial").write_bytes(b"GGUF" + bytes(100))
    (folder / "tiny.gguf.partial").write_bytes(b"GGUF")  # a job overwriting tiny.gguf
    target = folder / "sub" / "queued-Q8_0.gguf"  # a running job with no partial file yet
    os.makedirs(target.parent)
    by_name = {e.name: e for e in scan_models([str(folder)], writing=[str(target)])}
    new = by_name["new-Q4_0.gguf"]
    assert new.writing and new.kind == "gguf" and new.path == str(folder / "new-Q4_0.gguf")
    assert new.size_bytes == 104
    assert by_name["tiny.gguf"].writing and by_name["tiny.gguf"].n_params == _params(
        str(folder / "tiny.gguf")
    )
    assert by_name[os.path.join("sub", "queued-Q8_0.gguf")].writing
    assert not by_name["broken.gguf"].writing
    assert not any(name.endswith(".partial") for name in by_name)


def test_hf_folder(tmp_path):
    from safetensors.numpy import save_file

    hf = tmp_path / "tiny-hf"
    hf.mkdir()
    weights = {
        "model.embed_tokens.weight": np.zeros((32, 16), np.float16),
        "model.norm.weight": np.ones(16, np.float16),
    }
    save_file(weights, str(hf / "model.safetensors"))
    (hf / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "torch_dtype": "float16",
                "hidden_size": 16,
                "num_hidden_layers": 0,
                "vocab_size": 32,
            }
        )
    )
    (tmp_path / "empty-dir").mkdir()
    [e] = scan_models([str(tmp_path)])
    assert (e.kind, e.name, e.arch, e.type_name) == (
        "hf",
        "tiny-hf/",
        "LlamaForCausalLM",
        "FLOAT16",
    )
    assert e.n_params == sum(a.size for a in weights.values())
    assert e.size_bytes == os.path.getsize(hf / "model.safetensors")
    d = model_details(e)
    assert {t.name: (t.shape, t.nbytes) for t in d.tensors} == {
        k: (list(a.shape), a.nbytes) for k, a in weights.items()
    }
    assert ("embedding", "16") in d.hparams and ("layers", "0") in d.hparams

    (hf / "config.json").write_text("{ not json")
    [e] = scan_models([str(tmp_path)])
    assert e.kind == "error" and e.error.startswith("config.json:")


def test_details_of_the_embedded_model_match_gguf_py(smollm2):
    [e] = scan_models([smollm2])
    assert e.name == os.path.basename(smollm2) and e.type_name == "Q4_1"
    d = model_details(e)
    ref = ggufpy.GGUFReader(smollm2)
    assert [(t.name, t.type_name, t.shape, t.nbytes) for t in d.tensors] == [
        (t.name, t.tensor_type.name, t.shape.tolist(), int(t.n_bytes)) for t in ref.tensors
    ]
    by_type = {name: (n, b) for name, n, b in d.by_type}
    for name in {t.tensor_type.name for t in ref.tensors}:
        ts = [t for t in ref.tensors if t.tensor_type.name == name]
        assert by_type[name] == (len(ts), sum(int(t.n_bytes) for t in ts))
    assert [b for _, _, b in d.by_type] == sorted((b for _, _, b in d.by_type), reverse=True)
    hp = dict(d.hparams)
    assert hp["layers"] == str(ref.fields["llama.block_count"].contents())
    assert hp["embedding"] == str(ref.fields["llama.embedding_length"].contents())
    tok = dict(d.tokenizer)
    assert tok["tokens"] == str(len(ref.fields["tokenizer.ggml.tokens"].contents()))
    assert tok["model"] == ref.fields["tokenizer.ggml.model"].contents()
    assert not any(k.startswith("tokenizer.") for k, _ in d.metadata)


def test_default_dirs_list_the_embedded_model(smollm2, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/models here
    dirs = default_model_dirs()
    assert dirs == [str(tmp_path), smollm2]
    (tmp_path / "models").mkdir()
    assert default_model_dirs()[0] == str(tmp_path / "models")
    names = [e.name for e in scan_models(default_model_dirs())]
    assert names == [os.path.basename(smollm2)]


def test_rescan_sees_a_file_that_changed(folder):
    """Rescans reuse the headers of unchanged files, never of a file that changed."""
    path = folder / "tiny.gguf"
    before = {e.name: e for e in scan_models([str(folder)])}["tiny.gguf"]
    assert before.n_params == _params(str(path))
    bigger = SynthConfig(n_layer=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, n_vocab=96)
    write_synthetic_llama(path, bigger, overwrite=True)
    after = {e.name: e for e in scan_models([str(folder)])}["tiny.gguf"]
    assert after.n_params == _params(str(path)) != before.n_params
    assert after.size_bytes == os.path.getsize(path)
    path.write_bytes(b"GGUF garbage now")
    after = {e.name: e for e in scan_models([str(folder)])}["tiny.gguf"]
    assert after.kind == "error"


def test_damaged_hf_weights_are_an_error_row(folder):
    from gguflab.convert.checkpoints import Checkpoint

    hf = folder / "damaged-hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (hf / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not really a zip")
    by_name = {e.name: e for e in scan_models([str(folder)])}
    e = by_name["damaged-hf/"]
    with pytest.raises(Exception) as err:  # the checkpoint reader's own verdict
        Checkpoint(str(hf))
    assert e.kind == "error" and "\n" not in e.error
    assert e.error in str(err.value)
    assert by_name["tiny.gguf"].kind == "gguf"
