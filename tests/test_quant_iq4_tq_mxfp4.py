"""IQ4_NL, IQ4_XS, TQ1_0, TQ2_0 and MXFP4 against llama.cpp, byte for byte: the numpy reference
and the compiled quantizer against `ggml_quantize_chunk` (with and without an importance
matrix for the IQ4 types, which take one), the dequantizers against `dequantize_row_*`,
threads, and the runner's products over these weights."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from ggml_oracle import ggml_dequantize, ggml_quantize_chunk, libggml, sample_weights

from gguflab import quant
from gguflab.errors import UserError
from gguflab.gguf import GGMLType

G = GGMLType
TYPES = [G.IQ4_NL, G.IQ4_XS, G.TQ1_0, G.TQ2_0, G.MXFP4]
SMALL_BLOCKS = [t for t in TYPES if quant.get(t).info.block_size == 32]
ids = lambda t: t.name  # noqa: E731


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def importance(n: int, seed: int = 0) -> np.ndarray:
    """A random positive importance row spread over orders of magnitude."""
    return np.random.default_rng(seed).lognormal(0.0, 1.5, n).astype(np.float32)


def extreme_rows(n: int, seed: int = 0) -> np.ndarray:
    """Finite rows at the edges: huge, tiny and subnormal magnitudes, zeros, one-signed rows,
    few-valued rows full of ties, a lone outlier, and maxima just below powers of two (where
    MXFP4's floor(log2) depends on log2f's last bit)."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((10, n)).astype(np.float32)
    below = np.nextafter(np.float32(2.0) ** rng.integers(-20, 20, n).astype(np.float32),
                         np.float32(0)) * np.float32(1 - 2.0**-23 * rng.integers(0, 8, n))
    rows = [g[0] * 1e30, g[1] * 1e-30, g[2] * 1e-41, np.zeros(n), np.abs(g[3]),
            -np.abs(g[4]), rng.integers(-3, 4, n), np.where(np.arange(n) % 37 == 0, 50.0, g[5]),
            below.astype(np.float32) * np.sign(g[6]), np.clip(g[7], -4, 4) * 8e37]
    return np.stack(rows).astype(np.float32)


def data(t: GGMLType, n: int) -> np.ndarray:
    return np.concatenate([sample_weights(8, n, seed=n), extreme_rows(n, seed=n)])


def widths(t: GGMLType) -> list[int]:
    # the 32-blocks also on widths that are not a multiple of 256
    return [256, 512] if t not in SMALL_BLOCKS else [32, 96, 256, 800]


CASES = [(t, n) for t in TYPES for n in widths(t)]


def non_finite_rows(n: int, seed: int = 0) -> np.ndarray:
    """NaN and infinities among ordinary weights: a lone one, half a row, a whole row, and a
    NaN as the last weight of every block (where ggml's in-order max restarts)."""
    rng = np.random.default_rng(seed)
    rows = (rng.standard_normal((10, n)) * 0.1).astype(np.float32)
    for k, v in enumerate([np.nan, np.inf, -np.inf, np.nan]):
        rows[k, rng.integers(0, n, 1 + k)] = v
    rows[4, : n // 2] = np.inf
    rows[5, n // 2:] = -np.inf
    rows[6] = np.nan
    rows[7, 31::32] = np.nan
    rows[8, 255::256] = np.nan
    rows[9, ::64] = 1e30
    rows[9, 1::64] = np.nan
    return rows


@pytest.mark.parametrize("t", TYPES, ids=ids)
def test_non_finite_weights_match_ggml(t):
    """llama.cpp's quantizers for these types are defined on any float: so are ours."""
    qt = quant.get(t)
    n = 512
    x = non_finite_rows(n, seed=int(t))
    for w in (None, importance(n)) if qt.uses_imatrix else (None,):
        want = ggml_quantize_chunk(t, x, w)
        with np.errstate(all="ignore"):
            np.testing.assert_array_equal(qt.quantize(x, reference=True, imatrix=w), want)
            np.testing.assert_array_equal(qt.quantize(x, imatrix=w), want)
            for ref in (True, False):
                got = qt.dequantize(want, reference=ref)
                np.testing.assert_array_equal(bits(got), bits(ggml_dequantize(t, want, n)))


@pytest.mark.parametrize("t", TYPES, ids=ids)
def test_requires_no_imatrix_as_in_ggml(t):
    lib = libggml()
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    assert quant.get(t).requires_imatrix == lib.ggml_quantize_requires_imatrix(int(t)) is False


@pytest.mark.parametrize("t", TYPES, ids=ids)
def test_levels_rebuild_the_weights(t):
    """levels_ref (the histogram's) are the codes the dequantizer reads."""
    qt = quant.get(t)
    q = qt.quantize(sample_weights(8, 512, seed=5))
    blocks = q.reshape(-1, qt.info.type_size)
    levels = qt.levels_ref(blocks)
    assert levels.shape == (blocks.shape[0], qt.info.block_size)
    assert levels.min() >= 0 and levels.max() < qt.n_levels
    hist = qt.histogram(q)
    assert hist.sum() == q.shape[0] * 512
    deq = qt.dequantize(q).reshape(blocks.shape[0], -1)
    # same level, same value within a block (and sub-block)
    sub = 32 if t != G.TQ1_0 else 256
    lv = levels.reshape(-1, sub)
    dv = deq.reshape(-1, sub)
    for k in range(0, lv.shape[0], 7):
        for v in np.unique(lv[k]):
            assert np.unique(dv[k][lv[k] == v]).size == 1


def test_user_errors():
    with pytest.raises(UserError, match="256"):
        quant.get(G.IQ4_XS).quantize(np.zeros((2, 96), np.float32))
    with pytest.raises(UserError, match="importance matrix has 64 columns"):
        quant.get(G.IQ4_NL).quantize(np.zeros((2, 96), np.float32),
                                     imatrix=np.ones(64, np.float32))
    with pytest.raises(UserError, match="whole blocks"):
        quant.get(G.MXFP4).dequantize(np.zeros((2, 20), np.uint8))
