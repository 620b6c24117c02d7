"""IQ4_NL and IQ4_XS products are ggml's own function, bit for bit, in every order llama.cpp's
CPU backend sums them in (x86 AVX2, default settings):

- IQ4_XS (x rounded to Q8_K): below 8 tokens as `vec_dot_iq4_xs_q8_K` (per super-block the
  table values' dots times the sub-scales in 8 i32 lanes, one conversion and FMA by d * dx,
  `hsum_float_8`), from 8 tokens on as its tiled kernel (d * float(s1), then one FMA by dx:
  no mins);
- IQ4_NL (x rounded to Q8_0) in a plain buffer: one token as `vec_dot_iq4_nl_q8_0` (even and
  odd blocks in two float sums, an odd last block added as a scalar), 2 tokens or more as
  llamafile's tinyBLAS (one 8-lane sum a (row, token));
- IQ4_NL with rows % 8 == 0, which llama.cpp repacks (`iq4_nl_8x8_q8_0`): its gemm/gemv.

Whatever the thread count and the tile a token falls in."""

from __future__ import annotations

import numpy as np
import pytest
from ggml_oracle import ggml_cpu_matmul, sample_weights
from ggml_repack import ggml_repacked_matmul
from test_runner_activations import activations
from test_runner_kquant_products import _int_path, ggml_mul_mat

from gguflab import quant
from gguflab.gguf import GGMLType
from gguflab.runner import kernels, repack
from gguflab.runner.kernels import matmul

TOKENS = (1, 3, 7, 8, 9, 33)  # decode; a few; the last below 8; a tile; one more; a remainder


def _case(t: GGMLType, n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """Edge-case weights (zero, constant, tiny, huge, one-signed rows) and activations of
    very different scales."""
    w = quant.get(t).quantize(sample_weights(n_out, n_in, seed=int(t) + n_out))
    return w, activations(max(TOKENS), n_in, seed=int(t) + n_in)


def _reference(t: GGMLType, w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """ggml's mul_mat as llama.cpp's default load runs it: repacked where it repacks."""
    if repack.repacked(t, w.shape[0]):
        return ggml_repacked_matmul(t, w, x)
    return ggml_mul_mat(t, w, x)


def _assert_bits(t: GGMLType, w: np.ndarray, x: np.ndarray) -> None:
    for n in TOKENS:
        ref = _reference(t, w, x[:n])
        for threads in (1, 2):
            got = matmul(w, t, x[:n], threads=threads)
            np.testing.assert_array_equal(got, ref, err_msg=f"{t.name} n={n} t={threads}")


@pytest.mark.parametrize("n_out", [16, 20], ids=["rows16", "rows20"])
@pytest.mark.parametrize("t", [GGMLType.IQ4_NL, GGMLType.IQ4_XS], ids=lambda t: t.name)
def test_iq4_products_are_ggmls_bits(t, n_out):
    _int_path(t)
    w, x = _case(t, n_out, 1024)
    # llama.cpp repacks IQ4_NL of 16 rows, not of 20, and never IQ4_XS
    assert repack.repacked(t, n_out) == (t == GGMLType.IQ4_NL and n_out == 16)
    _assert_bits(t, w, x)


@pytest.mark.parametrize("n_out", [16, 20], ids=["rows16", "rows20"])
def test_iq4_nl_odd_block_count(n_out):
    """Rows of 3 blocks: vec_dot's last block outside its pairs (a scalar FMA)."""
    _int_path(GGMLType.IQ4_NL)
    _assert_bits(GGMLType.IQ4_NL, *_case(GGMLType.IQ4_NL, n_out, 96))


def test_iq4_orders_differ_here():
    """The data above tells the orders apart, so the products took the one ggml took."""
    _int_path(GGMLType.IQ4_NL)
    t = GGMLType.IQ4_NL  # plain buffer: one token in vec_dot's order, more in tinyBLAS's
    w, x = _case(t, 20, 1024)
    one = np.concatenate([ggml_mul_mat(t, w, x[i:i + 1]) for i in range(9)])
    assert not np.array_equal(one, ggml_mul_mat(t, w, x[:9]))
    t = GGMLType.IQ4_XS  # tiled from 8 tokens on
    w, x = _case(t, 20, 1024)
    assert not np.array_equal(ggml_mul_mat(t, w, x[:33]), ggml_cpu_matmul(t, w, x[:33]))


def test_iq4_xs_in_vec_dot_order(monkeypatch):
    """With the tiled order off (llama.cpp's GGML_CPU_TILED_MM=0), every token count sums as
    `vec_dot_iq4_xs_q8_K`, called a dot product at a time."""
    t = GGMLType.IQ4_XS
    _int_path(t)
    monkeypatch.setattr(kernels, "PROMPT_TILED", False)
    w, x = _case(t, 20, 1024)
    ref = ggml_cpu_matmul(t, w, x)
    for n in (1, 9, 33):
        for threads in (1, 2):
            got = matmul(w, t, x[:n], threads=threads)
            np.testing.assert_array_equal(got, ref[:n], err_msg=f"n={n} t={threads}")


@pytest.mark.parametrize("t", [GGMLType.IQ4_NL, GGMLType.IQ4_XS], ids=lambda t: t.name)
def test_iq4_products_on_smollm2_shapes(t):
    """SmolLM2's down product (1536 -> 576 rows: IQ4_NL repacked) on its own weights'
    scale, and the not-repacked route over 4 rows fewer."""
    _int_path(t)
    rng = np.random.default_rng(3)
    wf = (rng.standard_normal((576, 1536)) * 0.02).astype(np.float32)
    w = quant.get(t).quantize(wf)
    x = (rng.standard_normal((33, 1536)) * 0.5).astype(np.float32)
    for n in (1, 9, 33):
        np.testing.assert_array_equal(matmul(w, t, x[:n], threads=2),
                                      _reference(t, w, x[:n]), err_msg=f"n={n}")
        np.testing.assert_array_equal(matmul(w[:572], t, x[:n], threads=2),
                                      ggml_mul_mat(t, w[:572], x[:n]), err_msg=f"n={n} 572")
