"""Matrix-product speed over quantized weights: gguflab.runner.kernels.matmul against
ggml's own mul_mat (a ggml graph on llama.cpp's CPU backend, the oracle build) per type,
on the same weights and activations, with the ratio.

    python bench/matmul.py [--shapes 576x576,1536x576,576x1536,4096x4096] [--prompt 512]
                           [--threads N] [--types Q4_K,Q8_0] [--repeat 5]

Per type and weight shape (rows x columns): the prompt product (--prompt tokens) in ms for
both, the median of --repeat runs after a warm-up (the two taking turns), and ratio =
ggml's time / ours (above 1.0: we are faster); our one-token product in ms and GB/s of
weight read (ggml's graph starts its threads on every compute, which would swamp a
one-token product: compare decoding with bench/llama_bench.py); `same`: both products
bit-identical to ggml's.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from ggml_repack import RepackedMatmul  # noqa: E402
from test_attention import _ggml, _InitParams  # noqa: E402

from gguflab import quant  # noqa: E402
from gguflab.gguf import GGMLType  # noqa: E402
from gguflab.jit.parallel import default_threads  # noqa: E402
from gguflab.runner.kernels import SUPPORTED_TYPES, matmul  # noqa: E402
from gguflab.runner.repack import repacked  # noqa: E402

P = ctypes.c_void_p


def make_weight(t: GGMLType, wf: np.ndarray) -> np.ndarray:
    if t == GGMLType.F32:
        return wf
    if t == GGMLType.F16:
        return wf.astype(np.float16)
    q = quant.get(t).quantize(wf)
    return q.view(np.uint16) if t == GGMLType.BF16 else q


PAUSE = 0.02  # s after each timed run: ggml's OpenMP workers spin a while after a compute


def median_times(fns, repeat: int) -> list[float]:
    """The median time of each of `fns`, run in turns (so that a load on the machine that
    comes and goes falls on all of them alike), each after a warm-up and followed by a
    pause (the spinning threads of one do not steal the cores of the next)."""
    times = [[] for _ in fns]
    for fn in fns:
        fn()  # warm up: compile, caches, threads
    for _ in range(repeat):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
            time.sleep(PAUSE)
    return [float(np.median(ts)) for ts in times]


class GgmlMatmul:
    """x @ W.T by ggml's mul_mat in a graph of its own, computed with `threads` threads."""

    def __init__(self, t: GGMLType, w: np.ndarray, x: np.ndarray, threads: int):
        base, self.cpu = _ggml()
        base.ggml_new_tensor_2d.restype = P
        base.ggml_new_tensor_2d.argtypes = [P, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        base.ggml_mul_mat.restype, base.ggml_mul_mat.argtypes = P, [P, P, P]
        self.base, self.threads = base, threads
        need = w.nbytes + x.nbytes + 4 * x.shape[0] * w.shape[0] + (64 << 20)
        self.ctx = base.ggml_init(_InitParams(need, None, False))
        tw = base.ggml_new_tensor_2d(self.ctx, int(t), x.shape[1], w.shape[0])
        ctypes.memmove(base.ggml_get_data(tw), w.ctypes.data, w.nbytes)
        tx = base.ggml_new_tensor_2d(self.ctx, 0, x.shape[1], x.shape[0])
        ctypes.memmove(base.ggml_get_data(tx), x.ctypes.data, x.nbytes)
        self.out = base.ggml_mul_mat(self.ctx, tw, tx)
        self.graph = base.ggml_new_graph(self.ctx)
        base.ggml_build_forward_expand(self.graph, self.out)
        self.shape = (x.shape[0], w.shape[0])

    def __call__(self) -> None:
        self.cpu.ggml_graph_compute_with_ctx(self.ctx, self.graph, self.threads)

    def result(self) -> np.ndarray:
        y = np.empty(self.shape, np.float32)
        ctypes.memmove(y.ctypes.data, self.base.ggml_get_data(self.out), y.nbytes)
        return y

    def close(self) -> None:
        self.base.ggml_free(self.ctx)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="576x576,1536x576,576x1536,4096x4096")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--types", default=",".join(t.name for t in SUPPORTED_TYPES))
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"{args.threads} threads; prompt = {args.prompt} tokens; ms, median of "
          f"{args.repeat}; ratio = ggml / ours")
    print(f"| {'type':8s} | {'shape':>10s} | {'prompt ggml':>11s} | {'ours':>8s} | {'ratio':>5s} "
          f"| {'decode ours':>11s} | {'GB/s':>6s} | same |")
    print(f"| {'-' * 8} | {'-' * 9}: | {'-' * 10}: | {'-' * 7}: | {'-' * 4}: | {'-' * 10}: "
          f"| {'-' * 5}: | ---- |")
    for name in args.types.split(","):
        t = GGMLType[name.strip().upper()]
        for shape in args.shapes.split(","):
            n_out, n_in = (int(v) for v in shape.split("x"))
            wf = rng.standard_normal((n_out, n_in), dtype=np.float32) * 0.02
            try:
                w = make_weight(t, wf)
            except Exception as e:  # a shape the type cannot take (K-quants: rows of 256)
                print(f"| {t.name:8s} | {shape:>10s} | {str(e)[:60]} |")
                continue
            row, same = [], True
            for n_tok in (1, args.prompt):
                x = rng.standard_normal((n_tok, n_in), dtype=np.float32)
                # ggml's products over the weights llama.cpp repacks at load run in its
                # repacked kernels (as llama-bench and llama-perplexity run them)
                ref = (RepackedMatmul(t, w, x, args.threads) if repacked(t, n_out)
                       else GgmlMatmul(t, w, x, args.threads))
                try:
                    ours = lambda w=w, t=t, x=x: matmul(w, t, x, threads=args.threads)  # noqa: E731
                    if n_tok > 1:
                        tg, to = median_times([ref, ours], args.repeat)
                    else:
                        ref()
                        tg, to = 0.0, median_times([ours], args.repeat)[0]
                    same &= bool(np.array_equal(ref.result(), matmul(w, t, x,
                                                                     threads=args.threads)))
                finally:
                    ref.close()
                row.append((tg, to))
            (_, do), (pg, po) = row
            print(f"| {t.name:8s} | {shape:>10s} | {pg * 1e3:11.2f} | {po * 1e3:8.2f} "
                  f"| {pg / po:5.2f} | {do * 1e3:11.3f} | {w.nbytes / do / 1e9:6.2f} "
                  f"| {'yes' if same else 'no':4s} |", flush=True)


if __name__ == "__main__":
    main()
