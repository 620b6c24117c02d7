"""Mixture-of-experts models (Mixtral: llama with experts; Qwen3-MoE: Qwen3's attention
with experts), as synthetic GGUF files with SmolLM2's vocabulary: our logits against
llama.cpp's on the same file, and every quantized byte against llama_model_quantize (the
n_expert-dependent rules of llama-quant.cpp included)."""

from __future__ import annotations

import numpy as np
import pytest
from ggml_oracle import llama_quantize
from llama_ref import assert_generation_matches_llama_cpp, assert_matches_llama_cpp
from test_quantize_oracle import assert_same_file, run_ours

from gguflab.errors import UserError
from gguflab.quant.mixes import parse_mix
from gguflab.runner.cuda.device import HostDevice
from gguflab.runner.cuda.layers import GpuLayers
from gguflab.runner.model import Model, moe_ffn
from gguflab.synth import SynthConfig, write_synthetic_llama

TOKENS = [1, 504, 3458, 282, 4649, 314, 7042, 30, 378, 3458, 282, 8295, 314, 4110, 30, 378]
CONFIGS = {
    "mixtral": SynthConfig(n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2,
                           n_expert=8, n_expert_used=2, seed=11),
    "qwen3moe": SynthConfig(n_layer=2, n_embd=256, n_ff=256, n_head=4, n_head_kv=2,
                            arch="qwen3moe", n_expert=4, n_expert_used=2, seed=12),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def moe(request, module_tmp, smollm2):
    path = module_tmp("moe") / f"{request.param}.gguf"
    from dataclasses import replace

    return write_synthetic_llama(path, replace(CONFIGS[request.param], tokenizer_from=smollm2))



def test_moe_logits_match_llama_cpp(moe):
    m = Model(moe)
    assert m.hp.n_expert and all(L.experts is not None for L in m.layers)
    ours = m.forward(TOKENS, m.new_cache(64), all_logits=True)
    ref, noise = assert_matches_llama_cpp(moe, ours, TOKENS)


def test_decoding_one_token_at_a_time_routes_as_the_batch(moe):
    m = Model(moe)
    whole = m.forward(TOKENS, m.new_cache(64), all_logits=True)
    cache = m.new_cache(64)
    part = [m.forward(TOKENS[:5], cache, all_logits=True)]
    part += [m.forward([t], cache)[None] for t in TOKENS[5:]]
    # F16 weights: gemv and gemm round each product's input to fp16 (llama.cpp's dot type for
    # F16), so summed in another order an activation can land one fp16 step (2^-11) apart
    np.testing.assert_allclose(np.vstack(part), whole, atol=3e-3 * np.abs(whole).max(), rtol=0)


def test_router_picks_the_most_probable_experts_and_renormalises():
    """moe_ffn against a per-token loop written from the definition."""
    from gguflab.runner.model import Experts, Weight

    def silu(x):
        return x / (np.float32(1) + np.exp(-x))

    rng = np.random.default_rng(3)
    n_exp, d, f = 5, 32, 64
    mk = lambda *s: Weight(rng.standard_normal(s).astype(np.float32), "F32")  # noqa: E731
    from gguflab.gguf import GGMLType

    ex = Experts(mk(n_exp, d), mk(n_exp, f, d), mk(n_exp, f, d), mk(n_exp, d, f), 3)
    for w in (ex.router, ex.gate, ex.up, ex.down):
        w.type = GGMLType.F32
    h = rng.standard_normal((6, d)).astype(np.float32)
    got = moe_ffn(ex, h)
    for t in range(6):
        z = ex.router.data.astype(np.float64) @ h[t]
        p = np.exp(z - z.max())
        p /= p.sum()
        top = np.argsort(-p)[:3]
        want = sum(p[e] / p[top].sum() * (ex.down.data[e] @ (
            silu(ex.gate.data[e] @ h[t]) * (ex.up.data[e] @ h[t]))) for e in top)
        np.testing.assert_allclose(got[t], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_moe_on_the_emulated_gpu_matches_the_cpu(moe, monkeypatch):
    """The router and its picks on the device (moe_route), each picked expert's products
    read from the stacked weights at the picked offset (matvec_sel), weighted sums
    (moe_add); a decode step is one recording whatever the router picks."""
    from gguflab.runner.cuda.layers import forward_offloaded
    from gguflab.runner.load import load_model

    monkeypatch.setenv("GGUFLAB_GPU", "host")
    lm = load_model(moe, 64, 999)
    m = lm.model
    assert m.gpu is not None and len(m.gpu.layers) == m.hp.n_layer and m.gpu.output
    cpu = Model(moe)
    cpu.flash_attn = "f32"  # the device's attention: f32 throughout
    ref = cpu.forward(TOKENS, cpu.new_cache(64), all_logits=True)
    cache = m.new_cache(64)
    got = [forward_offloaded(m, m.gpu, TOKENS[:6], cache, all_logits=True)]
    got += [forward_offloaded(m, m.gpu, [t], cache)[None] for t in TOKENS[6:]]
    # F16 weights: both sides round each product's input to fp16 (llama.cpp's dot type for
    # F16), so summed in another order an activation can land one fp16 step (2^-11) apart
    np.testing.assert_allclose(np.vstack(got), ref, atol=3e-3 * np.abs(ref).max(), rtol=0)
    assert m.gpu.graph_error == ""
    with pytest.raises(UserError, match="offloaded layers must be the last ones"):
        GpuLayers(m, [0], 64, HostDevice())


@pytest.mark.parametrize("name", ["Q4_K_M", "Q3_K_M", "Q2_K", "Q6_K"])
def test_moe_quantizes_byte_identical_to_llama_cpp(moe, name, tmp_path):
    ref, ours = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    llama_quantize(str(moe), str(ref), int(parse_mix(name).ftype))
    run_ours(moe, ours, name)
    assert_same_file(ref, ours)


def test_inspect_and_the_models_tab_show_what_the_family_adds(moe, capsys):
    import os

    from gguflab.cli import main
    from gguflab.tui.scan import model_details, scan_models

    assert main(["inspect", moe]) == 0
    n, k = (8, 2) if "mixtral" in moe else (4, 2)
    out = capsys.readouterr().out
    assert f"experts: {n}, experts used: {k}" in out
    assert ("q/k norm" in out) == ("qwen3moe" in moe)
    entry = next(e for e in scan_models([os.path.dirname(moe)]) if e.path == moe)
    hp = dict(model_details(entry).hparams)
    assert hp["experts"] == str(n) and hp["experts used"] == str(k)
    assert ("q/k norm" in hp) == ("qwen3moe" in moe)


def test_moe_generation_and_perplexity_match_llama_cpp(moe):
    assert_generation_matches_llama_cpp(moe)
