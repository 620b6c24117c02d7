"""The quantize pipeline against llama.cpp's llama_model_quantize: byte-identical files for
every mix, on the real SmolLM2 (576 wide: the fallback paths) and a synthetic llama whose
widths are multiples of 256 (the K-quant paths, GQA, layer-position rules)."""

from __future__ import annotations

import filecmp

import pytest
from ggml_oracle import llama_quantize

from gguflab.errors import UserError
from gguflab.gguf import GGMLType, GGUFReader
from gguflab.quant.mixes import MIXES, parse_mix
from gguflab.quant.pipeline import QuantizeOptions, quantize_model
from gguflab.synth import SynthConfig, write_synthetic_llama

MIX_NAMES = [m.name for m in MIXES if m.alias_of is None]


def run_ours(src, dst, name, **kw):
    opts = QuantizeOptions(overwrite=True, threads=2, **kw)
    return list(quantize_model(str(src), str(dst), parse_mix(name), opts))


def assert_same_file(ref, ours):
    if filecmp.cmp(ref, ours, shallow=False):
        return
    a, b = GGUFReader(ref), GGUFReader(ours)
    assert list(a.metadata) == list(b.metadata)
    for k in a.metadata:
        assert a.metadata[k].to_python() == b.metadata[k].to_python(), k
    assert [(t.name, t.type.name, t.ne) for t in a] == [(t.name, t.type.name, t.ne) for t in b]
    bad = [t.name for t, u in zip(a, b) if bytes(t.raw) != bytes(u.raw)]
    raise AssertionError(f"{len(bad)} tensors differ, first: {bad[:5]}")


@pytest.fixture(scope="module")
def models(module_tmp, smollm2):
    """F16 inputs: SmolLM2 requantized to F16 by llama.cpp (and by us: must be equal), and a
    synthetic llama (8 layers, 256 wide, GQA 4) in F16."""
    d = module_tmp("quant")
    smol_ref, smol_ours = d / "smol-f16-llama.gguf", d / "smol-f16-ours.gguf"
    llama_quantize(smollm2, str(smol_ref), int(parse_mix("F16").ftype), allow_requantize=True)
    events = run_ours(smollm2, smol_ours, "F16", allow_requantize=True)
    assert_same_file(smol_ref, smol_ours)
    assert any(getattr(e, "level", "") == "warning" and "requantizing" in e.text for e in events)
    synth = d / "synth-f16.gguf"
    write_synthetic_llama(synth, SynthConfig(n_layer=8, n_embd=256, n_ff=768, n_head=4,
                                             n_head_kv=1, n_vocab=512))
    return {"smollm2": smol_ref, "synth": synth, "dir": d}


@pytest.mark.parametrize("model", ["synth", "smollm2"])
@pytest.mark.parametrize("name", MIX_NAMES)
def test_every_mix_is_byte_identical(models, model, name, tmp_path):
    src = models[model]
    ref, ours = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    mix = parse_mix(name)
    if name == "Q2_K_S":
        # Q2_K tensors of a Q2_K_S file need an importance matrix: both tools refuse
        with pytest.raises(RuntimeError):
            llama_quantize(str(src), str(ref), int(mix.ftype))
        with pytest.raises(UserError, match="importance matrix"):
            run_ours(src, ours, name)
        assert not ours.exists()
        return
    llama_quantize(str(src), str(ref), int(mix.ftype), only_copy=name == "COPY")
    events = run_ours(src, ours, name)
    assert_same_file(ref, ours)
    done = [e for e in events if type(e).__name__ == "TensorDone"]
    assert len(done) == len(GGUFReader(ours).tensors)
    for e in done:
        if e.converted and e.dst_type not in ("F32", "F16", "BF16"):
            assert e.hist is not None and sum(e.hist) > 0
            assert 0 <= e.rmse < 1.0


@pytest.mark.parametrize("kw, ours_kw", [
    (dict(pure=True), dict(pure=True)),
    (dict(leave_output=True), dict(quantize_output_tensor=False)),
    (dict(output_tensor_type=int(GGMLType.Q8_0)), dict(output_tensor_type=GGMLType.Q8_0)),
    (dict(token_embedding_type=int(GGMLType.Q4_0)), dict(token_embedding_type=GGMLType.Q4_0)),
])
def test_options_match_llama_quantize(models, tmp_path, kw, ours_kw):
    ref, ours = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    llama_quantize(str(models["synth"]), str(ref), int(parse_mix("Q4_K_M").ftype), **kw)
    run_ours(models["synth"], ours, "Q4_K_M", **ours_kw)
    assert_same_file(ref, ours)


@pytest.mark.parametrize("dtype", [GGMLType.BF16, GGMLType.F32])
@pytest.mark.parametrize("name", ["Q4_K_M", "Q8_0", "F16"])
def test_bf16_and_f32_sources(tmp_path, dtype, name):
    src = tmp_path / "src.gguf"
    write_synthetic_llama(src, SynthConfig(n_layer=2, n_embd=256, n_ff=512, n_head=4,
                                           n_head_kv=2, n_vocab=256, dtype=dtype, tied=True))
    ref, ours = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    llama_quantize(str(src), str(ref), int(parse_mix(name).ftype))
    run_ours(src, ours, name)
    assert_same_file(ref, ours)


def test_dry_run_sizes_equal_the_real_run(models, tmp_path):
    dry = run_ours(models["synth"], None, "Q3_K_M", dry_run=True)
    real = run_ours(models["synth"], tmp_path / "q.gguf", "Q3_K_M")
    plan = [(e.name, e.dst_type, e.bytes_out) for e in dry if type(e).__name__ == "TensorDone"]
    done = [(e.name, e.dst_type, e.bytes_out) for e in real if type(e).__name__ == "TensorDone"]
    assert plan == done
    assert dry[-1].stats["quant_bytes"] == real[-1].stats["quant_bytes"]
    assert real[-1].stats["file_size"] == (tmp_path / "q.gguf").stat().st_size
    assert list(tmp_path.iterdir()) == [tmp_path / "q.gguf"]
