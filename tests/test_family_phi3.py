"""Phi-3 as synthetic GGUF files with SmolLM2's vocabulary: fused attn_qkv and ffn_up
(gate rows first), and LongRoPE factors picked by the context as llama.cpp picks them (its
context padded to 256 against the trained one) with the attention factor on cos and sin.
Our logits against llama.cpp's, on the CPU and the emulated GPU."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from llama_ref import assert_generation_matches_llama_cpp, assert_matches_llama_cpp

from gguflab.runner.cuda.device import HostDevice
from gguflab.runner.cuda.layers import GpuLayers, forward_offloaded
from gguflab.runner.model import Model
from gguflab.synth import SynthConfig, write_synthetic_llama

TOKENS = [1, 504, 3458, 282, 4649, 314, 7042, 30, 378, 3458, 282, 8295, 314, 4110, 30, 378]
BASE = SynthConfig(n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, arch="phi3",
                   seed=31)
# 128: llama.cpp's padded context (256) is past it, the long factors apply; 4096: short
CONFIGS = {"plain": BASE, "longrope-long": replace(BASE, longrope_ctx=128),
           "longrope-short": replace(BASE, longrope_ctx=4096)}


@pytest.fixture(scope="module", params=list(CONFIGS))
def phi3(request, module_tmp, smollm2):
    path = module_tmp("phi3") / f"{request.param}.gguf"
    return write_synthetic_llama(path, replace(CONFIGS[request.param], tokenizer_from=smollm2))



def test_phi3_logits_match_llama_cpp(phi3):
    m = Model(phi3)
    L = m.layers[0]
    assert L.wq.data.shape[0] == 256 and L.wk.data.shape[0] == L.wv.data.shape[0] == 128
    assert L.w_gate.data.shape[0] == L.w_up.data.shape[0] == 512  # row blocks of ffn_up
    ours = m.forward(TOKENS, m.new_cache(64), all_logits=True)
    ref, noise = assert_matches_llama_cpp(phi3, ours, TOKENS)
    if m.rope_long is not None:  # the other factors are not llama.cpp's choice here
        m.rope_long, m.rope_short = m.rope_short, m.rope_long
        m._rope_memo = None
        other = m.forward(TOKENS, m.new_cache(64), all_logits=True)
        assert np.abs(other - ref).max() > 10 * noise


def test_phi3_on_the_emulated_gpu_matches_the_cpu(phi3):
    m = Model(phi3)
    m.flash_attn = "f32"  # the device's attention: f32 throughout
    ref = m.forward(TOKENS, m.new_cache(64), all_logits=True)
    gpu = GpuLayers(m, [0, 1], 64, HostDevice(), output=True)
    cache = m.new_cache(64)
    got = [forward_offloaded(m, gpu, TOKENS[:9], cache, all_logits=True)]
    got += [forward_offloaded(m, gpu, [t], cache)[None] for t in TOKENS[9:]]
    # F16 weights: both sides round each product's input to fp16 (llama.cpp's dot type for
    # F16), so summed in another order an activation can land one fp16 step (2^-11) apart
    np.testing.assert_allclose(np.vstack(got), ref, atol=3e-3 * np.abs(ref).max(), rtol=0)


@pytest.fixture(scope="module")
def phi3_plain(module_tmp, smollm2):
    path = module_tmp("phi3-q") / "phi3.gguf"
    return write_synthetic_llama(path, replace(BASE, tokenizer_from=smollm2))


@pytest.mark.parametrize("name", ["Q4_K_M", "Q3_K_M", "Q2_K", "Q6_K"])
def test_phi3_quantizes_byte_identical_to_llama_cpp(phi3_plain, name, tmp_path):
    """llama-quant.cpp's rules for the fused attn_qkv and ffn_up."""
    from ggml_oracle import llama_quantize
    from test_quantize_oracle import assert_same_file, run_ours

    from gguflab.quant.mixes import parse_mix

    ref, ours = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    llama_quantize(str(phi3_plain), str(ref), int(parse_mix(name).ftype))
    run_ours(phi3_plain, ours, name)
    assert_same_file(ref, ours)


def test_phi3_generation_and_perplexity_match_llama_cpp(phi3):
    assert_generation_matches_llama_cpp(phi3)
