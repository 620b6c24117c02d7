"""`gguflab convert` against its oracles: llama.cpp (llama-cpp-python) runs the converted
file and gives the logits of a plain numpy forward pass of the HF weights."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from agreement import assert_same_top1_where_clear
from hf_models import hf_forward, llama_config, random_weights, write_folder

from gguflab.cli import main
from gguflab.convert.pipeline import ConvertOptions, convert_model
from gguflab.errors import UserError
from gguflab.gguf import GGMLType, GGUFReader

TOKENS = [1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278, 17366, 11203, 29889, 13, 3]


def convert(folder, out, **kw):
    return list(convert_model(folder, out, ConvertOptions(**kw)))


def llama_logits(path, tokens):
    llama_cpp = pytest.importorskip("llama_cpp")
    m = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    m.eval(tokens)
    return np.array(m.scores[: len(tokens)], dtype=np.float64)


@pytest.fixture
def tiny_llama(tmp_path, fixtures):
    cfg = llama_config()
    w = random_weights(cfg, seed=1)
    folder = write_folder(tmp_path / "tiny-llama", cfg, w, fixtures / "llama2-tokenizer.model")
    return folder, cfg, w


def test_llama_f32_logits_match_hf_forward(tiny_llama, tmp_path):
    folder, cfg, w = tiny_llama
    out = tmp_path / "tiny-f32.gguf"
    convert(folder, out, outtype="f32")
    got = llama_logits(out, TOKENS)
    want = hf_forward(cfg, w, TOKENS)
    # llama.cpp and a float64 numpy forward pass: float order only
    assert_same_top1_where_clear(want, got, 2e-3 * np.abs(want).max())


def test_llama_f16_metadata_and_types(tiny_llama, tmp_path):
    folder, cfg, w = tiny_llama
    out = tmp_path / "tiny-f16.gguf"
    convert(folder, out)
    r = GGUFReader(out)
    assert r.get("general.architecture") == "llama"
    assert r.get("llama.block_count") == 2 and r.get("llama.embedding_length") == 64
    assert r.get("llama.attention.head_count") == 4
    assert r.get("llama.attention.head_count_kv") == 2
    assert r.get("llama.rope.dimension_count") == 16 and r.get("llama.vocab_size") == 32000
    assert r.get("general.file_type") == 1
    assert r.get("tokenizer.ggml.model") == "llama"
    types = {t.name: t.type for t in r}
    assert types["blk.0.attn_q.weight"] == GGMLType.F16
    assert types["blk.0.attn_norm.weight"] == GGMLType.F32
    assert types["output.weight"] == GGMLType.F16
    assert r.tensor("blk.1.ffn_down.weight").shape == (64, 128)
    got = llama_logits(out, TOKENS)
    want = hf_forward(cfg, w, TOKENS)
    assert np.abs(got - want).max() < 3e-2 * np.abs(want).max()


def test_qwen2_with_biases_and_tied_embeddings(tmp_path, fixtures):
    cfg = llama_config("Qwen2ForCausalLM", tie=True, rope_theta=1000000.0)
    w = random_weights(cfg, seed=2, bias=True)
    folder = write_folder(tmp_path / "tiny-qwen2", cfg, w, fixtures / "llama2-tokenizer.model")
    out = tmp_path / "qwen2.gguf"
    convert(folder, out, outtype="f32")
    r = GGUFReader(out)
    assert r.get("general.architecture") == "qwen2"
    names = {t.name for t in r}
    assert "blk.0.attn_q.bias" in names and "output.weight" not in names
    got = llama_logits(out, TOKENS)
    want = hf_forward(cfg, w, TOKENS)
    assert np.abs(got - want).max() < 2e-3 * np.abs(want).max()


def test_bf16_checkpoint_auto_outtype_and_q8_0(tmp_path, fixtures):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    cfg = llama_config()
    w = random_weights(cfg, seed=3)
    folder = write_folder(tmp_path / "bf16", cfg, w, fixtures / "llama2-tokenizer.model")
    save_file({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in w.items()},
              str(folder / "model.safetensors"))
    events = convert(folder, None, outtype="auto")
    out = folder / "ggml-model-bf16.gguf"
    assert events[-1].path == str(out)
    r = GGUFReader(out)
    assert r.tensor("blk.0.ffn_up.weight").type == GGMLType.BF16
    assert r.get("general.file_type") == 32
    convert(folder, tmp_path / "q8.gguf", outtype="q8_0")
    q8 = GGUFReader(tmp_path / "q8.gguf")
    assert q8.tensor("blk.0.ffn_up.weight").type == GGMLType.Q8_0
    assert q8.tensor("blk.0.ffn_norm.weight").type == GGMLType.F32
    assert q8.get("general.file_type") == 7


def _same_model(a_path, b_path) -> None:
    """Same metadata and the same tensors (their order follows the weight files, as in
    llama.cpp: test_convert_oracle pins it)."""
    a, b = GGUFReader(a_path), GGUFReader(b_path)
    assert list(a.metadata) == list(b.metadata)
    assert {t.name: bytes(t.raw) for t in a} == {t.name: bytes(t.raw) for t in b}


def test_formats_give_the_same_tensors(tiny_llama, tmp_path):
    torch = pytest.importorskip("torch")
    folder, cfg, w = tiny_llama
    ref = tmp_path / "ref.gguf"
    convert(folder, ref)
    # the same weights as a PyTorch zip .bin
    (folder / "model.safetensors").unlink()
    torch.save({k: torch.from_numpy(v) for k, v in w.items()}, folder / "pytorch_model.bin")
    convert(folder, tmp_path / "bin.gguf")
    _same_model(ref, tmp_path / "bin.gguf")
    # and as sharded safetensors with an index
    from safetensors.numpy import save_file

    (folder / "pytorch_model.bin").unlink()
    names = list(w)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half],
              "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in shards.items():
        save_file({k: w[k] for k in keys}, str(folder / fname))
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    convert(folder, tmp_path / "sharded.gguf")
    _same_model(ref, tmp_path / "sharded.gguf")


def test_cli_default_name_and_lines(tiny_llama, capsys):
    folder, _, _ = tiny_llama
    assert main(["convert", str(folder)]) == 0
    out = capsys.readouterr().out
    assert (folder / "ggml-model-f16.gguf").exists()
    assert re.search(r"\[ 2/21\] Writing tensor token_embd.weight +\| size +64 x 32000 \| "
                     r"type F16 +\| T\+ +\d+", out)


def test_vocab_only_and_dry_run(tiny_llama, tmp_path):
    folder, _, _ = tiny_llama
    convert(folder, tmp_path / "vocab.gguf", vocab_only=True)
    r = GGUFReader(tmp_path / "vocab.gguf")
    assert len(r.tensors) == 0 and len(r.get("tokenizer.ggml.tokens")) == 32000
    events = convert(folder, tmp_path / "dry.gguf", dry_run=True)
    assert events[-1].path is None and not (tmp_path / "dry.gguf").exists()


def _config_edit(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("breakage, cause", [
    (lambda f: (f / "config.json").unlink(), "no config.json"),
    (lambda f: (f / "tokenizer.model").unlink(), "tokenizer"),
    (lambda f: _config_edit(f, architectures=["GPTNeoXForCausalLM"]), "unsupported architecture"),
    (lambda f: _config_edit(f, intermediate_size=96), "has shape"),
    (lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes()[:5000]), "model.safetensors"),
])
def test_bad_folders_one_clear_error_nothing_written(tiny_llama, tmp_path, breakage, cause):
    folder, _, _ = tiny_llama
    breakage(folder)
    with pytest.raises(UserError, match=cause):
        convert(folder, tmp_path / "out.gguf")
    assert not list(tmp_path.glob("out.gguf*"))


def test_smollm2_round_trip_equals_llama_cpp_f16(smollm2, tmp_path):
    """Real weights: SmolLM2 exported to an HF folder and converted back gives llama.cpp's
    own F16 file of that model: names, shapes, types, values, hparams and tokenizer."""
    from ggml_oracle import llama_quantize
    from hf_models import export_hf_folder

    ref = tmp_path / "llama-f16.gguf"
    llama_quantize(smollm2, str(ref), 1, allow_requantize=True)  # 1 = MOSTLY_F16
    folder = tmp_path / "SmolLM2-135M-Instruct"
    export_hf_folder(smollm2, folder)
    out = tmp_path / "ours.gguf"
    convert(folder, out)
    a, b = GGUFReader(ref), GGUFReader(out)
    ta = {t.name: t for t in a}
    tb = {t.name: t for t in b}
    assert ta.keys() == tb.keys()
    for name, t in ta.items():
        assert (t.type, t.shape) == (tb[name].type, tb[name].shape), name
        assert bytes(t.raw) == bytes(tb[name].raw), name  # f16(dequantized): exactly equal
    for key, v in a.metadata.items():
        if key.startswith(("llama.", "tokenizer.")) or key in ("general.architecture",
                                                                "general.file_type"):
            assert key in b.metadata, key
            assert b.metadata[key].type == v.type, key
            x, y = v.to_python(), b.metadata[key].to_python()
            assert x == y, key
    assert b.get("tokenizer.ggml.pre") == "smollm"
