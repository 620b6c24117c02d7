"""Gemma 2 and Gemma 3 (text) as synthetic GGUF files with SmolLM2's vocabulary: scaled
embeddings, pre and post norms, GeGLU with ggml's GELU, soft-capped attention and output
(Gemma 2), q/k norms and the local layers' own RoPE base (Gemma 3), and a 4-token sliding
window on the local layers so that a 16-token prompt runs past it. Our logits against
llama.cpp's on the same file, decoding against the batch, and llama_model_quantize bytes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from ggml_oracle import llama_quantize
from llama_ref import assert_generation_matches_llama_cpp, assert_matches_llama_cpp
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
def gemma(request, module_tmp, smollm2):
    path = module_tmp("gemma") / f"{request.param}.gguf"
    return write_synthetic_llama(path, replace(CONFIGS[request.param], tokenizer_from=smollm2))



def test_gemma_logits_match_llama_cpp(gemma):
    m = Model(gemma)
    want_local = [True, False, True, False] if "gemma2" in gemma else [True] * 5 + [False, True]
    assert list(m.hp.swa_layers) == want_local and m.hp.n_swa == 4
    ours = m.forward(TOKENS, m.new_cache(64), all_logits=True)
    ref, noise = assert_matches_llama_cpp(gemma, ours, TOKENS)
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
    # gemv and gemm sum in other orders (over F16 weights as llama.cpp's do: vec_dot's four
    # accumulators for one token, tinyBLAS's one for a batch), and GELU looks its input up
    # rounded to fp16: float order can move an activation by one fp16 step (1e-3 of it),
    # measured 1.02e-3 of the scale (2 of 786432 logits past 1e-3)
    np.testing.assert_allclose(np.vstack(part), whole, atol=2e-3 * np.abs(whole).max(), rtol=0)


def test_gelu_is_ggml_s_fp16_table():
    """Our GELU table against the one ggml's CPU backend builds (read out of libggml-cpu):
    built the same way (tanh rounded to a float), it differs where C's float arithmetic
    contracted an FMA: measured 1 entry in 37,376."""
    from ggml_oracle import ggml_gelu_table

    table = ggml_gelu_table()
    f = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    f = f.astype(np.float32)
    inside = np.isfinite(f) & (f > -10) & (f < 10)
    ours = gelu_ggml(f[inside]).astype(np.float16).view(np.uint16)
    assert (ours != table[inside]).sum() <= 2
    x = np.array([-11, -10, 10, 12], np.float32)
    assert list(gelu_ggml(x)) == [0, 0, 10, 12]  # outside (-10, 10): 0 or x


@pytest.mark.parametrize("name", ["Q4_K_M", "Q3_K_M", "Q2_K", "Q6_K"])
def test_gemma_quantizes_byte_identical_to_llama_cpp(gemma, name, tmp_path):
    ref, ours = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    llama_quantize(str(gemma), str(ref), int(parse_mix(name).ftype))
    run_ours(gemma, ours, name)
    assert_same_file(ref, ours)


def test_gemma_on_the_emulated_gpu_matches_the_cpu(gemma):
    """Every Gemma step on the device: post norms, GeGLU, the window and soft-cap in the
    attention kernel, the local layers' rotary table; the output soft-cap after the head."""
    from gguflab.runner.cuda.device import HostDevice
    from gguflab.runner.cuda.layers import GpuLayers, forward_offloaded

    m = Model(gemma)
    m.flash_attn = "f32"  # the device's attention: f32 throughout
    ref = m.forward(TOKENS, m.new_cache(64), all_logits=True)
    gpu = GpuLayers(m, list(range(m.hp.n_layer)), 64, HostDevice(), output=True)
    cache = m.new_cache(64)
    got = [forward_offloaded(m, gpu, TOKENS[:9], cache, all_logits=True)]
    got += [forward_offloaded(m, gpu, [t], cache)[None] for t in TOKENS[9:]]
    # F16 weights: both sides round each product's input to fp16 (llama.cpp's dot type for
    # F16), so summed in another order an activation can land one fp16 step (2^-11) apart
    # (GELU's fp16 lookups too)
    np.testing.assert_allclose(np.vstack(got), ref, atol=3e-3 * np.abs(ref).max(), rtol=0)


def test_gemma_generation_and_perplexity_match_llama_cpp(gemma):
    assert_generation_matches_llama_cpp(gemma)
