"""Every registered type against llama.cpp, byte for byte: the numpy reference and the
compiled kernels of the quantizer (with and without an importance matrix), the dequantizer,
threads, histograms, and gguf-py where it has the type.

The battery is parametrized over `quant.REGISTRY`: a type gets all of it by being
registered. The llama.cpp side is `ggml_quantize_chunk` (what llama-quantize calls) in the
libggml-base that llama-cpp-python ships, and `quantize_row_<t>_ref` for the activation types
(Q8_1, Q8_K) it has no chunk quantizer for.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from ggml_oracle import ggml_dequantize, ggml_quantize, ggml_quantize_chunk, sample_weights

from gguflab import quant
from gguflab.errors import UserError
from gguflab.gguf import GGMLType

G = GGMLType
ALL = sorted(quant.REGISTRY, key=int)
BLOCKED = [t for t in ALL if quant.get(t).info.block_size > 1]
FLOATS = [G.F16, G.BF16]
# llama.cpp's quantizers for these are defined on any input, inf and NaN included (the others
# may assert on a point off their grid): the non-finite and extreme batteries run on these
NON_FINITE = [G.Q4_0, G.Q4_1, G.Q5_0, G.Q5_1, G.Q8_0, G.Q8_1,
              G.Q2_K, G.Q3_K, G.Q4_K, G.Q5_K, G.Q6_K, G.Q8_K]
WEIGHTED = [t for t in BLOCKED if quant.get(t).uses_imatrix]
ids = lambda t: t.name  # noqa: E731


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def importance(n: int, seed: int = 0) -> np.ndarray:
    """An importance row as llama-imatrix's are: positive, spread over orders of magnitude,
    with a few dead columns."""
    rng = np.random.default_rng(seed)
    w = rng.lognormal(0.0, 1.5, n).astype(np.float32)
    w[rng.random(n) < 0.02] = 0.0
    return w


def default_imatrix(t: GGMLType, n: int) -> np.ndarray | None:
    """What a type that cannot quantize without one is given in the unweighted tests."""
    return importance(n, 1) if quant.get(t).requires_imatrix else None


def oracle(t: GGMLType, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    if t in (G.Q8_1, G.Q8_K, G.F16, G.BF16):
        return ggml_quantize(t, x)
    return ggml_quantize_chunk(t, x, imatrix)


def oracle_dequantize(t: GGMLType, q: np.ndarray, n_per_row: int) -> np.ndarray:
    if t == G.Q8_1:  # ggml has no Q8_1 dequantizer: Q8_0's on the same d and qs
        blocks = q.reshape(-1, 36)
        as_q8_0 = np.concatenate([blocks[:, :2], blocks[:, 4:]], axis=1)
        return ggml_dequantize(G.Q8_0, as_q8_0.reshape(q.shape[0], -1), n_per_row)
    return ggml_dequantize(t, q, n_per_row)


def width(t: GGMLType, blocks: int) -> int:
    return quant.get(t).info.block_size * blocks


# -- data -------------------------------------------------------------------------------------


def edge_rows(n: int, seed: int) -> np.ndarray:
    """Finite rows at the edges of every search: one sign, offsets, constants, heavy tails,
    sparse rows, few-valued rows full of ties, sub-blocks all but zero."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((12, n)).astype(np.float32)
    rows = [
        -np.abs(g[0]), np.abs(g[1]), g[2] + 4, g[3] - 4,
        np.full(n, -0.75, np.float32),
        g[4] ** 3,
        rng.standard_cauchy(n).astype(np.float32),
        np.where(rng.random(n) < 0.9, 0, g[5]).astype(np.float32),
        rng.integers(-2, 3, n).astype(np.float32),
        np.round(g[6] * 4) / 2,
        np.zeros(n, np.float32),
        g[7] * 1e-3 + 3.0,
    ]
    x = np.stack(rows).astype(np.float32)
    x[0, ::16] *= 1e-17
    x[1, 16:32] = 0
    return x


def extreme_rows(n: int, seed: int) -> np.ndarray:
    """Magnitudes from subnormal to near FLT_MAX (fp16 scales overflow and underflow), ties
    between +a and -a and between +0 and -0."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((10, n)).astype(np.float32)
    x[0] *= 1e9
    x[1] *= 1e30
    x[2] *= 1e-30
    x[3] = 1e-40
    x[4, : n // 2] = np.float32(3e38)
    x[5] = np.tile(np.float32([0.5, -0.5]), n // 2)
    x[6] = -0.0
    x[6, 3] = 0.0
    x[7] = (rng.integers(-2, 3, n) * 1e-15).astype(np.float32)
    x[8] = 1e-45 * (np.arange(n) % 3)
    x[9] = np.linspace(-1e-38, 1e-39, n, dtype=np.float32)
    return x


def special_rows(n: int, seed: int) -> np.ndarray:
    """inf and NaN: ggml keeps going, and so do we, to the same bytes."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, n)).astype(np.float32)
    pick = np.float32([np.nan, np.inf, -np.inf, 0.0, -0.0, 3.4e38, 1e-45, 1e-40])
    mask = rng.random(x.shape) < 0.1
    x[mask] = rng.choice(pick, mask.sum())
    x[0, :32] = np.nan
    x[1, 31] = np.nan  # a NaN last in its block
    x[2, 32:64] = np.inf
    return x


def random_bits(n: int, seed: int) -> np.ndarray:
    """Random scales from 2^-149 to 2^127, few-valued blocks and random bit patterns."""
    rng = np.random.default_rng(seed)
    scale = np.exp2(rng.integers(-149, 124, (64, 1))).astype(np.float32)
    few = np.float32([-0.0, 0.0, 1.0, 2.0, -2.0, 0.5])
    return np.concatenate([
        rng.standard_normal((64, n)).astype(np.float32) * scale,
        rng.choice(few, (64, n)),
        rng.integers(0, 2**32, (64, n), dtype=np.uint64).astype(np.uint32).view(np.float32),
    ])


FINITE_DATA = {
    "weights": lambda t: sample_weights(8, width(t, 4), seed=1),
    "edges": lambda t: edge_rows(width(t, 4), seed=2),
    "wide": lambda t: (np.random.default_rng(7).standard_normal((16, width(t, 4)))
                       * np.random.default_rng(8).lognormal(0, 3, (16, 1))).astype(np.float32),
}
NON_FINITE_DATA = {
    "extremes": lambda t: extreme_rows(width(t, 4), seed=3),
    "specials": lambda t: special_rows(width(t, 4), seed=4),
    "random_bits": lambda t: random_bits(width(t, 4), seed=5),
}
# blocks of random bits (mostly NaN and huge values in every block) on the legacy types only:
# the K-quants' searches on such blocks follow ggml's NaN arithmetic only as far as
# `specials` (a few non-finite values a block) goes
RANDOM_BITS = [G.Q4_0, G.Q4_1, G.Q5_0, G.Q5_1, G.Q8_0, G.Q8_1]
CASES = ([(t, d) for t in BLOCKED for d in FINITE_DATA]
         + [(t, d) for t in NON_FINITE for d in NON_FINITE_DATA
            if d != "random_bits" or t in RANDOM_BITS])


def data(t: GGMLType, name: str) -> np.ndarray:
    return {**FINITE_DATA, **NON_FINITE_DATA}[name](t)


# -- quantize ---------------------------------------------------------------------------------


def test_the_registry_is_what_the_rest_derives_from():
    from gguflab.runner import kernels
    from gguflab.runner.cuda import kernels as cuda_kernels

    weights = quant.weight_types()
    assert kernels.SUPPORTED_TYPES == cuda_kernels.WEIGHT_TYPES == weights
    for t in ALL:
        qt = quant.get(t)
        assert qt.type == t
        assert (t in weights) == (qt.weight_type and (qt.has_dequantize_kernel or t == G.F32))
        if qt.weight_type and t in weights:
            assert qt.file_type is not None, t.name
    assert G.Q8_K not in weights and G.Q8_1 not in weights


@pytest.mark.parametrize("t,name", CASES, ids=lambda v: v.name if isinstance(v, G) else v)
def test_reference_matches_ggml(t, name):
    x = data(t, name)
    im = default_imatrix(t, x.shape[1])
    with np.errstate(all="ignore"):
        assert np.array_equal(quant.get(t).quantize(x, reference=True, imatrix=im),
                              oracle(t, x, im))


@pytest.mark.parametrize("t,name", CASES, ids=lambda v: v.name if isinstance(v, G) else v)
def test_kernel_matches_ggml(t, name):
    x = data(t, name)
    im = default_imatrix(t, x.shape[1])
    assert np.array_equal(quant.get(t).quantize(x, imatrix=im), oracle(t, x, im))


@pytest.mark.parametrize("t", BLOCKED, ids=ids)
@pytest.mark.parametrize("rows,blocks,seed", [(8, 1, 0), (3, 6, 2), (16, 3, 3), (32, 16, 4)])
def test_kernel_matches_ggml_on_shapes(t, rows, blocks, seed):
    x = sample_weights(rows, width(t, blocks), seed=seed)
    im = default_imatrix(t, x.shape[1])
    assert np.array_equal(quant.get(t).quantize(x, imatrix=im), oracle(t, x, im))


@pytest.mark.parametrize("t", WEIGHTED, ids=ids)
@pytest.mark.parametrize("name", ["weights", "edges"])
def test_importance_weighted_matches_ggml(t, name):
    """With an imatrix, llama.cpp runs another search: the reference and the kernels follow."""
    x = data(t, name)
    im = importance(x.shape[1], 5)
    want = oracle(t, x, im)
    qt = quant.get(t)
    assert np.array_equal(qt.quantize(x, reference=True, imatrix=im), want)
    assert np.array_equal(qt.quantize(x, imatrix=im), want)
    if not qt.requires_imatrix:  # and the weights change the result
        assert not np.array_equal(want, oracle(t, x))


@pytest.mark.parametrize("t", [t for t in BLOCKED if not quant.get(t).uses_imatrix
                               and t not in (G.Q8_1, G.Q8_K)], ids=ids)
def test_types_without_weighted_search_ignore_the_imatrix(t):
    x = sample_weights(8, width(t, 2), seed=6)
    im = importance(x.shape[1], 6)
    qt = quant.get(t)
    assert np.array_equal(qt.quantize(x, imatrix=im), qt.quantize(x))
    assert np.array_equal(qt.quantize(x, imatrix=im), oracle(t, x, im))


@pytest.mark.parametrize("t", WEIGHTED, ids=ids)
def test_imatrix_of_the_wrong_width_is_a_user_error(t):
    x = sample_weights(2, width(t, 2), seed=0)
    with pytest.raises(UserError, match="importance matrix has"):
        quant.get(t).quantize(x, imatrix=np.ones(x.shape[1] // 2, np.float32))


@pytest.mark.parametrize("t", [t for t in BLOCKED if quant.get(t).requires_imatrix], ids=ids)
def test_types_that_need_an_imatrix_say_so(t):
    with pytest.raises(UserError, match="needs an importance matrix"):
        quant.get(t).quantize(sample_weights(2, width(t, 1), seed=0))


@pytest.mark.parametrize("t", ALL, ids=ids)
def test_threads_give_the_same_bytes(t):
    x = np.random.default_rng(0).standard_normal((64, width(t, 16) if t in BLOCKED else 4096))
    x = x.astype(np.float32)
    qt = quant.get(t)
    im = default_imatrix(t, x.shape[1])
    q = qt.quantize(x, threads=1, imatrix=im)
    assert np.array_equal(q, qt.quantize(x, threads=2, imatrix=im))
    assert np.array_equal(bits(qt.dequantize(q, threads=1)), bits(qt.dequantize(q, threads=2)))


# -- dequantize -------------------------------------------------------------------------------


@pytest.mark.parametrize("t", BLOCKED, ids=ids)
def test_dequantize_matches_ggml(t):
    qt = quant.get(t)
    n = width(t, 4)
    x = np.concatenate([sample_weights(16, n, seed=3), edge_rows(n, 3)])
    q = oracle(t, x, default_imatrix(t, n))
    # and arbitrary bytes: every code, NaN and inf scales
    noise = np.random.default_rng(9).integers(0, 256, (16, qt.info.row_bytes(n)), np.uint8)
    for raw in (q, noise):
        want = oracle_dequantize(t, raw, n)
        assert np.array_equal(bits(qt.dequantize(raw)), bits(want))
        with np.errstate(all="ignore"):
            ref = qt.dequantize(raw, reference=True)
        # the numpy reference may give a NaN another sign or payload (numpy's propagation)
        both_nan = np.isnan(ref) & np.isnan(want)
        assert np.array_equal(np.where(both_nan, 0, bits(ref)), np.where(both_nan, 0, bits(want)))


@pytest.mark.parametrize("t", FLOATS, ids=ids)
def test_floats_match_ggml_bits(t):
    x = sample_weights(16, 256, seed=3)
    specials = np.array([np.inf, -np.inf, np.nan, -np.nan, 0.0, -0.0, 1e-45, 3.4e38,
                         65504, 65520, 1e-8] * 2 + [0.5] * 10, np.float32)
    x[0, : len(specials)] = specials
    x[0, 40:43] = np.array([0x7FC12345, 0xFF812345, 0x7F800001], np.uint32).view(np.float32)
    want = ggml_quantize(t, x)
    qt = quant.get(t)
    with np.errstate(over="ignore", invalid="ignore"):
        assert np.array_equal(qt.quantize(x, reference=True), want)
    assert np.array_equal(qt.quantize(x), want)
    back = ggml_dequantize(t, want, x.shape[1])
    for ref in (True, False):
        assert np.array_equal(bits(qt.dequantize(want, reference=ref)), bits(back))


def test_f32_is_identity():
    x = sample_weights(16, 256, seed=3)
    qt = quant.get(G.F32)
    assert np.array_equal(bits(qt.quantize(x).view(np.float32)), bits(x))
    assert np.array_equal(bits(qt.dequantize(qt.quantize(x))), bits(x))


def _gguf_py_has(t: GGMLType, what: str) -> bool:
    import gguf

    gt = gguf.GGMLQuantizationType.__members__.get(t.name)
    traits = gguf.quants._type_traits.get(gt) if gt is not None else None
    return traits is not None and what in traits.__dict__


GGUF_PY_DEQUANT = [t for t in BLOCKED + FLOATS if _gguf_py_has(t, "dequantize_blocks")]
# gguf-py's quantizers that are llama.cpp's (its others are approximations)
GGUF_PY_QUANT = [G.BF16, G.Q4_0, G.Q4_1, G.Q5_0, G.Q5_1, G.Q8_0]


@pytest.mark.parametrize("t", GGUF_PY_DEQUANT, ids=ids)
def test_gguf_py(t):
    import gguf

    gt = gguf.GGMLQuantizationType[t.name]
    qt = quant.get(t)
    n = width(t, 4) if t in BLOCKED else 1024
    x = sample_weights(16, n, seed=4)
    q = oracle(t, x, default_imatrix(t, n))
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        want = np.asarray(gguf.quants.dequantize(q.view(np.uint8) if t != G.BF16 else q,
                                                 gt), np.float32)
        if t in GGUF_PY_QUANT:
            assert np.array_equal(np.asarray(gguf.quants.quantize(x, gt)).view(np.uint8),
                                  qt.quantize(x).view(np.uint8))
    assert np.array_equal(bits(qt.dequantize(q)), bits(want.reshape(16, n)))


# -- levels and histograms --------------------------------------------------------------------


@pytest.mark.parametrize("t", [t for t in BLOCKED if quant.get(t).n_levels], ids=ids)
def test_levels_and_histogram(t):
    qt = quant.get(t)
    x = sample_weights(8, width(t, 8), seed=6)
    q = qt.quantize(x, imatrix=default_imatrix(t, x.shape[1]))
    levels = qt.levels_ref(q.reshape(-1, qt.info.type_size))
    assert levels is not None and levels.shape == (x.size // qt.info.block_size,
                                                   qt.info.block_size)
    assert levels.min() >= 0 and levels.max() < qt.n_levels
    hist = qt.histogram(q)
    assert len(hist) == quant.HIST_BINS and hist.sum() == x.size


@pytest.mark.parametrize("t", [G.Q4_0, G.Q5_0, G.Q8_0, G.Q8_1], ids=ids)
def test_symmetric_levels_are_what_the_dequantizer_scales(t):
    qt = quant.get(t)
    q = qt.quantize(sample_weights(8, 1024, seed=6))
    levels = qt.levels_ref(q.reshape(-1, qt.info.type_size))
    d = q.reshape(-1, qt.info.type_size)[:, :2].copy().view(np.float16).astype(np.float32)
    centred = levels.astype(np.float32) - qt.n_levels // 2
    assert np.array_equal(bits(centred * d), bits(qt.dequantize(q).reshape(-1, 32)))


@pytest.mark.parametrize("t", [G.Q2_K, G.Q4_K, G.Q5_K], ids=ids)
def test_k_quants_use_their_top_level(t):
    qt = quant.get(t)
    levels = qt.levels_ref(qt.quantize(sample_weights(8, 512, 6)).reshape(-1, qt.info.type_size))
    assert levels.max() == qt.n_levels - 1


def test_q8_1_block_is_36_bytes():
    qt = quant.get(G.Q8_1)
    assert qt.info.type_size == 36
    q = qt.quantize(sample_weights(2, 64, seed=0))
    assert q.shape == (2, 72)
    # s is sum(qs) * d (with d before its rounding to fp16)
    blocks = q.reshape(-1, 36)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)[:, 0]
    s = blocks[:, 2:4].copy().view(np.float16)[:, 0].astype(np.float32)
    total = blocks[:, 4:].view(np.int8).astype(np.int32).sum(axis=1)
    np.testing.assert_allclose(s, total * d, rtol=2e-3)


def test_unknown_type_is_a_user_error():
    missing = [t for t in G if t not in quant.REGISTRY]
    assert missing
    with pytest.raises(UserError, match=f"{missing[0].name} is not supported"):
        quant.get(missing[0])
    with pytest.raises(UserError, match="rows are whole blocks"):
        quant.get(G.Q4_0).dequantize(np.zeros((1, 17), np.uint8))
