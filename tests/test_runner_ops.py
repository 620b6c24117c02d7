"""The element-wise steps between the products are ggml's bits (RMS norm with its weight,
SwiGLU with ggml's vectorised exp): computed by ggml's own CPU ops in the oracle build."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from test_attention import _ggml, _InitParams

from gguflab.runner.model import rms_norm
from gguflab.runner.ops import swiglu

P = ctypes.c_void_p


def ggml_op(build, *arrays: np.ndarray) -> np.ndarray:
    """`build(base, ctx, tensors)` on float32 2-D `arrays` in a ggml graph, computed by the
    CPU backend; the result as float32 of the first array's shape."""
    base, cpu = _ggml()
    ctx = base.ggml_init(_InitParams(64 << 20, None, False))
    try:
        base.ggml_new_tensor_2d.restype = P
        base.ggml_new_tensor_2d.argtypes = [P, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        tensors = []
        for a in arrays:
            a = np.ascontiguousarray(a, np.float32).reshape(-1, a.shape[-1])
            t = base.ggml_new_tensor_2d(ctx, 0, a.shape[1], a.shape[0])
            ctypes.memmove(base.ggml_get_data(t), a.ctypes.data, a.nbytes)
            tensors.append(t)
        out = build(base, ctx, tensors)
        graph = base.ggml_new_graph(ctx)
        base.ggml_build_forward_expand(graph, out)
        cpu.ggml_graph_compute_with_ctx(ctx, graph, 2)
        res = np.empty(arrays[0].shape, np.float32)
        ctypes.memmove(res.ctypes.data, base.ggml_get_data(out), res.nbytes)
        return res
    finally:
        base.ggml_free(ctx)


@pytest.mark.parametrize("n", [1536, 1000])  # whole AVX vectors; a tail of 8 - n % 8
def test_swiglu_is_ggmls(n):
    rng = np.random.default_rng(n)
    g = (rng.standard_normal((7, n)) * 4).astype(np.float32)
    g[0, :4] = [-100, -87.5, 90, 0]  # past exp's range on both sides, and zero
    u = rng.standard_normal((7, n)).astype(np.float32)

    def build(base, ctx, t):
        base.ggml_swiglu_split.restype, base.ggml_swiglu_split.argtypes = P, [P, P, P]
        return base.ggml_swiglu_split(ctx, t[0], t[1])

    np.testing.assert_array_equal(swiglu(g, u), ggml_op(build, g, u))


@pytest.mark.parametrize("n", [512, 100])  # whole AVX vectors; a tail of n % 8
def test_soft_max_is_ggmls(n):
    """ggml_soft_max_ext(x, mask, scale) against our soft_max of x * scale + mask (the mask
    -inf past each row's causal end, as llama.cpp's KQ mask is)."""
    from gguflab.runner.ops import soft_max

    rng = np.random.default_rng(n)
    x = (rng.standard_normal((9, n)) * 6).astype(np.float32)
    mask = np.where(np.arange(n)[None, :] > np.arange(9)[:, None] * (n // 9) + 5, -np.inf,
                    0).astype(np.float32)
    scale = 0.125

    def build(base, ctx, t):
        fn = base.ggml_soft_max_ext
        fn.restype, fn.argtypes = P, [P, P, P, ctypes.c_float, ctypes.c_float]
        return fn(ctx, t[0], t[1], scale, 0.0)

    ours = soft_max(x * np.float32(scale) + mask)
    np.testing.assert_array_equal(ours, ggml_op(build, x, mask))
    # not numpy's: exp and sums in other orders
    e = np.exp(x * np.float32(scale) + mask - (x * np.float32(scale) + mask).max(-1)[:, None])
    assert not np.array_equal(ours, e / e.sum(-1, keepdims=True))


@pytest.mark.parametrize("rows, n", [(9, 576), (300, 576), (5, 100)])  # 300: split in threads
def test_rms_norm_is_ggmls(rows, n):
    rng = np.random.default_rng(rows)
    x = (rng.standard_normal((rows, n)) * rng.uniform(0.01, 50, (rows, 1))).astype(np.float32)
    w = rng.uniform(0.5, 2, n).astype(np.float32)

    def build(base, ctx, t):
        base.ggml_rms_norm.restype, base.ggml_rms_norm.argtypes = P, [P, P, ctypes.c_float]
        base.ggml_mul.restype, base.ggml_mul.argtypes = P, [P, P, P]
        return base.ggml_mul(ctx, base.ggml_rms_norm(ctx, t[0], 1e-5), t[1])

    np.testing.assert_array_equal(rms_norm(x, w, 1e-5), ggml_op(build, x, w[None]))


def test_swiglu_shapes_must_agree():
    with pytest.raises(ValueError, match="swiglu"):
        swiglu(np.zeros((2, 8), np.float32), np.zeros((2, 16), np.float32))
