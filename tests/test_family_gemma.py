"""Gemma 2 and Gemma 3 (text) as synthetic GGUF files with SmolLM2's vocabulary: scaled
embeddings, pre and post norms, GeGLU with ggml's GELU, soft-capped attention and output
(Gemma 2), q/k norms and the local layers' own RoPE base (Gemma 3), and a 4-token sliding
window on the local layers so that a 16-token prompt runs past it. Our logits against
llama.cpp's on the same file, decoding against the batch, and llama_model_quantize bytes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from agreement import assert_same_top1_where_clear
from ggml_oracle import llama_quantize
from llama_ref import LLAMA_SPREADS
from test_quantize_oracle import assert_same_file, run_ours

from gguflab.quant.mixes import parse_mix
from gguflab.runner.model import Model, gelu_ggml
from gguflab.synth import SynthConfig, write_synthetic_llama

TOKENS = [1, 504, 3458, 282, 4649, 314, 7042, 30, 378, 3458, 282, 8295, 314, 4110, 30, 378]
CONFIGS = {
    "gemma2": SynthConfig(n_layer=4, n_embd=256, n_ff=512, n_head=4, n_head_kv=2,
                          arch="gemma2", sliding_window=4, seed=21),
    "gemma3": SynthConfig(n_layer=7, n_embd=256, n_ff=512, n_head=4, n_head_kv=2,
                          arch="gemma3", sliding_window=4, seed=22),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def gemma(request, tmp_path_factory, smollm2):
    path = tmp_path_factory.mktemp("gemma") / f"{request.param}.gguf"
    return write_synthetic_llama(path, replace(CONFIGS[request.param], tokenizer_from=smollm2))


def _llama_logits(path, tokens, flash_attn=False):
    llama_cpp = pytest.importorskip("llama_cpp")
    m = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2,
                        flash_attn=flash_attn)
    m.eval(tokens)
    return np.array(m.scores[: len(tokens)], np.float64)


def test_gemma_logits_match_llama_cpp(gemma):
    m = Model(gemma)
    want_local = [True, False, True, False] if "gemma2" in gemma else [True] * 5 + [False, True]
    assert list(m.hp.swa_layers) == want_local and m.hp.n_swa == 4
    ours = m.forward(TOKENS, m.new_cache(64), all_logits=True)
    ref = _llama_logits(gemma, TOKENS)
    spread = np.abs(_llama_logits(gemma, TOKENS, flash_attn=True) - ref).max()
    noise = max(LLAMA_SPREADS * spread, 1e-4 * np.abs(ref).max())  # (a spread of 0 is luck)
    assert_same_top1_where_clear(ref, ours, noise)
    # the window matters here: without it the logits are far outside that bound
    m.hp = replace(m.hp, swa_layers=(False,) * m.hp.n_layer)
    full = m.forward(TOKENS, m.new_cache(64), all_logits=True)
    assert np.abs(full - ref).max() > 10 * noise


def test_gemma_decoding_equals_the_batch(gemma):
    m = Model(gemma)
    whole = m.forward(TOKENS, m.new_cache(64), all_logits=True)
    cache = m.new_cache(64)
    part = [m.forward(TOKENS[:3], cache, all_logits=True)]
    part += [m.forward([t], cache)[None] for t in TOKENS[3:]]  # the window slides per step
    # gemv and gemm sum in other orders, and GELU looks its input up rounded to fp16: float
    # order can move an activation by one fp16 step (1e-3 of it), measured 3e-4 of the scale
    np.testing.assert_allclose(np.vstack(part), whole, atol=1e-3 * np.abs(whole).max(), rtol=0)


def test_gelu_is_ggml_s_fp16_table():
    x = np.array([-11, -10, -3.3, -0.5, 0, 1e-3, 0.7, 2.5, 9.99, 10, 12], np.float32)
    exact = 0.5 * x * (1 + np.tanh(0.7978845608 * x * (1 + 0.044715 * x.astype(np.float64) ** 2)))
    got = gelu_ggml(x)
    assert got[0] == 0 and got[-1] == 12 and got[-2] == 10  # outside [-10, 10): 0 or x
    np.testing.assert_allclose(got, exact, rtol=2e-3, atol=1e-3)  # fp16 table: 3 digits
    assert (got[2:-2] == got[2:-2].astype(np.float16)).all()  # every value an fp16


@pytest.mark.parametrize("name", ["Q4_K_M", "Q3_K_M", "Q2_K", "Q6_K"])
def test_gemma_quantizes_byte_identical_to_llama_cpp(gemma, name, tmp_path):
    ref, ours = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    llama_quantize(str(gemma), str(ref), int(parse_mix(name).ftype))
    run_ours(gemma, ours, name)
    assert_same_file(ref, ours)
