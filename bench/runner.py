"""Inference speed: gguflab's runner vs llama.cpp (llama-cpp-python) on the same GGUF, same
threads: prompt processing (pp, 64 tokens) and generation (tg, 32 tokens) in tok/s, and
the ratios (ours / llama.cpp: above 1.0 means we are faster). Each figure is the median of
--repeat runs, ours and llama.cpp's alternating (the machine is shared: check `uptime`).

    python bench/runner.py [--threads 2] [--repeat 3] [--skip-1b]

Models: SmolLM2-135M (the embedded one, requantized by llama.cpp to F16, then Q8_0 and
Q4_K_M by gguflab) and a synthetic ~1B llama-shaped model in Q4_K_M. Then, per model, where
our generation time goes (the products, run by the thread team, vs the rest: Python, numpy
glue, attention), and the memory roof: file bytes per token over the measured read bandwidth.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from models import bench_models  # noqa: E402

from gguflab.jit import parallel  # noqa: E402
from gguflab.runner.model import Model  # noqa: E402

PP, TG = 64, 32


class Ours:
    def __init__(self, path):
        self.m = Model(path)
        self.m.forward(tokens_warmup(), self.m.new_cache(PP + TG + 8))  # compile / warm up

    def run(self, tokens):
        m = self.m
        cache = m.new_cache(PP + TG + 8)
        t = time.perf_counter()
        logits = m.forward(tokens[:PP], cache)
        pp = PP / (time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(TG):
            logits = m.forward([int(np.argmax(logits))], cache)
        tg = TG / (time.perf_counter() - t)
        return pp, tg


def tokens_warmup():
    return [1, 2, 3, 4]


class Theirs:
    def __init__(self, path, threads):
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.ll = llama_cpp.Llama(str(path), n_ctx=PP + TG + 8, n_threads=threads,
                                  n_threads_batch=threads, n_batch=PP, verbose=False)
        self.ll.eval(tokens_warmup())

    def run(self, tokens):
        ll, llama_cpp = self.ll, self.llama_cpp
        ll.reset()
        t = time.perf_counter()
        ll.eval(tokens[:PP])
        pp = PP / (time.perf_counter() - t)
        n_vocab = ll.n_vocab()

        def last_logits():
            return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ll.ctx, -1),
                                         (n_vocab,))

        t = time.perf_counter()
        for _ in range(TG):
            ll.eval([int(np.argmax(last_logits()))])
        tg = TG / (time.perf_counter() - t)
        return pp, tg


def time_split(ours: Ours, tokens) -> tuple[float, float]:
    """ms per generated token: (total, inside the team's product runs)."""
    spent = [0.0]
    real = parallel.Team.run

    def timed(team, jobs, n_jobs):
        t = time.perf_counter()
        real(team, jobs, n_jobs)
        spent[0] += time.perf_counter() - t

    parallel.Team.run = timed
    try:
        m = ours.m
        cache = m.new_cache(PP + TG + 8)
        logits = m.forward(tokens[:8], cache)
        spent[0] = 0.0
        t = time.perf_counter()
        for _ in range(TG):
            logits = m.forward([int(np.argmax(logits))], cache)
        total = time.perf_counter() - t
    finally:
        parallel.Team.run = real
    return 1e3 * total / TG, 1e3 * spent[0] / TG


def read_bandwidth(threads: int, nbytes: int = 1 << 30) -> float:
    """GB/s of reading a large array on `threads` threads (numpy's sum releases the GIL)."""
    a = np.ones(nbytes // 8, np.float64)
    parts = np.array_split(a, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(3):
            t = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = max(best, a.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--skip-1b", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    tokens = [int(t) for t in rng.integers(100, 40000, PP + 8)]
    with tempfile.TemporaryDirectory() as tmp:
        models = bench_models(tmp, args.threads, not args.skip_1b, shipped=True)
        bw = read_bandwidth(args.threads)
        print(f"{args.threads} threads, pp {PP} tokens, tg {TG} tokens (tok/s, median of "
              f"{args.repeat}); read bandwidth {bw:.1f} GB/s")
        print(f"{'model':28s} {'size':>9s} {'pp ours':>8s} {'pp llama':>9s} {'ratio':>6s} "
              f"{'tg ours':>8s} {'tg llama':>9s} {'ratio':>6s} {'GB/s ours':>9s} "
              f"{'roof tg':>8s}")
        splits = []
        for name, path in models:
            ours, theirs = Ours(path), Theirs(path, args.threads)
            o, t = [], []
            for _ in range(args.repeat):
                o.append(ours.run(tokens))
                t.append(theirs.run(tokens))
            op, ot = np.median(o, axis=0)
            tp, tt = np.median(t, axis=0)
            size = os.path.getsize(path)
            print(f"{name:28s} {size / 2**20:6.0f}MiB {op:8.1f} {tp:9.1f} {op / tp:6.2f} "
                  f"{ot:8.1f} {tt:9.1f} {ot / tt:6.2f} {ot * size / 1e9:9.2f} "
                  f"{bw * 1e9 / size:8.1f}", flush=True)
            splits.append((name, *time_split(ours, tokens)))
            del ours, theirs
        print("\nour generation, ms per token: total = products (thread team) + the rest")
        for name, total, products in splits:
            print(f"{name:28s} {total:7.2f} = {products:6.2f} + {total - products:6.2f}")


if __name__ == "__main__":
    main()
