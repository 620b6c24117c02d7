"""Qwen3 (dense), end to end on a tiny random checkpoint: head_dim from the config (not
n_embd / n_head), an RMSNorm over each head of q and k before NEOX RoPE, no biases, tied
embeddings. Converted by us, run by us on the CPU and the emulated GPU, against a float64
numpy forward pass of the HF weights and against llama.cpp on the same file."""

from __future__ import annotations

import numpy as np
import pytest
from agreement import assert_same_top1_where_clear
from hf_models import hf_forward, llama_config, random_weights, write_folder
from llama_ref import assert_generation_matches_llama_cpp, assert_matches_llama_cpp

from gguflab.convert.pipeline import ConvertOptions, convert_model
from gguflab.gguf import GGUFReader
from gguflab.runner.cuda.device import HostDevice
from gguflab.runner.cuda.layers import GpuLayers, forward_offloaded
from gguflab.runner.model import Model

TOKENS = [1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278, 17366, 11203, 29889]


@pytest.fixture(scope="module")
def qwen3(module_tmp, fixtures):
    d = module_tmp("qwen3")
    cfg = llama_config("Qwen3ForCausalLM", tie=True, head_dim=32, rope_theta=1000000.0,
                       attention_bias=False)
    w = random_weights(cfg, seed=7)
    for k in w:  # sharp attention, so that the per-head norms and positions matter
        if k.endswith(("q_proj.weight", "k_proj.weight")):
            w[k] *= 3
    folder = write_folder(d / "tiny-qwen3", cfg, w, fixtures / "llama2-tokenizer.model")
    out = d / "qwen3-f32.gguf"
    list(convert_model(folder, out, ConvertOptions(outtype="f32")))
    return cfg, w, out



def test_converted_file_has_qwen3_s_keys_and_tensors(qwen3):
    cfg, _, out = qwen3
    r = GGUFReader(out)
    assert r.architecture == "qwen3"
    assert r.get("qwen3.attention.key_length") == r.get("qwen3.attention.value_length") == 32
    t = {x.name: x for x in r.tensors}
    assert "output.weight" not in t  # tied
    assert t["blk.0.attn_q_norm.weight"].shape == (32,)
    assert t["blk.0.attn_q.weight"].shape == (4 * 32, 64)  # n_head * head_dim != n_embd
    assert t["blk.1.attn_output.weight"].shape == (64, 4 * 32)


def test_qwen3_logits_match_the_hf_forward_pass(qwen3):
    cfg, w, out = qwen3
    m = Model(out)
    ours = m.forward(TOKENS, m.new_cache(32), all_logits=True)
    want = hf_forward(cfg, w, TOKENS)
    # float32 against float64, the same arithmetic: float order only
    assert_same_top1_where_clear(want, ours, 2e-3 * np.abs(want).max())
    # the q/k norms matter here: leaving them out is far outside that bound
    for L in m.layers:
        L.q_norm, L.k_norm = np.ones_like(L.q_norm), np.ones_like(L.k_norm)
    plain = m.forward(TOKENS, m.new_cache(32), all_logits=True)
    assert np.abs(plain - want).max() > 50 * 2e-3 * np.abs(want).max()


def test_qwen3_logits_match_llama_cpp(qwen3):
    _, _, out = qwen3
    m = Model(out)
    ours = m.forward(TOKENS, m.new_cache(64), all_logits=True)
    ref, noise = assert_matches_llama_cpp(out, ours, TOKENS)


def test_qwen3_on_the_emulated_gpu_matches_the_cpu(qwen3):
    _, _, out = qwen3
    m = Model(out)
    m.flash_attn = "f32"  # the device's attention: f32 throughout
    ref = m.forward(TOKENS, m.new_cache(32), all_logits=True)
    gpu = GpuLayers(m, [0, 1], 32, HostDevice(), output=True)
    cache = m.new_cache(32)
    got = [forward_offloaded(m, gpu, TOKENS[:9], cache, all_logits=True)]
    got += [forward_offloaded(m, gpu, [t], cache)[None] for t in TOKENS[9:]]  # decode steps
    # the same arithmetic, floats summed in another order (F32 weights: nothing rounded), and
    # ggml's approximate exp in the CPU's f32 attention against the device's expf
    np.testing.assert_allclose(np.vstack(got), ref, atol=3e-4 * np.abs(ref).max(), rtol=0)


@pytest.fixture(scope="module")
def qwen3_256(module_tmp, fixtures):
    """A Qwen3 whose widths take K-quant blocks (256), with head_dim 128 (q is 512 wide)."""
    d = module_tmp("qwen3-256")
    cfg = llama_config("Qwen3ForCausalLM", n_embd=256, n_ff=512, n_layer=3, n_head=4,
                       n_head_kv=2, head_dim=128, tie=True, rope_theta=1000000.0)
    folder = write_folder(d / "qwen3-256", cfg, random_weights(cfg, seed=8),
                          fixtures / "llama2-tokenizer.model")
    out = d / "qwen3-256-f16.gguf"
    list(convert_model(folder, out, ConvertOptions(outtype="f16")))
    return out


@pytest.fixture(scope="module")
def qwen2_256(module_tmp, fixtures):
    """Qwen2.5's layout (q/k/v biases, tied) at K-quant widths, for the quantizer's rules."""
    d = module_tmp("qwen2-256")
    cfg = llama_config("Qwen2ForCausalLM", n_embd=256, n_ff=512, n_layer=3, n_head=4,
                       n_head_kv=2, tie=True, rope_theta=1000000.0)
    folder = write_folder(d / "qwen2-256", cfg, random_weights(cfg, seed=9, bias=True),
                          fixtures / "llama2-tokenizer.model")
    out = d / "qwen2-256-f16.gguf"
    list(convert_model(folder, out, ConvertOptions(outtype="f16")))
    return out


@pytest.mark.parametrize("name", ["Q4_K_M", "Q3_K_M", "Q2_K", "Q6_K"])
@pytest.mark.parametrize("which", ["qwen3", "qwen3_256", "qwen2_256"])
def test_qwen_quantizes_byte_identical_to_llama_cpp(request, which, name, tmp_path):
    from ggml_oracle import llama_quantize
    from test_quantize_oracle import assert_same_file, run_ours

    from gguflab.quant.mixes import parse_mix

    src = request.getfixturevalue(which)
    src = src[2] if isinstance(src, tuple) else src
    ref, ours = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    llama_quantize(str(src), str(ref), int(parse_mix(name).ftype))
    run_ours(src, ours, name)
    assert_same_file(ref, ours)


def test_qwen3_generation_and_perplexity_match_llama_cpp(qwen3):
    assert_generation_matches_llama_cpp(qwen3[2])


def test_qwen2_generation_and_perplexity_match_llama_cpp(qwen2_256):
    assert_generation_matches_llama_cpp(qwen2_256)
