"""IQ3_XXS, IQ3_S, IQ1_S, IQ1_M against llama.cpp: quantized bytes equal to
`ggml_quantize_chunk` (with and without an importance matrix), dequantized floats equal to
`dequantize_row_*`, and the runner's products equal to a product with the dequantized rows."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from ggml_oracle import ggml_quantize_chunk, libggml, sample_weights

from gguflab import quant
from gguflab.errors import UserError
from gguflab.gguf import GGMLType

IQ3 = [GGMLType.IQ3_S, GGMLType.IQ3_XXS]
IQ1 = [GGMLType.IQ1_S, GGMLType.IQ1_M]
TYPES = [t for t in IQ3 + IQ1 if t in quant.REGISTRY]


def ggml_requires_imatrix(t: GGMLType) -> bool:
    fn = libggml().ggml_quantize_requires_imatrix
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_bool
    return bool(fn(int(t)))


def weight_like(rows: int, n: int, seed: int) -> np.ndarray:
    """Heavy-tailed rows with per-column scale, like a trained weight matrix."""
    rng = np.random.default_rng(seed)
    col = np.exp(rng.normal(0, 0.5, n)).astype(np.float32)
    x = rng.standard_t(5, (rows, n)).astype(np.float32) * 0.02 * col
    return x.astype(np.float32)


def random_imatrix(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.gamma(1.0, 1.0, n) + 1e-3).astype(np.float32)


def edge_rows(n: int) -> np.ndarray:
    """sample_weights' edge cases plus zero sub-blocks inside a non-zero super-block."""
    x = sample_weights(8, n, seed=3)
    x[0, 32:64] = 0.0
    x[0, 160:192] = 0.0
    return x


@pytest.mark.parametrize("reference", [True, False], ids=["numpy", "compiled"])
@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_quantize_edge_cases_match_ggml(t, reference):
    qt = quant.get(t)
    x = edge_rows(512)
    imx = random_imatrix(512, seed=7)
    got = qt.quantize(x, imatrix=imx, reference=reference)
    assert np.array_equal(got, ggml_quantize_chunk(t, x, imx))
    if not qt.requires_imatrix:
        got = qt.quantize(x, reference=reference)
        assert np.array_equal(got, ggml_quantize_chunk(t, x, None))


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_requires_imatrix_as_ggml(t):
    qt = quant.get(t)
    assert qt.requires_imatrix == ggml_requires_imatrix(t)
    assert qt.uses_imatrix
    if qt.requires_imatrix:
        with pytest.raises(UserError, match="importance matrix"):
            qt.quantize(weight_like(1, 256, seed=0))

