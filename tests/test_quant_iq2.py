"""IQ2_XXS, IQ2_XS, IQ2_S against llama.cpp: quantized bytes equal to `ggml_quantize_chunk`
(with a random positive importance matrix, and without one for IQ2_S), dequantized floats
equal to `dequantize_row_iq2_*`, and the runner's products over these weights equal to
x @ dequantize(w).T within float tolerance."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from ggml_oracle import ggml_quantize_chunk, libggml, sample_weights

from gguflab import quant
from gguflab.errors import UserError
from gguflab.gguf import GGMLType
from gguflab.quant.iquants.grids_iq2 import address, grid_levels, search_tables

TYPES = [GGMLType.IQ2_XXS, GGMLType.IQ2_XS, GGMLType.IQ2_S]
SHAPES = [(6, 256), (3, 512), (2, 4096)]


def weights(rows: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Weight-like rows (per-row scale, a few outliers) and a positive imatrix."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n)).astype(np.float32) * rng.uniform(0.005, 0.05, (rows, 1))
    x[rng.random((rows, n)) < 0.002] *= 20
    imatrix = (rng.gamma(1.0, 1.0, n) + 1e-3).astype(np.float32)
    return x.astype(np.float32), imatrix


def check_bytes(ours: np.ndarray, ref: np.ndarray, t: GGMLType) -> None:
    bad = np.nonzero((ours != ref).any(axis=-1))[0]
    assert bad.size == 0, f"{t.name}: rows {bad[:10]} differ from ggml"


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_edge_cases_match_ggml(t):
    """All-zero, constant, tiny, huge, one-signed and integer rows; imatrix with zeros."""
    x = sample_weights(12, 512, seed=3)
    x[8, :200] = 0.0
    x[9, 7] = 1e-20
    x[10] = -1.0
    x[11, ::3] = -2.5
    imatrix = np.random.default_rng(5).uniform(0.0, 4.0, 512).astype(np.float32)
    imatrix[::13] = 0.0
    ref = ggml_quantize_chunk(t, x, imatrix)
    for reference in (True, False):
        check_bytes(quant.get(t).quantize(x, imatrix=imatrix, reference=reference), ref, t)
    if t == GGMLType.IQ2_S:
        ref = ggml_quantize_chunk(t, x, None)
        for reference in (True, False):
            check_bytes(quant.get(t).quantize(x, reference=reference), ref, t)


def test_flags_follow_ggml():
    lib = libggml()
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    for t in TYPES:
        qt = quant.get(t)
        assert qt.uses_imatrix
        assert qt.requires_imatrix == lib.ggml_quantize_requires_imatrix(int(t))


def test_bad_shapes_are_user_errors():
    qt = quant.get(GGMLType.IQ2_S)
    x, imatrix = weights(2, 512, seed=2)
    with pytest.raises(UserError, match="columns"):
        qt.quantize(x, imatrix=imatrix[:256])
    with pytest.raises(UserError):
        qt.quantize(x[:, :100], imatrix=imatrix[:100])


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_search_tables(t):
    """Every point of the level cube is on the grid or has neighbours that are, all at the
    smallest distances; the grid round-trips through its addresses."""
    lv = grid_levels(t)
    st = search_tables(t)
    assert (st.index[address(lv)] == np.arange(len(lv))).all()
    cube = (np.arange(3**8)[:, None] // 3 ** np.arange(8)) % 3
    addr = address(cube)
    off = st.index[addr] < 0
    for a, p in zip(addr[off][::97], cube[off][::97], strict=True):
        s = st.start[a]
        cand = st.flat[s + 1: s + 1 + st.flat[s]]
        d2 = ((lv.astype(int) - p) ** 2).sum(axis=1)
        assert d2[cand].min() == d2.min()
        assert (np.diff(d2[cand]) >= 0).all()
