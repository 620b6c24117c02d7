"""Inference speed: gguflab's runner vs llama.cpp (llama-cpp-python) on the same GGUF, same
threads: prompt processing (pp, 64 tokens) and generation (tg, 32 tokens) in tok/s, and
the ratios (ours / llama.cpp: above 1.0 means we are faster).

    python bench/runner.py [--threads 2] [--skip-1b]

Models: SmolLM2-135M (the embedded one, requantized by llama.cpp to F16, then Q8_0 and
Q4_K_M by gguflab) and a synthetic ~1B llama-shaped model in Q4_K_M.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from ggml_oracle import llama_quantize  # noqa: E402

from gguflab.catalog import embedded_model  # noqa: E402
from gguflab.quant.mixes import parse_mix  # noqa: E402
from gguflab.quant.pipeline import QuantizeOptions, quantize_model  # noqa: E402
from gguflab.runner.model import Model  # noqa: E402
from gguflab.synth import SynthConfig, write_synthetic_llama  # noqa: E402

PP, TG = 64, 32


def ours(path, tokens, threads):
    m = Model(path)
    m.forward(tokens[:4], m.new_cache(PP + TG + 8))  # compile / warm up
    cache = m.new_cache(PP + TG + 8)
    t = time.perf_counter()
    logits = m.forward(tokens[:PP], cache)
    pp = PP / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(TG):
        logits = m.forward([int(np.argmax(logits))], cache)
    tg = TG / (time.perf_counter() - t)
    return pp, tg


def theirs(path, tokens, threads):
    import llama_cpp

    ll = llama_cpp.Llama(str(path), n_ctx=PP + TG + 8, n_threads=threads,
                         n_threads_batch=threads, n_batch=PP, verbose=False)
    ll.eval(tokens[:4])
    ll.reset()
    t = time.perf_counter()
    ll.eval(tokens[:PP])
    pp = PP / (time.perf_counter() - t)
    n_vocab = ll.n_vocab()

    def last_logits():
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ll.ctx, -1), (n_vocab,))

    t = time.perf_counter()
    for _ in range(TG):
        ll.eval([int(np.argmax(last_logits()))])
    tg = TG / (time.perf_counter() - t)
    return pp, tg


def quantize(src, dst, mix, threads):
    for _ in quantize_model(src, dst, parse_mix(mix), QuantizeOptions(threads=threads,
                                                                       overwrite=True)):
        pass
    return dst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--skip-1b", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    tokens = [int(t) for t in rng.integers(100, 40000, PP + 8)]
    with tempfile.TemporaryDirectory() as tmp:
        f16 = os.path.join(tmp, "smol-f16.gguf")
        llama_quantize(embedded_model(), f16, 1, allow_requantize=True)
        models = [("SmolLM2-135M F16", f16),
                  ("SmolLM2-135M Q8_0", quantize(f16, os.path.join(tmp, "q8.gguf"), "Q8_0",
                                                 args.threads)),
                  ("SmolLM2-135M Q4_K_M", quantize(f16, os.path.join(tmp, "q4.gguf"), "Q4_K_M",
                                                   args.threads)),
                  ("SmolLM2-135M Q4_1 (shipped)", embedded_model())]
        if not args.skip_1b:
            big = os.path.join(tmp, "synth-1b-f16.gguf")
            write_synthetic_llama(big, SynthConfig(n_layer=22, n_embd=2048, n_ff=5632,
                                                   n_head=32, n_head_kv=4, name="synth-1b",
                                                   tokenizer_from=embedded_model()))
            models.append(("synthetic 1.2B Q4_K_M",
                           quantize(big, os.path.join(tmp, "big-q4.gguf"), "Q4_K_M",
                                    args.threads)))
            os.unlink(big)
        print(f"{args.threads} threads, pp {PP} tokens, tg {TG} tokens (tok/s)")
        print(f"{'model':28s} {'size':>9s} {'pp ours':>8s} {'pp llama':>9s} {'ratio':>6s} "
              f"{'tg ours':>8s} {'tg llama':>9s} {'ratio':>6s} {'GB/s ours':>9s}")
        for name, path in models:
            op, ot = ours(path, tokens, args.threads)
            tp, tt = theirs(path, tokens, args.threads)
            size = os.path.getsize(path)
            print(f"{name:28s} {size / 2**20:6.0f}MiB {op:8.1f} {tp:9.1f} {op / tp:6.2f} "
                  f"{ot:8.1f} {tt:9.1f} {ot / tt:6.2f} {ot * size / 1e9:9.2f}", flush=True)


if __name__ == "__main__":
    main()
