"""Quantize speed per type: gguflab's `QuantType.quantize` against llama.cpp's
`ggml_quantize_chunk` (what llama-quantize calls for each tensor) on the same weight-like
matrix, the same number of threads, with and without an importance matrix. Prints the median
seconds of each, the ratio (ours / llama.cpp: below 1.0 means we are faster) and whether the
bytes are equal.

    python bench/quant_types.py [--types IQ4_XS,IQ2_XXS,Q4_K] [--shape 4096x4096]
                                [--threads 2] [--repeat 3]

Without --types it runs every registered weight type.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from ggml_oracle import libggml  # noqa: E402

from gguflab import quant  # noqa: E402
from gguflab.gguf import GGMLType, type_info  # noqa: E402


def ggml_chunked(t: GGMLType, x: np.ndarray, im: np.ndarray | None, threads: int):
    """llama.cpp's quantizer over `threads` threads, rows split as llama-quantize splits them
    (ctypes releases the GIL)."""
    lib = libggml()
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    rows, n = x.shape
    out = np.zeros((rows, type_info(t).row_bytes(n)), np.uint8)
    bounds = np.linspace(0, rows, threads + 1).astype(int)

    def work(r0: int, r1: int) -> None:
        fn(int(t), x.ctypes.data, out.ctypes.data, r0 * n, r1 - r0, n,
           None if im is None else im.ctypes.data)

    pool = [threading.Thread(target=work, args=(int(a), int(b)))
            for a, b in zip(bounds[:-1], bounds[1:])]
    t0 = time.perf_counter()
    for p in pool:
        p.start()
    for p in pool:
        p.join()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", default="")
    ap.add_argument("--shape", default="4096x4096")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    rows, n = (int(v) for v in a.shape.lower().split("x"))
    types = ([GGMLType[s.strip().upper()] for s in a.types.split(",") if s.strip()]
             or [t for t in quant.weight_types() if quant.get(t).info.block_size > 1])
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((rows, n)) * 0.02).astype(np.float32)
    imatrix = rng.lognormal(0.0, 1.5, n).astype(np.float32)
    print(f"{rows}x{n} float32, {a.threads} threads, median of {a.repeat}")
    print(f"{'type':8} {'imatrix':7} {'llama.cpp s':>11} {'gguflab s':>10} {'ratio':>6}  bytes")
    libggml().ggml_quantize_init.argtypes = [ctypes.c_int]
    for t in types:
        qt = quant.get(t)
        libggml().ggml_quantize_init(int(t))
        variants = [None, imatrix] if qt.uses_imatrix and not qt.requires_imatrix else (
            [imatrix] if qt.requires_imatrix else [None])
        for im in variants:
            qt.quantize(x[:8], threads=a.threads, imatrix=im)  # compile outside the timing
            theirs, ours = [], []
            for _ in range(a.repeat):
                dt, want = ggml_chunked(t, x, im, a.threads)
                theirs.append(dt)
                t0 = time.perf_counter()
                got = qt.quantize(x, threads=a.threads, imatrix=im)
                ours.append(time.perf_counter() - t0)
            tm, om = statistics.median(theirs), statistics.median(ours)
            same = "equal" if np.array_equal(got, want) else "DIFFER"
            print(f"{t.name:8} {'yes' if im is not None else 'no':7} {tm:11.3f} {om:10.3f} "
                  f"{om / tm:6.2f}  {same}", flush=True)


if __name__ == "__main__":
    main()
