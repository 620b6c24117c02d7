"""The forward pass against llama.cpp (llama-cpp-python) on the same GGUF, and against a
numpy forward pass of HF weights (converter tests' oracle) for the NEOX-RoPE path."""

from __future__ import annotations

import numpy as np
import pytest
from agreement import assert_same_top1_where_clear, log_softmax
from ggml_oracle import llama_quantize
from llama_ref import (
    LLAMA_SPREADS,
    assert_matches_llama_cpp,
    decode_logits,
    llama_logits,
    llama_perplexity,
    reference,
)

from gguflab.errors import UserError
from gguflab.jit.parallel import default_threads
from gguflab.runner.model import Model
from gguflab.runner.perplexity import perplexity

TOKENS = [1, 504, 3458, 282, 4649, 314, 7042, 30, 378, 3458, 282, 8295, 314, 4110, 30, 378,
          3458, 282, 7365, 314, 216]


@pytest.fixture(scope="module")
def smol_f32(module_tmp, smollm2):
    out = module_tmp("runner") / "smol-f32.gguf"
    llama_quantize(smollm2, str(out), 0, allow_requantize=True)  # 0 = ALL_F32
    return out


def test_f32_logits_match_llama_cpp(smol_f32):
    """Every position of a prompt as one batch: F32 weights, so the two differ by the order
    of float sums only. Bound: llama.cpp's own spread (flash attention on against off on
    the same batch) times LLAMA_SPREADS."""
    ours = Model(smol_f32).forward(TOKENS, Model(smol_f32).new_cache(64), all_logits=True)
    ref = llama_logits(smol_f32, TOKENS)
    spread = np.abs(llama_logits(smol_f32, TOKENS, flash_attn=True) - ref).max()
    assert_same_top1_where_clear(ref, ours, LLAMA_SPREADS * spread)


def test_quantized_weights_used_in_place_agree_with_llama_cpp(smollm2):
    m = Model(smollm2)  # Q4_1 + Q8_0, never dequantized as a whole
    ours = m.forward(TOKENS, m.new_cache(64), all_logits=True)
    ref = llama_logits(smollm2, TOKENS)
    # llama.cpp also quantizes the activations (Q8_1): agreement, not identity
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.8
    kl = (np.exp(log_softmax(ref)) * (log_softmax(ref) - log_softmax(ours))).sum(-1)
    assert kl.mean() < 0.05


def test_incremental_decoding_equals_one_batch(smol_f32):
    m = Model(smol_f32)
    whole = m.forward(TOKENS, m.new_cache(64), all_logits=True)
    cache = m.new_cache(64)
    part = [m.forward(TOKENS[:9], cache, all_logits=True)]
    part += [m.forward([t], cache)[None] for t in TOKENS[9:]]
    # one token at a time and one batch run different kernels (gemv, gemm): float order
    # only, on logits of about +-30
    assert np.abs(np.vstack(part) - whole).max() < 0.02


def test_logits_from_a_row_are_that_part_of_the_whole_batch(smollm2):
    """`first` (llama.cpp's output selection: the rows before it leave the last layer after
    its attention) gives the very logits of the full batch from that row on, the KV cache
    it leaves is the same, and the last token's logits alone are the full batch's last."""
    m = Model(smollm2)
    full_cache, cache, last_cache = m.new_cache(64), m.new_cache(64), m.new_cache(64)
    whole = m.forward(TOKENS, full_cache, all_logits=True)
    np.testing.assert_array_equal(m.forward(TOKENS, cache, all_logits=True, first=7),
                                  whole[7:])
    np.testing.assert_array_equal(m.forward(TOKENS, last_cache), whole[-1])
    np.testing.assert_array_equal(cache.k[:, :, :len(TOKENS)], full_cache.k[:, :, :len(TOKENS)])
    with pytest.raises(UserError, match="first output row"):
        m.forward(TOKENS, m.new_cache(64), all_logits=True, first=len(TOKENS))


def _decode_both_ways(path, tune=lambda m: None, fa="auto", prompt=TOKENS[:9], n_ctx=64):
    """Greedy decoding of 12 tokens after a prompt through the prepared one-token steps
    (`_Decoder`) and through the general route: the logits of each step, and the caches."""
    runs = []
    for prepared in (True, False):
        m = Model(path)
        m.flash_attn = fa if fa != "auto" else m.flash_attn
        tune(m)
        if not prepared:
            m._decoder_fits = lambda n_cpu: False
        cache = m.new_cache(n_ctx)
        out = [m.forward(prompt, cache)]
        for _ in range(12):
            out.append(m.forward([int(np.argmax(out[-1]))], cache))
        programs = [p for d in (m._decoders or {}).values()
                    for p in (d._programs if d._programs_for is not None else {}).values()]
        runs.append((np.array(out), cache.k[:, :, :cache.n], cache.v[:, :, :cache.n],
                     any(p is not None for p in programs)))
    return runs


def _biases(m):
    rng = np.random.default_rng(5)
    for L in m.layers:
        L.bq, L.bk, L.bv = (rng.normal(0, 0.5, w.data.shape[0]).astype(np.float32)
                            for w in (L.wq, L.wk, L.wv))


@pytest.mark.parametrize("case", ["q4_1", "biases", "f16", "f32-attention", "qwen3", "gemma2",
                                  "gemma3", "phi3", "split-keys"])
def test_prepared_decoding_steps_are_the_general_route_bit_for_bit(case, smollm2, tmp_path):
    """One token runs through prepared buffers and posted products (model._Decoder); the
    general route computes the same thing per call. Same logits, same caches, for the
    integer (Q4_1) and float (F16) products, biases, q/k norms, Gemma's post norms, GELU,
    soft caps and sliding window, Phi-3's fused weights, and flash attention forced f32;
    where it can, the prepared step runs as one compiled program on the thread team."""
    from dataclasses import replace

    from gguflab.synth import SynthConfig, write_synthetic_llama
    path, tune, fa, more = smollm2, (lambda m: None), "auto", {}
    if case == "split-keys":  # 300 cells: a view of 512, the keys split among the threads
        more = {"prompt": (TOKENS * 15)[:300], "n_ctx": 1024}
    elif case == "biases":
        tune = _biases
    elif case == "f32-attention":
        fa = "f32"
    elif case not in ("q4_1", "split-keys"):
        arch = "llama" if case == "f16" else case
        cfg = SynthConfig(n_layer=3, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, arch=arch,
                          sliding_window=4 if arch.startswith("gemma") else 0, seed=3)
        path = write_synthetic_llama(tmp_path / f"{case}.gguf",
                                     replace(cfg, tokenizer_from=smollm2))
    (a, ka, va, program), (b, kb, vb, _) = _decode_both_ways(path, tune, fa, **more)
    assert a.shape[0] == 13 and np.isfinite(a).all()
    # the step runs as one compiled program (runner/program.py) but for f32 attention
    assert program == (case != "f32-attention")
    for ours, general in ((a, b), (ka, kb), (va, vb)):
        np.testing.assert_array_equal(ours.view(np.uint32), general.view(np.uint32))


def _synthetic(case, smollm2, tmp_path):
    from dataclasses import replace

    from gguflab.synth import SynthConfig, write_synthetic_llama
    arch = "llama" if case == "f16" else case
    cfg = SynthConfig(n_layer=3, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, arch=arch,
                      sliding_window=4 if arch.startswith("gemma") else 0, seed=3)
    return write_synthetic_llama(tmp_path / f"{case}.gguf", replace(cfg, tokenizer_from=smollm2))


@pytest.mark.parametrize("case", ["q4_1", "biases", "f32-attention", "f16", "qwen3", "gemma2",
                                  "gemma3", "phi3"])
def test_prompt_batch_program_is_the_general_route_bit_for_bit(case, smollm2, tmp_path):
    """A batch of 64 tokens or more runs as one compiled program (runner/ubatch.py); the
    general route computes the same per call. Same logits and caches for a first batch, a
    batch at a later position, logits from a row on and the last row's alone (its last
    layer's FFN then takes one token, on the one-token kernels), for integer (Q4_1) and
    float (F16) products, biases, q/k norms, Gemma's post norms, GELU, soft caps and
    sliding window, Phi-3's fused weights and flash attention forced f32."""
    path, tune, fa = smollm2, (lambda m: None), None
    if case == "biases":
        tune = _biases
    elif case == "f32-attention":
        fa = "f32"
    elif case != "q4_1":
        path = _synthetic(case, smollm2, tmp_path)
    rng = np.random.default_rng(1)
    tokens = [int(t) for t in rng.integers(2, 40000, 64 + 70)]
    runs = []
    for program in (True, False):
        m = Model(path)
        m.flash_attn = fa or m.flash_attn
        m.use_ubatch = program
        tune(m)
        cache, last_cache = m.new_cache(256), m.new_cache(256)
        out, used = [], []
        for toks, c, first in ((tokens[:64], cache, 0), (tokens[64:], cache, 5),
                               (tokens[:70], last_cache, None)):
            out.append(m.forward(toks, c, all_logits=first is not None, first=first or 0))
            skip = len(toks) - 1 if first is None else first
            batch = (m._ubatches or {}).get((len(toks), skip, default_threads(), c.k.shape,
                                             m.flash_attn))
            used.append(batch is not None and batch.program is not None)
        runs.append((out, cache.k[:, :, :cache.n], cache.v[:, :, :cache.n], used))
    (a, ka, va, used), (b, kb, vb, unused) = runs
    assert used == [True] * 3 and unused == [False] * 3
    assert a[1].shape == (70 - 5, m.hp.n_vocab) and np.isfinite(a[1]).all()
    for ours, general in (*zip(a, b), (ka, kb), (va, vb)):
        np.testing.assert_array_equal(ours.view(np.uint32), general.view(np.uint32))


@pytest.mark.parametrize("ftype", [2, 15])  # Q4_0, Q4_K_M
def test_prompt_batch_program_over_repacked_weights(ftype, tmp_path, smollm2):
    """Weights llama.cpp repacks (Q4_0, Q4_K on AVX2: x packed once for the products of one
    input, then ggml's gemm order and its gemv's for a remainder of tokens) in the program:
    the general route's bits. A batch under 64 tokens takes the general route."""
    path = tmp_path / "q.gguf"
    llama_quantize(smollm2, str(path), ftype, allow_requantize=True)
    m = Model(path)
    tokens = list(range(100, 187))  # (87: three tokens past the gemm's fours)
    whole = m.forward(tokens, m.new_cache(128), all_logits=True)
    short = m.forward(tokens[:63], m.new_cache(128), all_logits=True)
    assert [b.program is not None for b in m._ubatches.values()] == [True]
    m.use_ubatch = False
    np.testing.assert_array_equal(m.forward(tokens, m.new_cache(128), all_logits=True), whole)
    np.testing.assert_array_equal(m.forward(tokens[:63], m.new_cache(128), all_logits=True),
                                  short)


def test_context_full_is_a_clear_error(smollm2):
    m = Model(smollm2)
    cache = m.new_cache(8)
    m.forward(TOKENS[:8], cache)
    with pytest.raises(UserError, match="context full"):
        m.forward(TOKENS[8:9], cache)


def test_qwen2_neox_rope_and_biases_match_hf(tmp_path, fixtures):
    from hf_models import hf_forward, llama_config, random_weights, write_folder

    from gguflab.convert.pipeline import ConvertOptions, convert_model

    cfg = llama_config("Qwen2ForCausalLM", tie=True, rope_theta=1000000.0)
    w = random_weights(cfg, seed=5, bias=True)
    folder = write_folder(tmp_path / "q", cfg, w, fixtures / "llama2-tokenizer.model")
    list(convert_model(folder, tmp_path / "q.gguf", ConvertOptions(outtype="f32")))
    tokens = [1, 450, 4996, 17354, 1701, 29916, 432, 17204]
    m = Model(tmp_path / "q.gguf")
    ours = m.forward(tokens, m.new_cache(16), all_logits=True)
    want = hf_forward(cfg, w, tokens)
    assert np.abs(ours - want).max() < 2e-3 * np.abs(want).max()


def test_perplexity_equals_llama_cpp_protocol_on_its_logits(smol_f32):
    rng = np.random.default_rng(0)
    tokens = [int(t) for t in rng.integers(2, 49152, 3 * 32)]
    m = Model(smol_f32)
    res = perplexity(m, tokens, 32, add_bos=True, bos_id=1)
    assert res.n_chunks == 3 and res.count == 3 * 15
    # the same protocol on llama.cpp's logits: chunks of n_ctx, BOS first, second half scored
    nll = []
    for i in range(3):
        chunk = tokens[i * 32:(i + 1) * 32]
        chunk[0] = 1
        lp = log_softmax(llama_logits(smol_f32, chunk, 32))
        nll += [-lp[j, tokens[i * 32 + j + 1]] for j in range(16, 31)]
    assert abs(res.ppl - np.exp(np.mean(nll))) / res.ppl < 2e-3


def test_perplexity_needs_enough_tokens(smol_f32):
    with pytest.raises(UserError, match="at least 64 tokens"):
        perplexity(Model(smol_f32), list(range(10)), 32, add_bos=True, bos_id=1)


@pytest.mark.parametrize("ubatch", [512, 64])
def test_perplexity_prints_llama_perplexity_s_estimate(smollm2, ubatch, capsys):
    """The same figure to every printed digit. With -ub 64, llama-perplexity's ubatches hold
    21 tokens of each of the 3 chunks it evaluates side by side (a KV stream each), so its
    attention takes the one-query route, not the tiled one: another float order, and
    another PPL (22.0159 against 22.0088 here), which gguflab reproduces by evaluating the
    chunks in those shares."""
    import re

    from llama_tools import run_tool

    from gguflab.catalog import default_eval_text
    from gguflab.cli import main

    args = ["-c", "128", "--chunks", "3", "-ub", str(ubatch), "-t", "2"]
    theirs = run_tool("llama-perplexity", "-m", smollm2, "-f", default_eval_text(), *args)
    capsys.readouterr()
    assert main(["perplexity", "-m", str(smollm2), *args]) == 0
    ours = capsys.readouterr().out

    def final(out):
        return re.search(r"Final estimate: PPL = [\d.]+ \+/- [\d.]+", out)[0]
    assert final(ours) == final(theirs)


def test_no_repack_and_untiled_runs_are_llama_s_too(tmp_path, smollm2, capsys, monkeypatch):
    """llama.cpp's switches for its other product orders, on a Q4_K_M: --no-repack (Q4_K by
    vec_dot or the tiled kernel) and GGML_CPU_TILED_MM=0 (K-quant prompts by vec_dot). Each
    run is llama-perplexity's to the printed digit, and the three differ."""
    import os
    import re
    from unittest import mock

    from llama_tools import run_tool

    from gguflab.catalog import default_eval_text
    from gguflab.cli import main
    from gguflab.runner import kernels, repack

    path = str(tmp_path / "q4km.gguf")
    llama_quantize(smollm2, path, 15, allow_requantize=True)  # 15 = MOSTLY_Q4_K_M
    args = ["-c", "128", "--chunks", "3", "-t", "2"]
    monkeypatch.setattr(repack, "REPACK", True)
    figures = set()
    for flags, tiled in (([], True), (["--no-repack"], True), (["--no-repack"], False)):
        env = {} if tiled else {"GGML_CPU_TILED_MM": "0"}
        with mock.patch.dict(os.environ, env):
            theirs = run_tool("llama-perplexity", "-m", path, "-f", default_eval_text(), *args,
                              *flags)
        monkeypatch.setattr(kernels, "PROMPT_TILED", tiled)
        capsys.readouterr()
        assert main(["perplexity", "-m", path, *args, *flags]) == 0
        ours = capsys.readouterr().out
        pat = r"Final estimate: PPL = [\d.]+ \+/- [\d.]+"
        assert re.search(pat, ours)[0] == re.search(pat, theirs)[0], flags
        figures.add(re.search(pat, ours)[0])
    assert len(figures) == 3
    # the switch is llama.cpp's environment variable, read as its atoi reads it
    import subprocess
    import sys
    for value, want in (("0", "False"), ("1", "True"), ("00x", "False"), ("2", "True")):
        got = subprocess.run([sys.executable, "-c", "from gguflab.runner import kernels; "
                              "print(kernels.PROMPT_TILED)"], capture_output=True, text=True,
                             env={**os.environ, "GGML_CPU_TILED_MM": value}).stdout.strip()
        assert got == want, value


def test_batch_sizes_are_llama_perplexity_s():
    from gguflab.runner.perplexity import batch_sizes, chunk_pieces

    assert batch_sizes(128) == (16, 2048, 512)  # its log: "n_seq=16"
    assert batch_sizes(520) == (3, 1560, 512)  # -b shrinks to the streams' room
    assert batch_sizes(4096) == (1, 2048, 512)
    assert chunk_pieces(128, 16) == [32] * 4  # 512 / 16 of each chunk a ubatch: one-query
    assert chunk_pieces(128, 4) == [128] and chunk_pieces(512, 4) == [512]  # tiled: whole
    assert chunk_pieces(520, 3) == [170, 170, 170, 10]
    assert chunk_pieces(520, 1, 512, 512) == [512, 8]
    with pytest.raises(UserError, match="batch sizes must be positive"):
        batch_sizes(128, 0)


# Both tools compute the same function, but every product rounds its input to 8 bits, so a
# last-bit difference upstream moves some levels and the runs drift apart as llama.cpp's
# own -fa on and off do (1.8% at 128 tokens a chunk): on these 378 tokens, measured
# -1.05% (Q8_0) and +0.57% (the embedded Q4_1); the full text at -c 512 agrees to 0.2%.
@pytest.mark.parametrize("which, bound", [("q8_0", 0.02), ("embedded", 0.02)])
def test_perplexity_of_the_eval_text_matches_llama_cpp(smollm2, smol_f32, tmp_path, which,
                                                       bound):
    from gguflab.catalog import default_eval_text
    from gguflab.runner.tokenizer import Tokenizer

    path = smollm2
    if which == "q8_0":
        path = tmp_path / "q8.gguf"
        llama_quantize(str(smol_f32), str(path), 7)  # 7 = MOSTLY_Q8_0
    m = Model(path)
    m.flash_attn = "off"  # as the reference runs (llama_ref: llama.cpp without flash attention)
    tok = Tokenizer.from_gguf(m.reader)
    ids = tok.encode(open(default_eval_text(), encoding="utf-8").read(), add_special=True)
    ids = ids[: 6 * 128]  # six chunks: the comparison, not the whole text
    ours = perplexity(m, ids, 128, add_bos=True, bos_id=tok.bos_id).ppl
    ref = llama_perplexity(path, list(ids), 128, tok.bos_id)
    print(f"ppl ours {ours:.4f} llama.cpp {ref:.4f}: {100 * (ours - ref) / ref:+.2f}%")
    assert abs(ours - ref) / ref < bound, (ours, ref)


def test_greedy_32_tokens_same_text_as_llama_cpp(smol_f32):
    """32 greedy tokens: llama.cpp's text up to its first near-tie (a top-2 margin that the
    bound between the two could flip), after which either continuation is right."""
    from gguflab.runner.generate import Generation
    from gguflab.runner.sampling import Sampler, SamplerParams
    from gguflab.runner.tokenizer import Tokenizer

    prompt = "The three most important inventions in history are"
    m = Model(smol_f32)
    tok = Tokenizer.from_gguf(m.reader)
    gen = Generation.start(m, tok, 128)
    ours = "".join(gen.stream(tok.encode(prompt), Sampler(SamplerParams(temp=0)), 32))
    ref = reference(smol_f32, tok.encode(prompt), 32, n_ctx=128)
    n = ref.assert_agrees(decode_logits(m, ref.ids, ref.n_prompt, 128), ours)
    print(f"greedy text equal for the {n} of 32 tokens decided beyond {ref.gap_noise:.3g}")


def test_greedy_text_and_logits_are_llama_cpp_s_without_flash_attention(smollm2, tmp_path):
    """Greedy generation with -fa off against llama.cpp's (llama-cpp-python, flash attention
    off) on a Q4_K_M: the same text, from the same logits bit for bit at every step (the
    prompt's last row through the tiled and repacked prompt kernels, then each decoded
    token's through vec_dot and the repacked one-token kernel)."""
    from gguflab.runner.generate import Generation
    from gguflab.runner.sampling import Sampler, SamplerParams
    from gguflab.runner.tokenizer import Tokenizer

    path = str(tmp_path / "q4km.gguf")
    llama_quantize(smollm2, path, 15, allow_requantize=True)  # 15 = MOSTLY_Q4_K_M
    prompt = "The three most important inventions in history are"
    m = Model(path)
    m.flash_attn = "off"
    tok = Tokenizer.from_gguf(m.reader)
    ids = tok.encode(prompt)
    ref = reference(path, ids, 32, n_ctx=128)
    assert len(ref.tokens) >= 8
    gen = Generation.start(m, tok, 128)
    ours = "".join(gen.stream(ids, Sampler(SamplerParams(temp=0)), len(ref.tokens)))
    assert ours == b"".join(ref.pieces).decode("utf-8", "replace")
    logits = decode_logits(m, ref.ids, ref.n_prompt, 128).astype(np.float32)
    np.testing.assert_array_equal(logits, ref.logits.astype(np.float32))


def test_llama3_rope_scaling_uses_rope_freqs_as_llama_cpp_does(tmp_path, fixtures):
    """A LLaMA 3.1-style checkpoint ("llama3" rope scaling): the converter writes
    rope_freqs.weight, and the runner divides each rotary pair's frequency by it, as
    llama.cpp does. A short original context makes most pairs scaled within 48 positions,
    so a runner that ignored the factors would be far outside the bound (checked)."""
    from hf_models import llama_config, random_weights, write_folder

    from gguflab.convert.pipeline import ConvertOptions, convert_model
    from gguflab.runner.cuda.device import HostDevice
    from gguflab.runner.cuda.layers import GpuLayers, forward_offloaded

    cfg = llama_config(rope_theta=10000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})
    w = random_weights(cfg, seed=3)
    for k in w:  # sharp attention, so that positions (and their rotation) matter
        if k.endswith(("q_proj.weight", "k_proj.weight")):
            w[k] *= 4
    folder = write_folder(tmp_path / "l3", cfg, w, fixtures / "llama2-tokenizer.model")
    out = tmp_path / "l3.gguf"
    list(convert_model(folder, out, ConvertOptions(outtype="f32")))
    tokens = [1, *range(300, 347)]
    m = Model(out)
    ours = m.forward(tokens, m.new_cache(64), all_logits=True)
    ref, noise = assert_matches_llama_cpp(out, ours, tokens)
    # the same model with the factors left out is not llama.cpp's
    plain = Model(out)
    plain.inv_freq = m.hp.rope_base ** (-np.arange(0, m.hp.rope_dim, 2) / m.hp.rope_dim)
    plain.rope_freqs = None  # what the CPU's rope divides by
    assert not np.allclose(plain.inv_freq, m.inv_freq)
    off = np.abs(plain.forward(tokens, plain.new_cache(64), all_logits=True) - ref).max()
    assert off > 10 * noise  # measured: 5.2 against a bound of 0.023
    # and the GPU path's rotary table comes from the same frequencies
    gpu = GpuLayers(m, [0, 1], 64, HostDevice(), output=True)
    got = forward_offloaded(m, gpu, tokens, m.new_cache(64), all_logits=True)
    m.flash_attn = "f32"  # the device's attention: f32 throughout (ggml's expf: 2 ulp)
    ours = m.forward(tokens, m.new_cache(64), all_logits=True)
    np.testing.assert_allclose(got, ours, atol=3e-4 * np.abs(ours).max(), rtol=0)  # float order


def test_yarn_rope_scaling_matches_llama_cpp(tmp_path, smollm2):
    """YaRN (Qwen2.5's long-context setting): each rotary pair mixes interpolated and
    extrapolated rotation by ggml's ramp between its correction dims, cos and sin scaled by
    1 + 0.1 ln(factor). Without it the logits are far outside the bound (checked)."""
    from dataclasses import replace

    from gguflab.synth import SynthConfig, write_synthetic_llama

    path = write_synthetic_llama(tmp_path / "yarn.gguf", SynthConfig(
        n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, yarn=(4.0, 16), seed=41,
        tokenizer_from=smollm2))
    m = Model(path)
    assert m.hp.yarn_ext == 1.0 and m.hp.rope_scale == 0.25 and m.hp.n_ctx_orig == 16
    ours = m.forward(TOKENS, m.new_cache(64), all_logits=True)
    ref, noise = assert_matches_llama_cpp(path, ours, TOKENS)
    plain = Model(path)
    plain.hp = replace(plain.hp, yarn_ext=0.0, rope_scale=1.0)
    off = np.abs(plain.forward(TOKENS, plain.new_cache(64), all_logits=True) - ref).max()
    print(f"bound {noise:.3g}; without YaRN {off:.3g}")
    assert off > 10 * noise
