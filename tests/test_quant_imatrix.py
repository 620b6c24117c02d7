"""Importance-weighted quantization (an imatrix) for Q4_0..Q5_1 and Q2_K..Q6_K: the numpy
reference and the compiled row kernels, byte for byte against llama.cpp's
`ggml_quantize_chunk(type, ..., imatrix)` (the `quantize_row_<t>_impl` functions)."""

from __future__ import annotations

import numpy as np
import pytest
from ggml_oracle import ggml_quantize_chunk, sample_weights

import gguflab.quant.kquants  # noqa: F401  (registers the K-quants)
import gguflab.quant.legacy  # noqa: F401
from gguflab import quant
from gguflab.gguf import GGMLType

LEGACY = [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1]
KQUANTS = [GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K]
TYPES = LEGACY + KQUANTS


def imatrix_like(n: int, seed: int, zeros: bool = True) -> np.ndarray:
    """What llama-imatrix writes: mean squared activations per column, positive with a wide
    range (log-normal over ~6 decades), a few columns much hotter, some dead (0)."""
    rng = np.random.default_rng(seed)
    w = np.exp(rng.normal(0.0, 2.5, n)).astype(np.float32)
    w[rng.random(n) < 0.02] *= 1000
    if zeros:
        w[rng.random(n) < 0.05] = 0
        w[: min(n, 32) // 2] = 0  # half a block dead
    return w.astype(np.float32)


def weights_like(n_rows: int, n: int, seed: int) -> np.ndarray:
    """Normal weights with some outliers, plus the edge-case rows of `sample_weights`."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_rows, n)).astype(np.float32) * 0.02
    hot = rng.random((n_rows, n)) < 0.005
    x[hot] *= 50
    edge = sample_weights(8, n, seed)
    return np.concatenate([x, edge]).astype(np.float32)


def edge_rows(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((12, n)).astype(np.float32)
    rows = [
        -np.abs(g[0]),
        np.abs(g[1]),
        g[2] + 4,
        np.full(n, -0.75, np.float32),
        g[3] ** 3,
        rng.standard_cauchy(n).astype(np.float32),
        np.where(rng.random(n) < 0.9, 0, g[4]),
        rng.integers(-2, 3, n).astype(np.float32),
        g[5] * np.float32(1e-40),
        g[6] * np.float32(1e37),
        np.where(np.arange(n) % 3 == 0, 6e4, -1e-3),
        np.where(np.arange(n) == 5, np.nan, g[7]),
        np.where(np.arange(n) == 300, np.inf, g[8]),
        np.where(np.arange(n) == 7, -np.inf, g[9]),
    ]
    return np.stack(rows).astype(np.float32)


def _shapes(t: GGMLType) -> list[int]:
    return [256, 4096] + ([96, 1056] if t in LEGACY else [768])


@pytest.mark.parametrize("t", [GGMLType.Q4_0, GGMLType.Q4_K, GGMLType.Q6_K], ids=lambda t: t.name)
def test_threads_give_the_same_bytes(t):
    qt = quant.get(t)
    x = weights_like(120, 512, seed=7)
    qw = imatrix_like(512, seed=8)
    one = qt.quantize(x, threads=1, imatrix=qw)
    for threads in (2, 3):
        assert np.array_equal(qt.quantize(x, threads=threads, imatrix=qw), one)
    assert np.array_equal(qt.quantize(x[None], threads=2, imatrix=qw)[0], one)  # 3-d input
    assert np.array_equal(qt.quantize(x, reference=True, imatrix=qw), one)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_flat_and_dead_imatrices(t):
    """All-zero, constant and one-hot importance vectors, as ggml computes them."""
    qt = quant.get(t)
    n = 256
    x = weights_like(4, n, seed=3)
    hot = np.zeros(n, np.float32)
    hot[5] = 1.0
    for qw in (np.zeros(n, np.float32), np.ones(n, np.float32), hot):
        want = ggml_quantize_chunk(t, x, qw)
        assert np.array_equal(qt.quantize_rows_ref(x, qw), want)
        assert np.array_equal(qt.quantize(x, imatrix=qw), want)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_edge_rows(t):
    """Rows that reach the corners of the arithmetic: one sign only, offset, constant,
    heavy tails, sparse, subnormal, huge, NaN and infinities; extreme imatrices too."""
    qt = quant.get(t)
    n = 512
    x = edge_rows(n, seed=11)
    for qw in (imatrix_like(n, seed=12), np.full(n, 1e30, np.float32),
               np.full(n, 1e-30, np.float32)):
        with np.errstate(all="ignore"):
            want = ggml_quantize_chunk(t, x, qw)
            got_ref = qt.quantize_rows_ref(x, qw)
            got = qt.quantize(x, imatrix=qw)
        assert np.flatnonzero((got_ref != want).any(axis=1)).tolist() == []
        assert np.flatnonzero((got != want).any(axis=1)).tolist() == []

