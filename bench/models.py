"""The models the speed comparisons run on, made in a temporary folder: SmolLM2-135M (the
embedded one, requantized by llama.cpp to F16, then Q8_0 and Q4_K_M by gguflab) and, on
request, a synthetic ~1.2B llama-shaped model in Q4_K_M."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from ggml_oracle import llama_quantize  # noqa: E402

from gguflab.catalog import embedded_model  # noqa: E402
from gguflab.quant.mixes import parse_mix  # noqa: E402
from gguflab.quant.pipeline import QuantizeOptions, quantize_model  # noqa: E402
from gguflab.synth import SynthConfig, write_synthetic_llama  # noqa: E402


def quantize(src: str, dst: str, mix: str, threads: int) -> str:
    for _ in quantize_model(src, dst, parse_mix(mix), QuantizeOptions(threads=threads,
                                                                       overwrite=True)):
        pass
    return dst


def quiet_llama_quantize(src: str, dst: str, ftype: int) -> None:
    """llama.cpp's quantize prints every tensor on the C streams: send them to /dev/null."""
    sys.stdout.flush()
    saved = os.dup(1), os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        llama_quantize(src, dst, ftype, allow_requantize=True)
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def bench_models(tmp: str, threads: int, synth_1b: bool, smol: bool = True,
                 shipped: bool = False) -> list[tuple[str, str]]:
    """[(label, path)] of the models made in `tmp`: SmolLM2 in F16, Q8_0 and Q4_K_M unless
    not `smol`, the embedded Q4_1 if `shipped`, the synthetic 1.2B if `synth_1b`."""
    models = []
    if smol:
        f16 = os.path.join(tmp, "smol-f16.gguf")
        quiet_llama_quantize(embedded_model(), f16, 1)
        models += [("SmolLM2-135M F16", f16),
                   ("SmolLM2-135M Q8_0", quantize(f16, os.path.join(tmp, "q8.gguf"), "Q8_0",
                                                  threads)),
                   ("SmolLM2-135M Q4_K_M", quantize(f16, os.path.join(tmp, "q4.gguf"),
                                                    "Q4_K_M", threads))]
    if shipped:
        models.append(("SmolLM2-135M Q4_1 (shipped)", embedded_model()))
    if synth_1b:
        big = os.path.join(tmp, "synth-1b-f16.gguf")
        write_synthetic_llama(big, SynthConfig(n_layer=22, n_embd=2048, n_ff=5632,
                                               n_head=32, n_head_kv=4, name="synth-1b",
                                               tokenizer_from=embedded_model()))
        models.append(("synthetic 1.2B Q4_K_M",
                       quantize(big, os.path.join(tmp, "big-q4.gguf"), "Q4_K_M", threads)))
        os.unlink(big)
    return models
