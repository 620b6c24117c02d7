"""Q3_K / Q6_K / Q8_K: the numpy reference and the compiled kernels against llama.cpp's
`quantize_row_*_ref` and `dequantize_row_*`, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from ggml_oracle import ggml_dequantize, ggml_quantize, sample_weights

import gguflab.quant.kquants.q3_k  # noqa: F401  (registers the types)
import gguflab.quant.kquants.q6_k  # noqa: F401
import gguflab.quant.kquants.q8_k  # noqa: F401
from gguflab import quant
from gguflab.gguf import GGMLType

TYPES = [GGMLType.Q3_K, GGMLType.Q6_K, GGMLType.Q8_K]
LEVELS = {GGMLType.Q3_K: 8, GGMLType.Q6_K: 64, GGMLType.Q8_K: 256}


def _edge_rows(n_per_row: int, seed: int) -> np.ndarray:
    """sample_weights plus rows of one sign, ties of both signs, near-zero sub-blocks,
    values around GROUP_MAX_EPS and magnitudes that overflow an fp16 d."""
    x = sample_weights(16, n_per_row, seed)
    rng = np.random.default_rng(seed + 100)
    x[8] = np.abs(rng.standard_normal(n_per_row)).astype(np.float32)
    x[9] = -np.abs(rng.standard_normal(n_per_row)).astype(np.float32)
    x[10] = rng.choice(np.float32([-2, 2, 0, 1, -1]), n_per_row)
    x[11] = rng.standard_normal(n_per_row).astype(np.float32)
    x[11, ::16] *= 1e-17  # some sub-blocks all but zero
    x[11, 16:32] = 0
    x[12] = (rng.integers(-2, 3, n_per_row) * 1e-15).astype(np.float32)
    x[13] = (rng.standard_normal(n_per_row) * 1e5).astype(np.float32)
    x[14] = 0
    x[14, 5] = -3.0
    x[15] = (rng.standard_normal(n_per_row) * 1e-5 + 3.0).astype(np.float32)
    return x


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


@pytest.mark.parametrize("t", TYPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_matches_ggml(t, seed):
    x = _edge_rows(1024, seed)
    assert np.array_equal(quant.get(t).quantize(x, reference=True), ggml_quantize(t, x))


@pytest.mark.parametrize("t", TYPES)
@pytest.mark.parametrize("shape,seed", [((8, 256), 0), ((32, 4096), 1), ((3, 1536), 2),
                                        ((16, 512), 3), ((16, 768), 4)])
def test_kernel_matches_ggml(t, shape, seed):
    x = sample_weights(*shape, seed=seed) if shape[0] != 16 else _edge_rows(shape[1], seed)
    want = ggml_quantize(t, x)
    assert np.array_equal(quant.get(t).quantize(x), want)


@pytest.mark.parametrize("t", TYPES)
def test_reference_matches_ggml_on_big_rows(t):
    x = sample_weights(32, 4096, seed=7)
    assert np.array_equal(quant.get(t).quantize(x, reference=True), ggml_quantize(t, x))


@pytest.mark.parametrize("t", TYPES)
def test_one_sign_rows(t):
    rng = np.random.default_rng(5)
    a = np.abs(rng.standard_normal((4, 2048))).astype(np.float32)
    x = np.concatenate([a, -a, a * 1e-3 + 1, -(a * 1e-3 + 1)])
    want = ggml_quantize(t, x)
    qt = quant.get(t)
    assert np.array_equal(qt.quantize(x, reference=True), want)
    assert np.array_equal(qt.quantize(x), want)


@pytest.mark.parametrize("t", TYPES)
def test_dequantize_matches_ggml(t):
    x = _edge_rows(1024, 11)
    q = ggml_quantize(t, x)
    want = ggml_dequantize(t, q, x.shape[1])
    qt = quant.get(t)
    assert np.array_equal(_bits(qt.dequantize(q, reference=True)), _bits(want))
    assert np.array_equal(_bits(qt.dequantize(q)), _bits(want))


# gguf-py has no Q8_K dequantizer: Q8_K's is pinned against llama.cpp's own above
@pytest.mark.parametrize("t", [t for t in TYPES if t != GGMLType.Q8_K])
def test_dequantize_matches_gguf_py(t):
    gguf = pytest.importorskip("gguf")
    x = _edge_rows(512, 12)
    q = ggml_quantize(t, x)
    want = gguf.quants.dequantize(q, gguf.GGMLQuantizationType[t.name])
    assert np.array_equal(_bits(quant.get(t).dequantize(q)), _bits(want))


@pytest.mark.parametrize("t", TYPES)
def test_threads_give_the_same_bytes(t):
    x = np.random.default_rng(0).standard_normal((64, 4096)).astype(np.float32)
    qt = quant.get(t)
    q1 = qt.quantize(x, threads=1)
    assert np.array_equal(q1, qt.quantize(x, threads=2))
    assert np.array_equal(_bits(qt.dequantize(q1, threads=1)), _bits(qt.dequantize(q1, threads=2)))


@pytest.mark.parametrize("t", TYPES)
def test_levels_and_histogram(t):
    x = sample_weights(8, 1024, seed=4)
    qt = quant.get(t)
    assert qt.n_levels == LEVELS[t]
    q = qt.quantize(x)
    levels = qt.levels_ref(q.reshape(-1, qt.info.type_size))
    assert levels.shape == (x.size // 256, 256)
    assert levels.min() >= 0 and levels.max() < qt.n_levels
    hist = qt.histogram(q)
    assert hist.sum() == x.size


def test_registered():
    for t in TYPES:
        assert quant.get(t).type == t
        assert quant.get(t).has_quantize_kernel and quant.get(t).has_dequantize_kernel


@pytest.mark.parametrize("t", TYPES)
def test_extreme_values(t):
    """inf, NaN, huge (fp16 d overflows) and subnormal weights give ggml's bytes too."""
    x = np.random.default_rng(1).standard_normal((8, 512)).astype(np.float32)
    x[0] *= 1e9
    x[1] *= 1e30
    x[2, 3] = np.inf
    x[3, 7] = np.nan
    x[4, 300] = -np.inf
    x[5] *= 1e-30
    x[6] = 1e-40
    x[7, :256] = np.float32(3e38)
    want = ggml_quantize(t, x)
    qt = quant.get(t)
    with np.errstate(all="ignore"):
        assert np.array_equal(qt.quantize(x, reference=True), want)
    assert np.array_equal(qt.quantize(x), want)
