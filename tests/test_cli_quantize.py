"""`gguflab quantize` as a user meets it: llama-quantize's forms, its per-tensor lines, and
one clear line for every bad input, with nothing written."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gguflab.cli import main
from gguflab.events import TensorDone
from gguflab.quant.mixes import parse_mix
from gguflab.quant.pipeline import QuantizeOptions, quantize_model
from gguflab.synth import SynthConfig, write_synthetic_llama

TINY = SynthConfig(n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_vocab=256)


@pytest.fixture
def tiny(tmp_path):
    return write_synthetic_llama(tmp_path / "tiny-f16.gguf", TINY)


def gguflab(*args):
    return subprocess.run([sys.executable, "-m", "gguflab", *map(str, args)],
                          capture_output=True, text=True)


def test_default_output_name_and_lines(tiny, tmp_path, capsys):
    assert main(["quantize", tiny, "Q8_0"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "ggml-model-Q8_0.gguf").exists()
    # llama.cpp's order (non-layer tensors first, then by layer and name) and line format
    assert "[   1/  21] output.weight                        - [  256,   256,     1,     1], " \
           "type =    f16, converting to q8_0 .. size =     0.12 MiB ->     0.07 MiB" in out
    assert "[   4/  21] blk.0.attn_k.weight " in out
    assert "type =    f32, size =    0.001 MiB" in out
    assert "quant size  =" in out


def test_in_out_type_threads_form(tiny, tmp_path, capsys):
    out = tmp_path / "out.gguf"
    assert main(["quantize", tiny, str(out), "q4_k_m", "1"]) == 0
    assert out.exists()
    assert "converting to q4_K" in capsys.readouterr().out


def test_type_by_number(tiny, tmp_path):
    assert main(["quantize", tiny, str(tmp_path / "o.gguf"), "15"]) == 0  # 15 = Q4_K_M


def _one_line_error(r, *needles):
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gguflab: error:"), r.stderr
    for n in needles:
        assert n in lines[0]
    assert "Traceback" not in r.stderr


def test_bad_inputs_one_line_nothing_written(tiny, tmp_path):
    before = set(os.listdir(tmp_path))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model" * 10)
    _one_line_error(gguflab("quantize", junk, tmp_path / "o.gguf", "Q4_0"), "not a GGUF file")
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(open(tiny, "rb").read()[:-5000])
    _one_line_error(gguflab("quantize", trunc, tmp_path / "o.gguf", "Q4_0"), "past the end")
    _one_line_error(gguflab("quantize", tiny, tmp_path / "o.gguf", "Q3_Z"), "unknown quantization type")
    _one_line_error(gguflab("quantize", tiny, tmp_path / "no" / "o.gguf", "Q4_0"), "does not exist")
    assert set(os.listdir(tmp_path)) == before | {"junk.gguf", "trunc.gguf"}


def test_quantized_input_needs_allow_requantize(tiny, tmp_path):
    q = tmp_path / "q8.gguf"
    assert gguflab("quantize", tiny, q, "Q8_0").returncode == 0
    _one_line_error(gguflab("quantize", q, tmp_path / "o.gguf", "Q4_0"), "--allow-requantize")
    assert not (tmp_path / "o.gguf").exists()
    r = gguflab("quantize", "--allow-requantize", q, tmp_path / "o.gguf", "Q4_0")
    assert r.returncode == 0 and "requantizing 16 Q8_0 tensors" in r.stderr


def test_existing_output_needs_force(tiny, tmp_path):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"keep me")
    _one_line_error(gguflab("quantize", tiny, out, "Q8_0"), "--force")
    assert out.read_bytes() == b"keep me"
    assert gguflab("quantize", "--force", tiny, out, "Q8_0").returncode == 0
    assert out.read_bytes()[:4] == b"GGUF"


def test_cancel_leaves_no_partial_and_keeps_existing(tiny, tmp_path):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"keep me")
    gen = quantize_model(tiny, out, parse_mix("Q4_K_M"), QuantizeOptions(overwrite=True))
    for ev in gen:
        if isinstance(ev, TensorDone) and ev.index == 5:
            assert os.path.exists(str(out) + ".partial")
            gen.close()  # what a cancel does
            break
    assert out.read_bytes() == b"keep me"
    assert sorted(os.listdir(tmp_path)) == ["o.gguf", "tiny-f16.gguf"]


def test_dry_run_writes_nothing(tiny, tmp_path, capsys):
    assert main(["quantize", "--dry-run", tiny, "Q4_K_M"]) == 0
    out = capsys.readouterr().out
    assert "dry run" in out and "quant size" in out
    assert sorted(os.listdir(tmp_path)) == ["tiny-f16.gguf"]


def test_types_without_arithmetic_get_a_clear_message(tmp_path):
    """A model with NVFP4 tensors (a type gguflab has no arithmetic for) can be inspected;
    requantizing it says why not."""
    import numpy as np

    from gguflab.gguf import GGMLType, TensorSpec, tensor_bytes, write_gguf
    from gguflab.synth import metadata

    src = tmp_path / "iq.gguf"
    shape = (256, 256)
    raw = np.zeros(tensor_bytes(GGMLType.NVFP4, shape), np.uint8)
    write_gguf(src, metadata(TINY), [(TensorSpec("blk.0.attn_q.weight", shape,
                                                 GGMLType.NVFP4), raw)])
    assert gguflab("inspect", src).returncode == 0
    _one_line_error(gguflab("quantize", "--allow-requantize", src, tmp_path / "o.gguf", "Q4_0"),
                    "NVFP4 is not supported")


def test_weight_distribution_is_the_inputs_histogram(tiny, tmp_path):
    """TensorDone.weights (the Jobs tab's chart): numpy's histogram of the tensor's input
    weights over their range, on every k-th row for WEIGHT_SAMPLE weights."""
    import numpy as np

    from gguflab.gguf import GGUFReader
    from gguflab.quant.pipeline import WEIGHT_BINS, WEIGHT_SAMPLE

    done = [e for e in quantize_model(tiny, tmp_path / "q.gguf", parse_mix("Q4_K_M"),
                                      QuantizeOptions(weights=True))
            if isinstance(e, TensorDone) and e.converted]
    x = np.asarray(GGUFReader(tiny).tensor("blk.1.ffn_down.weight").data, np.float32)
    x = x[:: max(1, x.size // WEIGHT_SAMPLE)]  # rows (ne[1]) are the first numpy axis
    (ev,) = [e for e in done if e.name == "blk.1.ffn_down.weight"]
    want, _ = np.histogram(x, WEIGHT_BINS, (x.min(), x.max()))
    assert ev.weights == {"counts": want.tolist(), "lo": float(x.min()), "hi": float(x.max())}
    assert all(e.weights is None for e in quantize_model(
        tiny, tmp_path / "n.gguf", parse_mix("Q8_0")) if isinstance(e, TensorDone))
