"""gguflab.runner.kernels over F16, BF16 and F32 weights against ggml's own mul_mat: the same
bits. llama.cpp's CPU backend rounds x to the weight's type, then sums with llamafile's
tinyBLAS (2 tokens or more over a multiple of 4 rows: one accumulator per output, k in
order) or with `ggml_vec_dot_<type>` (one token, or rows tinyBLAS does not take: four
accumulators); each shape below runs one of those paths and the tiles' remainders."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from test_attention import _ggml, _InitParams, graph_result

from gguflab import quant
from gguflab.gguf import GGMLType
from gguflab.runner import kernels
from gguflab.runner.kernels import matmul

P = ctypes.c_void_p
FLOATS = [GGMLType.F16, GGMLType.BF16, GGMLType.F32]


def float_weight(t: GGMLType, n_out: int, n_in: int, seed: int) -> np.ndarray:
    """The weight as a GGUF reader hands it over (BF16 as its raw uint16 bits)."""
    rng = np.random.default_rng(seed)
    wf = (rng.standard_normal((n_out, n_in)) * rng.uniform(0.01, 1.0, (n_out, 1)))
    wf = wf.astype(np.float32)
    if t == GGMLType.F16:
        return wf.astype(np.float16)
    if t == GGMLType.BF16:
        return quant.get(t).quantize(wf).view(np.uint16).reshape(n_out, n_in)
    return wf


def ggml_mul_mat(t: GGMLType, w: np.ndarray, x: np.ndarray, threads: int = 2) -> np.ndarray:
    """ggml_mul_mat(W, x) computed by ggml's CPU backend at its default settings (W of type
    t as stored, rows of raw bytes or floats; x float32 (n_tok, n_in)): (n_tok, n_out)."""
    base, _ = _ggml()
    base.ggml_new_tensor_2d.restype = P
    base.ggml_new_tensor_2d.argtypes = [P, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    base.ggml_mul_mat.restype, base.ggml_mul_mat.argtypes = P, [P, P, P]
    x = np.ascontiguousarray(x, np.float32)
    w = np.ascontiguousarray(w)
    ctx = base.ggml_init(_InitParams(w.nbytes + 3 * x.nbytes + (16 << 20), None, False))
    try:
        tw = base.ggml_new_tensor_2d(ctx, int(t), x.shape[1], w.shape[0])
        ctypes.memmove(base.ggml_get_data(tw), w.ctypes.data, w.nbytes)
        tx = base.ggml_new_tensor_2d(ctx, int(GGMLType.F32), x.shape[1], x.shape[0])
        ctypes.memmove(base.ggml_get_data(tx), x.ctypes.data, x.nbytes)
        out = base.ggml_mul_mat(ctx, tw, tx)
        return graph_result(ctx, out, (x.shape[0], w.shape[0]), threads)
    finally:
        base.ggml_free(ctx)


SHAPES = [  # (n_out, n_in, n_tok)
    (100, 576, 1),  # one token: vec_dot; 100 rows: a short 2-row pass
    (100, 576, 3),  # 2-4 tokens: the decode kernel's 4-token pass, tinyBLAS's order
    # a chunk of 64 tokens and a short token tile; 100 rows: short row groups and row tiles;
    # 576 floats: two K-blocks of 288
    (100, 576, 67),
    (64, 1536, 9),  # four K-blocks: the partial sums wait in scratch three times
    (36, 800, 6),  # 25 groups of 32: K-blocks of 9, 9 and 7 groups
    (40, 4160, 6),  # F16 read in place: three K-blocks of 44, 44 and 42 groups
    (98, 576, 5),  # a row count tinyBLAS does not take: vec_dot for every token
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n_out,n_in,n_tok", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("t", FLOATS, ids=lambda t: t.name)
def test_float_products_are_ggmls(t, n_out, n_in, n_tok, threads, monkeypatch):
    monkeypatch.setattr(kernels, "MIN_WORK_PER_THREAD", 1)  # split even these small products
    monkeypatch.setattr(kernels, "MIN_WORK_PER_PART", 1)
    w = float_weight(t, n_out, n_in, seed=n_out + n_tok)
    rng = np.random.default_rng(n_in + n_tok)
    x = (rng.standard_normal((n_tok, n_in)) * rng.uniform(0.1, 30, (n_tok, 1)))
    x = x.astype(np.float32)
    want = ggml_mul_mat(t, w, x)
    y = matmul(w, t, x, threads=threads)
    np.testing.assert_array_equal(y.view(np.uint32), want.view(np.uint32))
    if n_tok == 1:  # a 1-D x is the same product
        np.testing.assert_array_equal(matmul(w, t, x[0], threads=threads), want[0])


@pytest.mark.parametrize("t", FLOATS, ids=lambda t: t.name)
def test_float_decode_products_in_one_hand_off(t):
    """`matmuls` (a layer's products of one token, posted at once) gives ggml's bits too,
    with a row count tinyBLAS does not take among them."""
    ws = [float_weight(t, n, 576, seed=n) for n in (96, 192, 98)]
    x = np.random.default_rng(3).standard_normal((1, 576)).astype(np.float32)
    for y, w in zip(kernels.matmuls([(w, t) for w in ws], x), ws):
        np.testing.assert_array_equal(y, ggml_mul_mat(t, w, x))
