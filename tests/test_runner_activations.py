"""The products compute llama.cpp's CPU function: each weight type rounds x to its
`activation_type` (ggml's vec_dot_type) exactly as ggml's `from_float` does, and the products
equal ggml's own `vec_dot` on those operands, for one token, a few, and a prompt."""

from __future__ import annotations

import numpy as np
import pytest
from ggml_oracle import (
    ggml_cpu_matmul,
    ggml_from_float,
    ggml_vec_dot_type,
    sample_weights,
)

from gguflab import quant
from gguflab.errors import UserError
from gguflab.gguf import GGMLType
from gguflab.runner import kernels
from gguflab.runner.kernels import SUPPORTED_TYPES, matmul, round_activations, round_q8

Q8 = (GGMLType.Q8_0, GGMLType.Q8_1, GGMLType.Q8_K)


def test_activation_type_is_ggmls_vec_dot_type():
    for t in quant.weight_types():
        assert quant.get(t).activation_type == ggml_vec_dot_type(t), t.name


def activations(n_tok: int, n_in: int, seed: int = 0) -> np.ndarray:
    """Rows of very different scales, an all-zero block, a row whose largest element is
    negative, ties for the largest magnitude, and levels that land on .5."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n_tok, n_in)) * rng.uniform(0.01, 30, (n_tok, 1))).astype(np.float32)
    x[0, :256] = 0
    x[1, 3] = -1e3
    x[2, 7], x[2, 9] = 50, -50
    x[2, 32:64] = (np.arange(32) - 15.5).astype(np.float32) * 127 / 32  # levels on .5 below
    return x


@pytest.mark.parametrize("kind", Q8, ids=lambda k: k.name)
def test_rounding_is_ggmls_from_float(kind):
    n_in = 768
    x = activations(6, n_in)
    ours, ref = round_q8(x, kind), ggml_from_float(kind, x)
    ng = n_in // 32
    levels = ours[:, :n_in].view(np.int8)
    dx = ours[:, n_in:n_in + 4 * ng].view(np.float32)
    xs = ours[:, n_in + 4 * ng:].view(np.float32)
    if kind == GGMLType.Q8_K:  # blocks of 256: d (f32), 256 levels, 16 sums of 16 (i16)
        blk = ref.reshape(6, n_in // 256, 292)
        d = blk[:, :, :4].copy().view(np.float32)[..., 0]
        np.testing.assert_array_equal(levels, blk[:, :, 4:260].reshape(6, n_in).view(np.int8))
        np.testing.assert_array_equal(dx, np.repeat(d, 8, axis=1))
        sums = blk[:, :, 260:].copy().view(np.int16).reshape(6, -1, 2).sum(-1)
        np.testing.assert_array_equal(xs, np.repeat(d, 8, axis=1) * sums.reshape(6, -1).astype(np.float32))
    else:  # blocks of 32: d (f16) [, s (f16)], 32 levels
        off = 2 if kind == GGMLType.Q8_0 else 4
        blk = ref.reshape(6, ng, 32 + off)
        np.testing.assert_array_equal(levels, blk[:, :, off:].reshape(6, n_in).view(np.int8))
        np.testing.assert_array_equal(dx, blk[:, :, :2].copy().view(np.float16)[..., 0])
        if kind == GGMLType.Q8_1:
            np.testing.assert_array_equal(xs, blk[:, :, 2:4].copy().view(np.float16)[..., 0])


def test_float_rounding_is_ggmls():
    x = activations(3, 256)
    x[0, 5] = np.float32(1 + 2 ** -11)  # a tie in fp16
    x[1, :5] = [np.inf, -np.inf, 1e6, 3e-8, np.float32(1 + 2 ** -8)]  # bf16's tie; fp16's range
    x[2, 7] = np.nan
    f16 = ggml_from_float(GGMLType.F16, x).view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(round_activations(x, GGMLType.F16), f16)
    bf16 = ggml_from_float(GGMLType.BF16, x).view(np.uint16).astype(np.uint32) << 16
    np.testing.assert_array_equal(round_activations(x, GGMLType.BF16).view(np.uint32), bf16)
    np.testing.assert_array_equal(round_activations(x, GGMLType.F32), x)


def test_rounding_rejects_partial_blocks():
    with pytest.raises(UserError, match="whole blocks"):
        round_q8(np.zeros((2, 288), np.float32), GGMLType.Q8_K)


def weight(t: GGMLType, n_out: int, n_in: int) -> np.ndarray:
    w = sample_weights(n_out, n_in, seed=int(t))
    if t == GGMLType.F32:
        return w
    if t == GGMLType.F16:
        return w.astype(np.float16)
    qt = quant.get(t)
    imatrix = np.linspace(0.5, 2, n_in).astype(np.float32) if qt.requires_imatrix else None
    q = qt.quantize(w, imatrix=imatrix)
    return q.view(np.uint16) if t == GGMLType.BF16 else q


@pytest.mark.parametrize("t", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_products_are_ggmls_dot_products(t):
    """One token (the decode kernels), three (the few-token path) and 37 (the prompt kernels,
    a tile remainder included), one and two threads: ggml's `vec_dot` over its rounded x, to
    float rounding (the order of the sums differs; the function does not)."""
    n_in, n_out = 512, 45
    w = weight(t, n_out, n_in)
    x = activations(37, n_in, seed=int(t))
    raw = w if t in (GGMLType.F32, GGMLType.F16) else w.view(np.uint8)
    ref = ggml_cpu_matmul(t, raw, x).astype(np.float64)
    wd = quant.get(t).dequantize(np.ascontiguousarray(w).view(np.uint8)).reshape(n_out, -1)
    scale = np.maximum(np.abs(x.astype(np.float64)) @ np.abs(wd.astype(np.float64)).T, 1e-30)
    for n in (1, 3, 37):
        for threads in (1, 2):
            got = matmul(w, t, x[:n], threads=threads)
            err = float((np.abs(got - ref[:n]) / scale[:n]).max())
            assert err < 2e-6, (n, threads, err)


def test_prompt_and_decode_give_the_same_bits():
    """A token's product is the same whether it is decoded alone or inside a prompt: the
    integer kernels sum every (row, token) in one order whatever the tile. The K-quants, as
    llama.cpp, have a second order from 8 tokens on (its tiled kernel): there a token's bits
    are the same in any prompt of 8 or more, and below 8 its decoding's."""
    k_quants = (GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K)
    for t in (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0, *k_quants):
        if not kernels.quantizes_activations(t):
            continue
        w = weight(t, 33, 512)
        x = activations(11, 512, seed=3)
        batch, few = matmul(w, t, x), matmul(w, t, x[:7])
        np.testing.assert_array_equal(matmul(w, t, x[2:10]), batch[2:10])
        for i in (0, 5, 10):
            alone = matmul(w, t, x[i])
            if i < 7:
                np.testing.assert_array_equal(alone, few[i])
            if t not in k_quants:
                np.testing.assert_array_equal(alone, batch[i])
