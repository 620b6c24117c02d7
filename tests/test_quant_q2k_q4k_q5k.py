"""Q2_K / Q4_K / Q5_K: the numpy reference and the compiled kernels, byte for byte against
llama.cpp's quantize_row_*_ref, and both dequantizers against ggml and gguf-py."""

from __future__ import annotations

import numpy as np
import pytest
from ggml_oracle import ggml_dequantize, ggml_quantize, sample_weights

import gguflab.quant.kquants.q2_k
import gguflab.quant.kquants.q4_k
import gguflab.quant.kquants.q5_k  # noqa: F401  (registers the three types)
from gguflab import quant
from gguflab.gguf import GGMLType

TYPES = [GGMLType.Q2_K, GGMLType.Q4_K, GGMLType.Q5_K]
LEVELS = {GGMLType.Q2_K: 4, GGMLType.Q4_K: 16, GGMLType.Q5_K: 32}


def _special_rows(n_per_row: int, seed: int) -> np.ndarray:
    """All-negative, all-positive, offset, constant-negative, heavy-tailed, sparse rows."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((10, n_per_row)).astype(np.float32)
    sub, huge = np.float32(1e-40), np.float32(1e37)
    rows = [
        -np.abs(g[0]),
        np.abs(g[1]),
        g[2] + 4,
        g[3] - 4,
        np.full(n_per_row, -0.75, np.float32),
        g[4] ** 3,
        rng.standard_cauchy(n_per_row).astype(np.float32),
        np.where(rng.random(n_per_row) < 0.9, 0, g[5]).astype(np.float32),
        rng.integers(-2, 3, n_per_row).astype(np.float32),
        g[6] * np.float32(1e-30),
        g[7] * sub,
        g[8] * huge,
        np.round(g[9] * 4) / 2,
    ]
    return np.stack(rows).astype(np.float32)


def _inputs(rows: int, cols: int, seed: int) -> np.ndarray:
    return np.concatenate([sample_weights(rows, cols, seed), _special_rows(cols, seed)])


def _same_floats(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("t", TYPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_matches_ggml(t, seed):
    x = _inputs(8, 1024, seed)
    qt = quant.get(t)
    assert qt.n_levels == LEVELS[t]
    assert np.array_equal(qt.quantize(x, reference=True), ggml_quantize(t, x))


@pytest.mark.parametrize("t", TYPES)
@pytest.mark.parametrize("shape,seed", [((8, 256), 0), ((32, 4096), 1), ((3, 1536), 2),
                                        ((64, 2048), 3), ((16, 768), 4)])
def test_kernel_matches_ggml(t, shape, seed):
    x = sample_weights(*shape, seed=seed)
    if shape[0] >= 16:
        x = np.concatenate([x, _special_rows(shape[1], seed)])
    assert np.array_equal(quant.get(t).quantize(x), ggml_quantize(t, x))


@pytest.mark.parametrize("t", TYPES)
def test_kernel_matches_reference_on_wide_data(t):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((64, 1024)) * rng.lognormal(0, 3, (64, 1))).astype(np.float32)
    qt = quant.get(t)
    want = ggml_quantize(t, x)
    assert np.array_equal(qt.quantize(x), want)
    assert np.array_equal(qt.quantize(x, reference=True), want)


@pytest.mark.parametrize("t", TYPES)
def test_non_finite_inputs_match_ggml(t):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 1024)).astype(np.float32)
    x[0, 5], x[1, 300], x[2, 17], x[3, 700] = np.nan, np.inf, -np.inf, np.float32(3.4e38)
    qt = quant.get(t)
    want = ggml_quantize(t, x)
    assert np.array_equal(qt.quantize(x), want)
    assert np.array_equal(qt.quantize(x, reference=True), want)


@pytest.mark.parametrize("t", TYPES)
def test_dequantize_matches_ggml_and_gguf_py(t):
    import gguf

    x = _inputs(16, 2048, 5)
    q = ggml_quantize(t, x)
    want = ggml_dequantize(t, q, x.shape[1])
    qt = quant.get(t)
    assert _same_floats(qt.dequantize(q, reference=True), want)
    assert _same_floats(qt.dequantize(q), want)
    with np.errstate(all="ignore"):  # the 1e37 row has an infinite d: inf * 0
        gg = gguf.quants.dequantize(q, gguf.GGMLQuantizationType[t.name])
    assert _same_floats(np.asarray(gg, np.float32), want)


@pytest.mark.parametrize("t", TYPES)
def test_levels_round_trip(t):
    """levels_ref and the dequantizer agree: x = d*sc*level - dmin*m."""
    qt = quant.get(t)
    q = qt.quantize(sample_weights(8, 512, 6))
    levels = qt.levels_ref(q.reshape(-1, qt.info.type_size))
    assert levels.shape == (q.size // qt.info.type_size, 256)
    assert levels.max() < qt.n_levels
    # the top level is used by some block of normal data
    assert levels.max() == qt.n_levels - 1


@pytest.mark.parametrize("t", TYPES)
def test_threads_give_the_same_bytes(t):
    x = sample_weights(64, 4096, seed=8)
    qt = quant.get(t)
    q1 = qt.quantize(x, threads=1)
    assert np.array_equal(q1, qt.quantize(x, threads=2))
    assert _same_floats(qt.dequantize(q1, threads=1), qt.dequantize(q1, threads=2))


@pytest.mark.parametrize("t", TYPES)
def test_histogram_counts_every_weight(t):
    x = sample_weights(16, 1024, seed=9)
    qt = quant.get(t)
    h = qt.histogram(qt.quantize(x))
    assert h.shape == (16,)
    assert int(h.sum()) == x.size
