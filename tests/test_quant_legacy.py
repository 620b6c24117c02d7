"""Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / Q8_1: the numpy reference and the compiled kernels
against llama.cpp's own `quantize_row_*_ref` / `dequantize_row_*`, byte for byte, and
against gguf-py."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from ggml_oracle import ggml_dequantize, ggml_quantize, sample_weights

import gguflab.quant.legacy  # noqa: F401  (registers the types)
from gguflab import quant
from gguflab.gguf import GGMLType

TYPES = [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0,
         GGMLType.Q8_1]
GGUF_PY_TYPES = TYPES[:5]  # gguf-py has no Q8_1 (and sizes its blocks at 40 bytes)
LEVELS = {GGMLType.Q4_0: 16, GGMLType.Q4_1: 16, GGMLType.Q5_0: 32, GGMLType.Q5_1: 32,
          GGMLType.Q8_0: 256, GGMLType.Q8_1: 256}


def oracle_quantize(t: GGMLType, x: np.ndarray) -> np.ndarray:
    return ggml_quantize(t, x)


def oracle_dequantize(t: GGMLType, q: np.ndarray, n_per_row: int) -> np.ndarray:
    if t == GGMLType.Q8_1:  # ggml has no Q8_1 dequantizer: Q8_0's on the same d and qs
        blocks = q.reshape(-1, 36)
        as_q8_0 = np.concatenate([blocks[:, :2], blocks[:, 4:]], axis=1)
        return ggml_dequantize(GGMLType.Q8_0, as_q8_0.reshape(q.shape[0], -1), n_per_row)
    return ggml_dequantize(t, q, n_per_row)


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def extremes() -> np.ndarray:
    """Blocks at the edges: huge and tiny magnitudes, subnormals (1/d overflows), ties
    between +a and -a and between +0 and -0, constant blocks."""
    x = sample_weights(16, 256, seed=7)
    r = np.arange(32, dtype=np.float32)
    x[0, 0:32] = 1e30
    x[0, 7] = -1e30
    x[0, 32:64] = 1e-30 * (r - 11)
    x[0, 64:96] = np.linspace(-1e-38, 1e-39, 32, dtype=np.float32)
    x[0, 96:128] = 1e-44
    x[0, 128:160] = 3e38 * np.cos(r)
    x[0, 160:192] = -3.4e38
    x[0, 192:224] = 1e-45 * (r % 3)
    x[1, 0:32] = np.tile(np.float32([0.5, -0.5]), 16)
    x[1, 32:64] = np.tile(np.float32([-0.5, 0.5]), 16)
    x[1, 64:96] = -0.0
    x[1, 70] = 0.0
    x[1, 96:128] = 0.0
    x[1, 100] = -0.0
    x[1, 128:160] = np.abs(x[1, 128:160])
    x[1, 130] = -0.0
    x[1, 160:192] = 7.0
    x[1, 192:224] = -(r // 4)
    x[1, 224:256] = r - 16
    return x


def specials() -> np.ndarray:
    """Blocks with inf and NaN: ggml keeps going, and so do we, to the same bytes."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 512)).astype(np.float32)
    pick = np.float32([np.nan, np.inf, -np.inf, 0.0, -0.0, 3.4e38, 1e-45, 1e-40])
    mask = rng.random(x.shape) < 0.1
    x[mask] = rng.choice(pick, mask.sum())
    x[0, 0:32] = np.nan
    x[0, 63] = np.nan  # a NaN last in its block
    x[0, 64:96] = np.inf
    return x


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_registered(t):
    qt = quant.get(t)
    assert qt.type == t and qt.n_levels == LEVELS[t]
    assert qt.has_quantize_kernel and qt.has_dequantize_kernel


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("data", ["weights", "extremes", "specials"])
def test_reference_matches_ggml(t, data):
    x = {"weights": lambda: sample_weights(16, 1024, seed=1), "extremes": extremes,
         "specials": specials}[data]()
    assert np.array_equal(quant.get(t).quantize(x, reference=True), oracle_quantize(t, x))


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("shape,seed", [((8, 32), 0), ((16, 4096), 1), ((3, 576), 2),
                                        ((8, 96), 3), ((32, 4096), 4)])
def test_kernel_matches_ggml(t, shape, seed):
    x = sample_weights(*shape, seed=seed)
    assert np.array_equal(quant.get(t).quantize(x), oracle_quantize(t, x))


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_kernel_matches_ggml_at_the_edges(t):
    qt = quant.get(t)
    for x in (extremes(), specials()):
        assert np.array_equal(qt.quantize(x), oracle_quantize(t, x))


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_random_blocks(t):
    """Random scales from 2^-149 to 2^127, few-valued blocks full of ties, random bits."""
    rng = np.random.default_rng(5)
    scale = np.exp2(rng.integers(-149, 124, (2048, 1))).astype(np.float32)
    few = np.float32([-0.0, 0.0, 1.0, 2.0, -2.0, 0.5])
    x = np.concatenate([
        rng.standard_normal((2048, 32)).astype(np.float32) * scale,
        rng.choice(few, (2048, 32)),
        rng.integers(0, 2**32, (2048, 32), dtype=np.uint64).astype(np.uint32).view(np.float32),
    ]).reshape(-1, 1024)
    want = oracle_quantize(t, x)
    qt = quant.get(t)
    assert np.array_equal(qt.quantize(x), want)
    with np.errstate(all="ignore"):
        assert np.array_equal(qt.quantize(x, reference=True), want)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_dequantize_matches_ggml(t):
    qt = quant.get(t)
    x = np.concatenate([sample_weights(16, 256, seed=3), extremes()])
    q = oracle_quantize(t, x)
    # arbitrary bytes too: NaN and inf scales, every level
    noise = np.random.default_rng(9).integers(0, 256, (64, qt.info.row_bytes(256)), np.uint8)
    blocks = noise.reshape(-1, qt.info.type_size)
    blocks[::5, :4] = [0xFA, 0x7D, 0x2F, 0xFD]  # fp16 NaNs (signalling, two payloads)
    blocks[1::5, :4] = [0x00, 0x7C, 0x00, 0xFC]  # +inf, -inf
    for raw in (q, noise):
        want = oracle_dequantize(t, raw, 256)
        assert np.array_equal(bits(qt.dequantize(raw)), bits(want))
        assert np.array_equal(bits(qt.dequantize(raw, reference=True)), bits(want))


@pytest.mark.parametrize("t", GGUF_PY_TYPES, ids=lambda t: t.name)
def test_gguf_py(t):
    gguf = pytest.importorskip("gguf")
    gt = gguf.GGMLQuantizationType[t.name]
    qt = quant.get(t)
    x = sample_weights(16, 1024, seed=4)
    q = qt.quantize(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert np.array_equal(gguf.quants.quantize(x, gt), q)
    assert np.array_equal(bits(gguf.quants.dequantize(q, gt)), bits(qt.dequantize(q)))


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_threads_give_the_same_bytes(t):
    qt = quant.get(t)
    x = np.random.default_rng(0).standard_normal((64, 4096)).astype(np.float32)
    q = qt.quantize(x, threads=1)
    assert np.array_equal(q, qt.quantize(x, threads=2))
    assert np.array_equal(bits(qt.dequantize(q, threads=1)), bits(qt.dequantize(q, threads=2)))


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_levels_and_histogram(t):
    qt = quant.get(t)
    x = sample_weights(8, 1024, seed=6)
    q = qt.quantize(x)
    levels = qt.levels_ref(q.reshape(-1, qt.info.type_size))
    assert levels.shape == (x.size // 32, 32)
    assert levels.min() >= 0 and levels.max() < qt.n_levels
    # the levels are what the dequantizer scales
    d = q.reshape(-1, qt.info.type_size)[:, :2].copy().view(np.float16).astype(np.float32)
    back = qt.dequantize(q).reshape(-1, 32)
    if t in (GGMLType.Q4_0, GGMLType.Q5_0, GGMLType.Q8_0, GGMLType.Q8_1):
        centred = levels.astype(np.float32) - qt.n_levels // 2
        assert np.array_equal(bits(centred * d), bits(back))
    hist = qt.histogram(q)
    assert hist.sum() == x.size and len(hist) == quant.HIST_BINS


def test_q8_1_block_is_36_bytes():
    assert quant.get(GGMLType.Q8_1).info.type_size == 36
    x = sample_weights(2, 64, seed=0)
    q = quant.get(GGMLType.Q8_1).quantize(x)
    assert q.shape == (2, 72)
    # s is sum(qs) * d (with d before its rounding to fp16)
    blocks = q.reshape(-1, 36)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)[:, 0]
    s = blocks[:, 2:4].copy().view(np.float16)[:, 0].astype(np.float32)
    total = blocks[:, 4:].view(np.int8).astype(np.int32).sum(axis=1)
    np.testing.assert_allclose(s, total * d, rtol=2e-3)
