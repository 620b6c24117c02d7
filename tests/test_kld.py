"""KL-divergence against llama-perplexity: its `--kl-divergence-base` file read and written
both ways, its statistics (labels, percentiles, error bars), a run whose memory stays flat
whatever the number of chunks, and bad or interrupted bases."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import shutil
import tracemalloc

import numpy as np
import pytest
from ggml_oracle import llama_quantize
from llama_tools import run_tool

from gguflab.catalog import default_eval_text
from gguflab.cli import main
from gguflab.errors import UserError
from gguflab.gguf import GGMLType
from gguflab.runner.kldbase import BaseReader, decode, encode, header
from gguflab.runner.model import Model
from gguflab.runner.ops import max_sum_exp
from gguflab.runner.perplexity import (
    _KldAccumulator,
    compare_chunk,
    format_kld_statistics,
    iter_perplexity,
    perplexity,
)
from gguflab.synth import SynthConfig, write_synthetic_llama

N_CTX, CHUNKS = 128, 3
TEXT = default_eval_text()
# gguflab computes llama.cpp's function bit for bit (its products in the order of the
# kernels llama.cpp picks by default, tiled and repacked included, its norms, RoPE, SwiGLU
# and attention), so every figure is llama-perplexity's to the printed digit.


def parse_stats(out: str) -> dict[str, tuple[float, float | None]]:
    """The closing statistics of either tool: label -> (value, ± error or None)."""
    stats = {}
    text = out[out.index("====== Perplexity statistics ======"):]
    for line in text.splitlines():
        m = re.match(r"^\s*(\S.*?)\s*:\s+(-?[\d.]+)\s*%?(?:\s*±\s*(-?[\d.]+))?", line)
        if m:
            stats[m[1]] = (float(m[2]), None if m[3] is None else float(m[3]))
        if line.startswith("Same top p"):
            break
    return stats


def llama_perplexity(model, *args) -> str:
    return run_tool("llama-perplexity", "-m", model, "-f", TEXT, "-c", N_CTX, "-t", 2, *args)


@pytest.fixture(scope="module")
def files(module_tmp, smollm2):
    """F32 SmolLM2 and its Q4_K_M (both by llama-quantize), the F32 base written by
    llama-perplexity, and llama-perplexity's KLD of the Q4_K_M against it."""
    d = module_tmp("kld")
    f32, q4 = str(d / "f32.gguf"), str(d / "q4km.gguf")
    llama_quantize(smollm2, f32, 0, allow_requantize=True)
    llama_quantize(f32, q4, 15)
    base = str(d / "f32.llama.kld")
    llama_perplexity(f32, "--chunks", CHUNKS, "--kl-divergence-base", base)
    kld_out = llama_perplexity(q4, "--kl-divergence-base", base, "--kl-divergence")
    return {"dir": d, "f32": f32, "q4": q4, "base": base, "llama_kld": kld_out}


def _gguflab(capsys, *args) -> str:
    capsys.readouterr()
    assert main(["perplexity", "-f", TEXT, "-c", str(N_CTX), *map(str, args)]) == 0
    return capsys.readouterr().out


def test_llama_base_is_read_and_used_by_gguflab(files, capsys):
    out = _gguflab(capsys, "-m", files["q4"], "--kl-divergence-base", files["base"],
                   "--kl-divergence")
    ours, theirs = parse_stats(out), parse_stats(files["llama_kld"])
    assert ours.keys() == theirs.keys() and len(ours) == 34  # every figure, same labels
    assert ours == theirs  # to the last printed digit, model side and base side
    # the per-chunk table, as llama-perplexity prints it
    rows = re.findall(r"^ +(\d+) +[\d.]+ ± +[\d.]+ +-?[\d.]+ ± .*%$", out, re.M)
    assert rows == [str(i + 1) for i in range(CHUNKS)]


def test_gguflab_base_is_accepted_by_llama(files, capsys):
    ours = str(files["dir"] / "f32.gguflab.kld")
    out = _gguflab(capsys, "-m", files["f32"], "--chunks", CHUNKS, "--kl-divergence-base", ours)
    assert "Final estimate: PPL" in out and not os.path.exists(ours + ".partial")
    a, b = BaseReader(ours), BaseReader(files["base"])
    assert os.path.getsize(ours) == os.path.getsize(files["base"])
    with open(ours, "rb") as f, open(files["base"], "rb") as g:  # header and tokens
        n = 20 + 4 * CHUNKS * N_CTX
        assert f.read(n) == g.read(n)
    for i in range(CHUNKS):  # the F32 model's log-probs are llama.cpp's bits: same rows
        assert np.array_equal(np.asarray(a.chunk(i)), np.asarray(b.chunk(i))), i
    with open(ours, "rb") as f, open(files["base"], "rb") as g:
        assert f.read() == g.read()
    llama = parse_stats(llama_perplexity(files["q4"], "--kl-divergence-base", ours,
                                         "--kl-divergence"))
    assert llama == parse_stats(files["llama_kld"])  # llama.cpp's figures on either base


def test_encoder_gives_llama_perplexity_codes(files):
    """Decoding llama-perplexity's rows and encoding them again gives its very codes and
    scales. min_log_prob moves by the probability of the entries more than 16 nats under
    the top, which the file does not keep (they are set far lower here)."""
    b = BaseReader(files["base"])
    for i in range(b.n_chunk):
        rows = np.asarray(b.chunk(i))
        lp = decode(rows, b.n_vocab)
        again = encode(np.where(rows[:, 4:4 + b.n_vocab] == 0, np.float32(-1e4), lp))
        assert np.array_equal(again[:, 4:], rows[:, 4:])
        (s0, m0), (s1, m1) = header(rows), header(again)
        assert np.array_equal(s0, s1)
        assert np.abs(m1 - m0).max() < 1e-3


def test_softmax_sums_are_llama_perplexity_s():
    """The top logit and Σ expf(x - top) of each row as llama-perplexity's softmax takes
    them: libm's expf term by term, added in double in order (bit for bit)."""
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    libm.expf.restype, libm.expf.argtypes = ctypes.c_float, [ctypes.c_float]
    x = (np.random.default_rng(3).standard_normal((3, 2001)) * 6).astype(np.float32)
    x[1, 1000] = 80  # one dominant logit
    top, total = max_sum_exp(x)
    for row, t, s in zip(x, top, total):
        assert t == row.max()
        acc = 0.0
        for v in row:
            acc += libm.expf(float(np.float32(v - t)))
        assert s == acc


def test_statistics_are_llama_perplexity_formulas(files):
    """The statistics from two llama-made bases (the Q4_K_M's rows decoded stand in for its
    logits) against llama-perplexity's own printout for that pair. The base's figures are
    exact. The Q4_K_M's rows keep its log-probs to 16 bits and only 16 nats deep (entries
    below sit at the floor; we put them 4 nats lower), which moves its nll where the target
    is that deep (so PPL(Q) is not compared here) and the KLDs by up to 1% (measured 0.2%
    mean, 1.0% max, < 0.3% for 99%..median). That pins the percentile method (99.9% is 2.44,
    the maximum 2.68: a nearest-rank percentile would be 9% off), the error bars and the
    correlation."""
    q_base = str(files["dir"] / "q4km.llama.kld")
    llama_perplexity(files["q4"], "--chunks", CHUNKS, "--kl-divergence-base", q_base)
    a, q = BaseReader(files["base"]), BaseReader(q_base)
    acc = _KldAccumulator(CHUNKS * a.n_scored)
    first = N_CTX // 2
    for i in range(CHUNKS):
        rows = np.asarray(q.chunk(i))
        logits = decode(rows, q.n_vocab)
        logits = np.where(rows[:, 4:4 + q.n_vocab] == 0, logits - np.float32(4), logits)
        target = np.asarray(a.tokens[i * N_CTX + first + 1:(i + 1) * N_CTX])
        acc.add(*compare_chunk(logits, np.asarray(a.chunk(i)), target))
    ours = parse_stats(format_kld_statistics(acc.statistics()))
    theirs = parse_stats(files["llama_kld"])
    assert ours.keys() == theirs.keys()
    assert ours["Mean PPL(base)"] == theirs["Mean PPL(base)"]
    for label in ("Mean    KLD", "Maximum KLD", "99.9%   KLD", "99.0%   KLD", "95.0%   KLD",
                  "90.0%   KLD", "Median  KLD", "10.0%   KLD", "RMS Δp"):
        assert ours[label][0] == pytest.approx(theirs[label][0], rel=0.015), label
    for label in ("Mean    KLD", "RMS Δp", "Mean    Δp"):
        assert ours[label][1] == pytest.approx(theirs[label][1], rel=0.02), label
    for label, (v, _) in theirs.items():
        if "Δp" in label and label != "RMS Δp":  # percentage points
            assert ours[label][0] == pytest.approx(v, abs=0.02), label
    assert ours["Same top p"] == theirs["Same top p"]
    assert ours["Cor(ln(PPL(Q)), ln(PPL(base)))"][0] == pytest.approx(
        theirs["Cor(ln(PPL(Q)), ln(PPL(base)))"][0], abs=0.5)


# -- memory, bad input, interrupts: a tiny synthetic model with a large vocabulary -----


SYN_CTX, VOCAB = 32, 64000


@pytest.fixture(scope="module")
def synth(module_tmp):
    path = module_tmp("kld-synth") / "wide.gguf"
    write_synthetic_llama(path, SynthConfig(n_layer=1, n_embd=64, n_ff=128, n_head=2,
                                            n_head_kv=1, n_vocab=VOCAB, n_ctx=SYN_CTX,
                                            dtype=GGMLType.F32))
    m = Model(str(path))
    tokens = np.random.default_rng(0).integers(2, VOCAB, 64 * SYN_CTX).tolist()
    return m, tokens


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_memory_stays_flat_whatever_the_number_of_chunks(synth, tmp_path):
    """The Python heap peaks at one chunk's arrays however many chunks, and the resident
    size does not grow with the base read through its memory map."""
    m, tokens = synth
    run = dict(add_bos=True, bos_id=1)
    peaks = {}
    for n in (4, 64):
        base = str(tmp_path / f"b{n}.kld")
        w = _peak(lambda n=n, base=base: perplexity(m, tokens, SYN_CTX, n_chunks=n,
                                                    save_base=base, **run))
        r = _peak(lambda base=base: perplexity(m, tokens, SYN_CTX, base_path=base, **run))
        peaks[n] = (w, r)
        assert BaseReader(base).n_chunk == n
    all_logprobs = 64 * (SYN_CTX - 1 - SYN_CTX // 2) * VOCAB * 4  # 246 MB as float32
    for i in (0, 1):  # 16x the chunks, the same peak (a few chunks' worth of arrays)
        assert peaks[64][i] < 1.25 * peaks[4][i] + (1 << 20), peaks
        assert peaks[64][i] < all_logprobs / 8, peaks
    rss = []
    perplexity(m, tokens, SYN_CTX, base_path=str(tmp_path / "b64.kld"),
               on_chunk=lambda i, n, p: rss.append(_rss()), **run)
    size = os.path.getsize(tmp_path / "b64.kld")  # 123 MB, every page of it read
    assert max(rss[4:]) - rss[3] < size / 8, (rss[3], max(rss), size)


def test_bad_bases_are_user_errors(synth, files, tmp_path):
    m, tokens = synth
    run = dict(add_bos=True, bos_id=1)
    garbage = tmp_path / "garbage.kld"
    garbage.write_bytes(b"this is no base file at all")
    with pytest.raises(UserError, match="not a KL-divergence base"):
        perplexity(m, tokens, SYN_CTX, base_path=str(garbage), **run)
    good = str(tmp_path / "good.kld")
    perplexity(m, tokens, SYN_CTX, n_chunks=3, save_base=good, **run)
    cut = tmp_path / "cut.kld"
    cut.write_bytes(open(good, "rb").read()[:-100])
    with pytest.raises(UserError, match="truncated"):
        perplexity(m, tokens, SYN_CTX, base_path=str(cut), **run)
    with pytest.raises(UserError, match="--ctx-size 32, not 64"):
        perplexity(m, tokens, 64, base_path=good, **run)
    with pytest.raises(UserError, match="another text or tokenizer"):
        perplexity(m, tokens[1:], SYN_CTX, base_path=good, **run)
    b = BaseReader(files["base"])  # SmolLM2's: 49152 entries, the model has 64000
    with pytest.raises(UserError, match="vocabulary of 49152 tokens, the model 64000"):
        perplexity(m, np.asarray(b.tokens).tolist(), N_CTX, base_path=files["base"], **run)


def test_interrupt_leaves_no_partial_and_keeps_the_old_base(synth, tmp_path):
    m, tokens = synth
    run = dict(add_bos=True, bos_id=1)
    base = str(tmp_path / "keep.kld")
    perplexity(m, tokens, SYN_CTX, n_chunks=2, save_base=base, **run)
    before = open(base, "rb").read()
    steps = iter_perplexity(m, tokens, SYN_CTX, n_chunks=6, save_base=base, **run)
    next(steps)
    assert os.path.exists(base + ".partial")
    with pytest.raises(KeyboardInterrupt):
        steps.throw(KeyboardInterrupt)
    assert not os.path.exists(base + ".partial") and open(base, "rb").read() == before
    steps = iter_perplexity(m, tokens, SYN_CTX, n_chunks=6, save_base=base, **run)
    next(steps)
    steps.close()  # a job cancelled between chunks
    assert not os.path.exists(base + ".partial") and open(base, "rb").read() == before
    shutil.copy(base, tmp_path / "copy.kld")  # and what is left is a valid base
    assert BaseReader(str(tmp_path / "copy.kld")).n_chunk == 2
