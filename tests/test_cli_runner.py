"""`gguflab run / tokenize / perplexity` as llama.cpp users call them."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from ggml_oracle import llama_quantize
from llama_ref import decode_logits, reference

from gguflab.cli import main
from gguflab.runner.model import Model
from gguflab.runner.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def smol_f32(module_tmp, smollm2):
    out = module_tmp("cli-runner") / "smol-f32.gguf"
    llama_quantize(smollm2, str(out), 0, allow_requantize=True)
    return str(out)


def test_tokenize_ids_match_llama_cpp(smollm2, capsys):
    llama_cpp = pytest.importorskip("llama_cpp")
    text = "Hello world! 12345 <|im_start|>user"
    assert main(["tokenize", "-m", smollm2, "-p", text, "--ids"]) == 0
    got = eval(capsys.readouterr().out)  # a printed list of ints
    ref = llama_cpp.Llama(smollm2, vocab_only=True, verbose=False)
    assert got == ref.tokenize(text.encode(), add_bos=True, special=True)


def test_run_greedy_matches_llama_cpp(smol_f32, capsys):
    prompt = "The capital of France is"
    assert main(["run", "-m", smol_f32, "-p", prompt, "-n", "8", "--temp", "0"]) == 0
    out = capsys.readouterr()
    m = Model(smol_f32)
    ref = reference(smol_f32, Tokenizer.from_gguf(m.reader).encode(prompt), 8)
    assert out.out.startswith(prompt)
    ref.assert_agrees(decode_logits(m, ref.ids, ref.n_prompt), out.out.rstrip("\n")[len(prompt):])
    assert re.search(r"prompt: \d+ tokens, [\d.]+ tok/s \| generation: 8 tokens, [\d.]+ tok/s",
                     out.err)


def test_reverse_prompt_stops_generation(smol_f32, capsys):
    prompt = "The capital of France is"
    assert main(["run", "-m", smol_f32, "-p", prompt, "-n", "16", "--temp", "0"]) == 0
    full = capsys.readouterr().out.rstrip("\n")[len(prompt):]
    stop = full[6:10]
    assert stop.strip() and full.index(stop) == 6
    assert main(["run", "-m", smol_f32, "-p", prompt, "-n", "16", "--temp", "0",
                 "-r", "no such text", "-r", stop]) == 0
    assert capsys.readouterr().out.rstrip("\n") == prompt + full[:6]


def test_perplexity_prints_llama_perplexity_line_and_kld(smollm2, tmp_path, capsys):
    base = tmp_path / "base.kld"
    assert main(["perplexity", "-m", smollm2, "-c", "128", "--chunks", "2",
                 "--kl-divergence-base", str(base)]) == 0
    out = capsys.readouterr().out
    m = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", out)
    assert m and 1 < float(m.group(1)) < 100
    assert base.exists()
    assert main(["perplexity", "-m", smollm2, "-c", "128", "--chunks", "2",
                 "--kl-divergence-base", str(base), "--kl-divergence"]) == 0
    out = capsys.readouterr().out
    # the same model against itself: the KLD only from the base's 16-bit log-probs
    ppl_q = float(re.search(r"Mean PPL\(Q\) +: +([\d.]+)", out)[1])
    assert f"{ppl_q:.4f}" == m.group(1)
    kld = float(re.search(r"Mean +KLD: +(-?[\d.]+)", out).group(1))
    assert abs(kld) < 1e-4 and "Same top p: 100.000 ±" in out


def test_runner_user_errors_are_one_line(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"nope")
    for args in (["run", "-m", str(bad), "-p", "hi"],
                 ["perplexity", "-m", str(bad)],
                 ["tokenize", "-m", str(bad), "-p", "hi"]):
        r = subprocess.run([sys.executable, "-m", "gguflab", *args], capture_output=True,
                           text=True)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith("gguflab: error:")


def test_prompt_errors(smollm2, tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    r = subprocess.run([sys.executable, "-m", "gguflab", "run", "-m", smollm2, "-f", str(latin1)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "not UTF-8" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "gguflab", "run", "-m", smollm2, "-c", "16", "-p",
                        "word " * 40], capture_output=True, text=True)
    assert r.returncode == 1 and "does not fit in the context" in r.stderr


def test_unsupported_architecture(tmp_path):
    from gguflab.errors import UserError
    from gguflab.gguf import Value, ValueType, write_gguf
    from gguflab.runner.model import Model

    p = tmp_path / "gptneox.gguf"
    write_gguf(p, {"general.architecture": Value(ValueType.STRING, "gptneox")}, [])
    with pytest.raises(UserError, match="'gptneox' is not supported"):
        Model(p)


def test_chat_repl_answers_with_the_model_template(smollm2):
    from gguflab.gguf import GGUFReader, Keys
    from gguflab.runner.chat import chat_prompt_ids, pick_template

    question = "What is the capital of France?"
    r = subprocess.run([sys.executable, "-m", "gguflab", "chat", "-m", smollm2, "--temp", "0",
                        "-n", "12"], input=question + "\n\n",
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "generation:" in r.stderr
    assert r.stdout.startswith("> ") and r.stdout.endswith("\n> ")
    # llama.cpp, greedy, on the prompt the model's own template makes of the same turn
    reader = GGUFReader(smollm2)
    ids = chat_prompt_ids(Tokenizer.from_gguf(reader),
                          pick_template(reader.get(Keys.CHAT_TEMPLATE)),
                          [{"role": "user", "content": question}])
    ref = reference(smollm2, ids, 12)
    ref.assert_agrees(decode_logits(Model(smollm2), ref.ids, ref.n_prompt), r.stdout[2:-3])


def test_threads_flag_sets_the_kernel_threads(smol_f32, capsys):
    from gguflab.jit import parallel

    args = ["run", "-m", smol_f32, "-p", "Once upon a time", "-n", "6", "--temp", "0"]
    try:
        assert main([*args, "-t", "1"]) == 0
        assert parallel.default_threads() == 1
        one = capsys.readouterr().out
        assert main([*args, "-t", "2"]) == 0
        assert parallel.default_threads() == 2
        assert capsys.readouterr().out == one  # same greedy text with a team of two
        assert main([*args, "-t", "0"]) == 0  # 0: all cores
        assert parallel.default_threads() == parallel._cores()
        assert main([*args, "-t", "-1"]) == 1
    finally:
        parallel.set_threads(None)
