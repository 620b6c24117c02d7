"""ggml's mul_mat over a weight in the CPU backend's "repack" buffer type (CPU_REPACK), as
llama.cpp loads its weights by default, called in the oracle build through ctypes.

The weight tensor is allocated in the buffer type the CPU device lists as an extra one
(`ggml_backend_dev_get_extra_bufts`, found by its proc address); `ggml_backend_tensor_set`
then repacks it (Q4_0 -> q4_0_8x8, Q4_K -> q4_K_8x8, ... on an AVX2 build, when its row
count allows), and the graph runs on the CPU backend, which hands the product to the
repacked kernels (gemm for each 4 tokens, gemv for the rest)."""

from __future__ import annotations

import ctypes

import numpy as np
from test_attention import _ggml, _InitParams

P, I64 = ctypes.c_void_p, ctypes.c_int64
_STATE: dict = {}


def _libs():
    if not _STATE:
        base, cpu = _ggml()
        for lib, name, res, args in [
            (base, "ggml_new_tensor_2d", P, [P, ctypes.c_int, I64, I64]),
            (base, "ggml_mul_mat", P, [P, P, P]),
            (base, "ggml_backend_alloc_ctx_tensors_from_buft", P, [P, P]),
            (base, "ggml_backend_alloc_ctx_tensors", P, [P, P]),
            (base, "ggml_backend_tensor_set", None, [P, P, ctypes.c_size_t, ctypes.c_size_t]),
            (base, "ggml_backend_tensor_get", None, [P, P, ctypes.c_size_t, ctypes.c_size_t]),
            (base, "ggml_backend_graph_compute", ctypes.c_int, [P, P]),
            (base, "ggml_backend_buffer_free", None, [P]),
            (base, "ggml_backend_buft_name", ctypes.c_char_p, [P]),
            (base, "ggml_backend_reg_get_proc_address", P, [P, ctypes.c_char_p]),
            (base, "ggml_backend_reg_dev_get", P, [P, ctypes.c_size_t]),
            (base, "ggml_backend_free", None, [P]),
            (cpu, "ggml_backend_cpu_reg", P, []),
            (cpu, "ggml_backend_cpu_init", P, []),
            (cpu, "ggml_backend_cpu_set_n_threads", None, [P, ctypes.c_int]),
        ]:
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        reg = cpu.ggml_backend_cpu_reg()
        addr = base.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
        get_bufts = ctypes.CFUNCTYPE(ctypes.POINTER(P), P)(addr)
        bufts = get_bufts(base.ggml_backend_reg_dev_get(reg, 0))
        repack = None
        i = 0
        while bufts[i]:
            if base.ggml_backend_buft_name(bufts[i]) == b"CPU_REPACK":
                repack = bufts[i]
            i += 1
        if repack is None:
            raise RuntimeError("the oracle build's CPU backend has no CPU_REPACK buffer type")
        _STATE.update(base=base, cpu=cpu, repack=repack, backend=cpu.ggml_backend_cpu_init())
    return _STATE


class RepackedMatmul:
    """x @ W.T by ggml's mul_mat with W in the CPU_REPACK buffer (`repack=False`: the plain
    CPU buffer, vec_dot), computed on the CPU backend with `threads` threads."""

    def __init__(self, wtype: int, w: np.ndarray, x: np.ndarray, threads: int = 2,
                 repack: bool = True):
        if repack and w.shape[0] % 8:  # ggml would leave it unrepacked: set_tensor crashes
            raise ValueError(f"ggml repacks no weight of {w.shape[0]} rows (not 8k)")
        s = _libs()
        self.base, self.s, self.threads = s["base"], s, threads
        base = self.base
        n_tok, n_in = x.shape
        n_out = w.shape[0]
        self.ctx_w = base.ggml_init(_InitParams(1 << 16, None, True))
        self.ctx = base.ggml_init(_InitParams(1 << 20, None, True))
        tw = base.ggml_new_tensor_2d(self.ctx_w, int(wtype), n_in, n_out)
        tx = base.ggml_new_tensor_2d(self.ctx, 0, n_in, n_tok)
        self.out = base.ggml_mul_mat(self.ctx, tw, tx)
        self.buf_w = (base.ggml_backend_alloc_ctx_tensors_from_buft(self.ctx_w, s["repack"])
                      if repack else base.ggml_backend_alloc_ctx_tensors(self.ctx_w,
                                                                         s["backend"]))
        self.buf = base.ggml_backend_alloc_ctx_tensors(self.ctx, s["backend"])
        w, x = np.ascontiguousarray(w), np.ascontiguousarray(x, np.float32)
        base.ggml_backend_tensor_set(tw, w.ctypes.data, 0, w.nbytes)  # repacks
        base.ggml_backend_tensor_set(tx, x.ctypes.data, 0, x.nbytes)
        self.graph = base.ggml_new_graph(self.ctx)
        base.ggml_build_forward_expand(self.graph, self.out)
        self.shape = (n_tok, n_out)

    def __call__(self) -> None:
        self.s["cpu"].ggml_backend_cpu_set_n_threads(self.s["backend"], self.threads)
        if self.base.ggml_backend_graph_compute(self.s["backend"], self.graph) != 0:
            raise RuntimeError("ggml_backend_graph_compute failed")

    def result(self) -> np.ndarray:
        y = np.empty(self.shape, np.float32)
        self.base.ggml_backend_tensor_get(self.out, y.ctypes.data, 0, y.nbytes)
        return y

    def close(self) -> None:
        for b in (self.buf_w, self.buf):
            self.base.ggml_backend_buffer_free(b)
        for c in (self.ctx_w, self.ctx):
            self.base.ggml_free(c)


def ggml_repacked_matmul(wtype: int, w: np.ndarray, x: np.ndarray, threads: int = 2,
                         repack: bool = True) -> np.ndarray:
    """x (float32, (n_tok, n_in)) @ W.T as llama.cpp's default load computes it."""
    m = RepackedMatmul(wtype, w, x, threads, repack)
    try:
        m()
        return m.result()
    finally:
        m.close()
