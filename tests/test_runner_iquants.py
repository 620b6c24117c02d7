"""The modern loop on a real model, against llama.cpp on the same files: SmolLM2 (F32),
an importance matrix collected by gguflab, quantized to IQ4_XS, IQ3_S and IQ2_XXS, and each
file's perplexity (llama-perplexity's protocol) from our runner and from llama.cpp's."""

from __future__ import annotations

from collections import Counter

import pytest
from ggml_oracle import llama_quantize
from llama_ref import llama_perplexity

from gguflab.catalog import default_eval_text
from gguflab.gguf import GGMLType, GGUFReader
from gguflab.imatrix.collect import collect_imatrix
from gguflab.quant.mixes import parse_mix
from gguflab.quant.pipeline import QuantizeOptions, quantize_model
from gguflab.runner.model import Model
from gguflab.runner.perplexity import perplexity
from gguflab.runner.tokenizer import Tokenizer

N_CTX, CHUNKS = 128, 6
# llama.cpp rounds the activations of every product with a quantized weight to 8 bits
# (its vec_dot_type) and gguflab's batched products do not yet (issue #16): on these files
# that alone moves the perplexity by up to about 2% (measured: IQ4_XS -1.78%, IQ2_XXS -0.84%,
# IQ3_S +0.04%; without an imatrix IQ4_NL -0.57%, Q4_K_M +0.39%). The bound is 1% but for
# IQ4_XS, where nearly every tensor is IQ4_NL's 16 uneven levels.
BOUND = {"IQ4_XS": 0.025, "IQ3_S": 0.01, "IQ2_XXS": 0.01}
# IQ4_XS (and the IQ4_NL it falls back to): products now llama.cpp's bit for bit
# (test_runner_iq4_products.py); what is left is the reference's run (flash attention off,
# a chunk a batch) against our default one: measured -0.008% (28.9010 vs 28.9033); with
# flash attention off and -b 128 too, 1.5e-8
BOUND["IQ4_XS"] = 0.001


@pytest.fixture(scope="module")
def smol_f32(module_tmp, smollm2):
    out = module_tmp("iquants") / "smol-f32.gguf"
    llama_quantize(smollm2, str(out), 0, allow_requantize=True)  # 0 = ALL_F32
    return out


@pytest.fixture(scope="module")
def imatrix(smol_f32, module_tmp):
    out = module_tmp("iquants-imatrix") / "smol.imatrix.gguf"
    for _ in collect_imatrix(str(smol_f32), default_eval_text(), str(out), n_ctx=N_CTX,
                             chunks=3, compute_ppl=False):
        pass
    return str(out)


# (IQ3_S and IQ2_XXS: against llama-perplexity itself, to the printed digit, below. Against
# this test's reference, llama-cpp-python's library and protocol, gguflab is 1.2-1.9% higher
# on their files (IQ3_S 31.7428 vs 31.3615; 31.8875 on main, products on floats): not
# explained yet, as llama-perplexity's figures are gguflab's exactly)
@pytest.mark.parametrize("mix", ["IQ4_XS"])
def test_perplexity_matches_llama_cpp(smol_f32, imatrix, tmp_path, mix):
    out = tmp_path / f"smol-{mix}.gguf"
    for _ in quantize_model(str(smol_f32), str(out), parse_mix(mix),
                            QuantizeOptions(imatrix=imatrix, stats=False)):
        pass
    types = Counter(t.type for t in GGUFReader(out).tensors)
    assert types[GGMLType[mix]] > 0, types  # the type itself, not only its fallbacks
    m = Model(out)
    tok = Tokenizer.from_gguf(m.reader)
    ids = tok.encode(open(default_eval_text(), encoding="utf-8").read(), add_special=True)
    ids = list(ids[: CHUNKS * N_CTX])
    ours = perplexity(m, ids, N_CTX, add_bos=True, bos_id=tok.bos_id).ppl
    ref = llama_perplexity(out, ids, N_CTX, tok.bos_id)
    print(f"{mix}: ppl ours {ours:.4f} llama.cpp {ref:.4f}: {100 * (ours - ref) / ref:+.2f}%")
    assert abs(ours - ref) / ref < BOUND[mix], (ours, ref)


# The IQ3_S and IQ2_XXS files hold IQ4_NL, Q4_0, Q2_K and Q8_0 tensors too (SmolLM2's rows
# of 576 are not whole super-blocks). Where every product of the file runs on integer dot
# products in llama.cpp's orders (the grid i-quants: test_runner_iq_products.py), its
# perplexity is llama-perplexity's (default flags) to the printed digit; until then (IQ4_NL
# on floats: the IQ4 products are another change) within 3%, the rounding of x that the
# float products skip.
@pytest.mark.parametrize("mix", ["IQ3_S", "IQ2_XXS"])
def test_perplexity_is_llama_perplexity_s(smol_f32, imatrix, tmp_path, mix):
    import re

    from llama_tools import run_tool

    from gguflab.runner import kernels

    out = tmp_path / f"smol-{mix}.gguf"
    for _ in quantize_model(str(smol_f32), str(out), parse_mix(mix),
                            QuantizeOptions(imatrix=imatrix, stats=False)):
        pass
    types = {t.type for t in GGUFReader(out).tensors} - {GGMLType.F32}
    assert GGMLType[mix] in types
    exact = all(kernels.quantizes_activations(t) for t in types)
    m = Model(out)
    tok = Tokenizer.from_gguf(m.reader)
    with open(default_eval_text(), encoding="utf-8") as f:
        ids = tok.encode(f.read(), add_special=True)
    ours = perplexity(m, ids, N_CTX, add_bos=tok.add_bos, bos_id=tok.bos_id,
                      n_chunks=CHUNKS).ppl
    text = run_tool("llama-perplexity", "-m", out, "-f", default_eval_text(), "-c", N_CTX,
                    "--chunks", CHUNKS, "-t", 2)
    ref = re.search(r"Final estimate: PPL = ([\d.]+)", text)[1]
    print(f"{mix}: ours {ours:.4f} llama-perplexity {ref} (every product exact: {exact})")
    if exact:
        assert f"{ours:.4f}" == ref
    else:
        assert abs(ours - float(ref)) / float(ref) < 0.03, (ours, ref)
