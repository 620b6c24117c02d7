"""Matrix-product speed over quantized weights: gguflab.runner.kernels.matmul per type.

    python bench/matmul.py [--n 4096] [--prompt 64] [--threads N] [--types Q4_K,Q8_0]
                           [--repeat 3]

Per type: decode (n_tok=1) in GB/s of weight bytes read, prompt (n_tok=--prompt) in GFLOP/s,
for an n x n weight on all cores; the first line is numpy's float32 `x @ W.T` on the
dequantized weight as a reference. Each figure is the best of --repeat timed batches.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from gguflab import quant  # noqa: E402
from gguflab.gguf import GGMLType  # noqa: E402
from gguflab.runner.kernels import SUPPORTED_TYPES, matmul  # noqa: E402


def best_time(fn, min_s: float = 0.3, repeat: int = 3) -> float:
    fn()  # warm up: compile, caches, pool
    best = float("inf")
    for _ in range(repeat):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_s:
                break
        best = min(best, dt / n)
    return best


def make_weight(t: GGMLType, wf: np.ndarray) -> np.ndarray:
    if t == GGMLType.F32:
        return wf
    if t == GGMLType.F16:
        return wf.astype(np.float16)
    q = quant.get(t).quantize(wf)
    return q.view(np.uint16) if t == GGMLType.BF16 else q


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--types", default=",".join(t.name for t in SUPPORTED_TYPES))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    n, p = args.n, args.prompt
    rng = np.random.default_rng(0)
    wf = rng.standard_normal((n, n), dtype=np.float32) * 0.02
    x1 = rng.standard_normal(n, dtype=np.float32)
    xp = rng.standard_normal((p, n), dtype=np.float32)
    flops = 2.0 * p * n * n

    def row(name, nbytes, t1, tp):
        print(f"{name:<12} {nbytes / 1e6:9.1f} {t1 * 1e3:9.3f} {nbytes / t1 / 1e9:8.2f} "
              f"{tp * 1e3:10.2f} {flops / tp / 1e9:9.1f}", flush=True)

    print(f"{n} x {n} weight, decode n_tok=1, prompt n_tok={p}, "
          f"threads={args.threads or os.cpu_count()}")
    print(f"{'type':<12} {'MB':>9} {'decode ms':>9} {'GB/s':>8} {'prompt ms':>10} {'GFLOP/s':>9}")
    wd = np.ascontiguousarray(wf)
    row("numpy f32", wd.nbytes, best_time(lambda: x1 @ wd.T, repeat=args.repeat),
        best_time(lambda: xp @ wd.T, repeat=args.repeat))
    for name in args.types.split(","):
        t = GGMLType[name.strip().upper()]
        w = make_weight(t, wf)
        th = args.threads
        t1 = best_time(lambda w=w, t=t, th=th: matmul(w, t, x1, threads=th), repeat=args.repeat)
        tp = best_time(lambda w=w, t=t, th=th: matmul(w, t, xp, threads=th), repeat=args.repeat)
        row(t.name, w.nbytes, t1, tp)


if __name__ == "__main__":
    main()
