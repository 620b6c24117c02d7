"""`gguflab bench` against llama-bench on the same small file: the same json keys (those that
mean something for gguflab, in llama-bench's order), the same test matrix for comma lists
and ranges, the same model size and parameter count, the same markdown columns. No timing
is asserted: only that every figure is there and consistent with its samples."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from llama_tools import llama_tool

from gguflab.benchmark import parse_int_range
from gguflab.cli import main
from gguflab.errors import UserError
from gguflab.synth import SynthConfig, write_synthetic_llama

SMALL = ["-p", "16", "-n", "4", "-r", "2", "-t", "2"]


@pytest.fixture(scope="module")
def tiny(module_tmp, smollm2):
    # llama-bench needs a tokenizer: SmolLM2's (its 49152 tokens make the embeddings)
    path = module_tmp("bench") / "tiny.gguf"
    return str(write_synthetic_llama(path, SynthConfig(
        n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, tied=True,
        tokenizer_from=smollm2)))


def llama_bench(*args: str) -> str:
    p = subprocess.run([str(llama_tool("llama-bench")), *args], capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def ours(*args: str) -> tuple[str, str]:
    p = subprocess.run([sys.executable, "-m", "gguflab", "bench", *args], capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout, p.stderr


def test_json_like_llama_bench(tiny):
    theirs = json.loads(llama_bench("-m", tiny, *SMALL, "-o", "json"))
    out, err = ours("-m", tiny, *SMALL, "-o", "json")
    mine = json.loads(out)  # valid json, as llama-bench's
    assert "benchmark 1/2" in err  # progress goes to stderr, never into the json
    assert len(mine) == len(theirs) == 2
    for m, t in zip(mine, theirs):
        keys = [k for k in t if k in m]
        assert keys == [k for k in m if k in t]  # llama-bench's order
        assert set(m) - set(t) == set()  # no key of our own
        for k in ("model_filename", "model_type", "model_size", "model_n_params", "n_prompt",
                  "n_gen", "n_threads", "n_batch", "n_depth", "backends"):
            assert m[k] == t[k], k
        for k in m:  # the same json types
            assert type(m[k]) is type(t[k]) or {type(m[k]), type(t[k])} <= {int, float}, k
        ns, ts = m["samples_ns"], m["samples_ts"]
        assert len(ns) == len(ts) == 2 and all(x > 0 for x in ns)
        n_tok = m["n_prompt"] + m["n_gen"]
        assert ts == pytest.approx([1e9 * n_tok / x for x in ns], rel=1e-5)
        assert m["avg_ns"] == sum(ns) // len(ns)
        assert m["avg_ts"] == pytest.approx(sum(ts) / len(ts), rel=1e-5)
        # the samples are printed to 6 significant digits (%g): their difference carries
        # up to one unit of the 6th digit of the larger
        assert m["stddev_ts"] == pytest.approx(abs(ts[0] - ts[1]) / 2 ** 0.5, rel=1e-4,
                                               abs=1e-5 * max(ts))


def test_markdown_like_llama_bench(tiny):
    theirs = llama_bench("-m", tiny, *SMALL).splitlines()
    mine, _ = ours("-m", tiny, *SMALL)
    mine = mine.splitlines()
    assert mine[:2] == theirs[:2]  # the header and its alignment row, to the character
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in (mine[2:4], theirs[2:4])
            for line in line]
    for m, t in zip(rows[:2], rows[2:]):
        assert m[:-1] == t[:-1]  # model, size, params, backend, threads, test
        assert re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d", m[-1])
    assert len(mine[2]) == len(theirs[2])  # the same widths
    assert mine[-1].startswith("build: ")


def test_lists_and_ranges_expand_as_llama_bench(tiny):
    args = ["-p", "4-8*2", "-n", "1,2", "-pg", "4,1", "-t", "1,2", "-r", "1", "-b", "4,2048",
            "--no-warmup", "-o", "jsonl"]
    theirs = [json.loads(line) for line in llama_bench("-m", tiny, *args).splitlines()]
    mine = [json.loads(line) for line in ours("-m", tiny, *args)[0].splitlines()]

    def matrix(rows):
        return [(r["n_prompt"], r["n_gen"], r["n_threads"], r["n_batch"]) for r in rows]

    assert matrix(mine) == matrix(theirs) and len(mine) == 2 * 2 * 5


def test_int_ranges():
    assert parse_int_range("-p", "1-8*2") == [1, 2, 4, 8]
    assert parse_int_range("-p", "128,512") == [128, 512]
    assert parse_int_range("-t", "1-4") == [1, 2, 3, 4]
    assert parse_int_range("-t", "2-10+4") == [2, 6, 10]
    assert parse_int_range("-ngl", "-1,0", allow_negative=True) == [-1, 0]
    for bad in ("abc", "1-8*1", "", "-1", "1-8/2", "4,,5"):
        with pytest.raises(UserError):
            parse_int_range("-p", bad)


@pytest.mark.parametrize("args, says", [
    (["-p", "abc"], "-p 'abc'"),
    (["-r", "0"], "-r 0"),
    (["-t", "0"], "-t 0"),
    (["-pg", "5"], "-pg '5'"),
    (["-m", "/nonexistent/x.gguf"], "no such file"),
])
def test_bad_flags_say_so(tiny, capsys, args, says):
    model = [] if args[0] == "-m" else ["-m", tiny]
    assert main(["bench", *model, *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("gguflab: error: ") and says in err and len(err.splitlines()) == 1


def test_bad_output_format(tiny, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "-m", tiny, "-o", "xml"])
    assert e.value.code == 2 and "invalid choice: 'xml'" in capsys.readouterr().err


def test_gpu_layers_without_a_gpu_run_on_the_cpu(tiny, monkeypatch):
    # as `gguflab run -ngl N` does: the plan says why, the test runs on the CPU
    monkeypatch.setenv("GGUFLAB_NO_GPU", "1")
    out, err = ours("-m", tiny, "-p", "8", "-n", "0", "-r", "1", "-t", "1", "-ngl", "99")
    assert "running on the CPU" in err
    header, _, row = out.splitlines()[:3]
    assert "ngl" in header
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3:6] == ["CPU", "99", "1"] and cells[6] == "pp8"


def test_model_description_like_llama_bench(tiny, smollm2, tmp_path):
    # llama_model_desc: architecture, llama.cpp's size label, the file type's long name
    from gguflab.benchmark import ModelFacts
    from gguflab.gguf import GGUFReader
    from gguflab.quant.mixes import parse_mix
    from gguflab.quant.pipeline import QuantizeOptions, quantize_model

    q = str(tmp_path / "tiny-Q4_K_M.gguf")
    for _ in quantize_model(tiny, q, parse_mix("Q4_K_M"), QuantizeOptions()):
        pass
    for path in (smollm2, q):
        (t,) = json.loads(llama_bench("-m", path, "-p", "8", "-n", "0", "-r", "1",
                                      "--no-warmup", "-t", "1", "-o", "json"))
        facts = ModelFacts.of(GGUFReader(path))
        assert (facts.type, facts.size, facts.n_params) == \
            (t["model_type"], t["model_size"], t["model_n_params"])
