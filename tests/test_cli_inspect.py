"""`gguflab inspect`: the same metadata and tensor table as gguf-py, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import gguf as ggufpy
import numpy as np

from gguflab.cli import main


def test_json_matches_gguf_py(smollm2, capsys):
    assert main(["inspect", smollm2, "--json", "--full"]) == 0
    out = json.loads(capsys.readouterr().out)
    ref = ggufpy.GGUFReader(smollm2)
    fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(out["metadata"]) == list(fields)
    for k, f in fields.items():
        got = out["metadata"][k]
        assert got["type"] == ggufpy.GGUFValueType(int(f.types[0])).name
        want = f.contents()
        if isinstance(want, float):
            assert np.float32(got["value"]) == np.float32(want)
        else:
            assert got["value"] == want, k
    assert [(t["name"], t["shape"], t["type"], t["bytes"]) for t in out["tensors"]] == [
        (t.name, t.shape.tolist(), t.tensor_type.name, t.n_bytes) for t in ref.tensors
    ]
    assert out["summary"]["parameters"] == sum(t.n_elements for t in ref.tensors)
    assert out["summary"]["file_type"] == "Q4_1"


def test_text_listing(smollm2, capsys):
    assert main(["inspect", smollm2]) == 0
    out = capsys.readouterr().out
    assert "272 tensors" in out and "33 key/value pairs" in out
    assert "general.architecture = 'llama'" in out
    assert "| Q8_0    |" in out and "token_embd.weight" in out
    assert "tokenizer.ggml.tokens = ['<|endoftext|>'" in out  # long arrays summarised
    assert len(out.splitlines()) < 400


def test_default_is_the_embedded_model(capsys):
    assert main(["inspect", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["architecture"] == "llama"


def test_user_error_is_one_line_exit_1(tmp_path):
    bad = tmp_path / "not.gguf"
    bad.write_text("hello, this is not a model at all")
    for target in (bad, tmp_path / "missing.gguf"):
        r = subprocess.run(
            [sys.executable, "-m", "gguflab", "inspect", str(target)],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 1
        assert r.stdout == ""
        lines = r.stderr.strip().splitlines()
        assert (
            len(lines) == 1 and lines[0].startswith("gguflab: error: ") and str(target) in lines[0]
        )
        assert "Traceback" not in r.stderr
