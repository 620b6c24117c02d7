"""Products over the weights llama.cpp repacks at load (issue #16): Q4_0 and Q4_K with a row
count that is a multiple of 8, on an AVX2 host (`runner/repack.py`).

The oracle is ggml's own mul_mat with the weight in the CPU backend's CPU_REPACK buffer (as
llama-perplexity and llama-cli load it by default), computed on the CPU backend of the
oracle build: bit for bit, for token counts that take its gemm only, its gemv only, and
both (n % 4 tokens go through gemv), on one and two threads. Weights whose row count ggml
does not repack stay on the vec_dot order, against ggml's plain CPU buffer."""

from __future__ import annotations

import numpy as np
import pytest
from ggml_oracle import sample_weights
from ggml_repack import ggml_repacked_matmul

from gguflab import quant
from gguflab.gguf import GGMLType
from gguflab.runner import kernels, repack
from gguflab.runner.kernels import matmul, matmuls

TYPES = [GGMLType.Q4_0, GGMLType.Q4_K]
TOKENS = [1, 3, 4, 5, 8, 33]


@pytest.fixture(scope="module", autouse=True)
def _needs_avx2():
    # the oracle build is AVX2: on a host without it neither side repacks
    if not repack._host_repacks():
        pytest.fail("this host lacks AVX2: llama.cpp would not repack here")


def _weights(t: GGMLType, rows: int, n_in: int, seed: int) -> np.ndarray:
    return quant.get(t).quantize(sample_weights(rows, n_in, seed))


def _x(n_tok: int, n_in: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n_tok, n_in)).astype(np.float32)
    if n_tok > 2:
        x[1, : n_in // 2] = 0.0  # an all-zero group of x (scale 0)
        x[2] *= 100.0
    return x


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows,n_in", [(8, 256), (16, 512), (24, 256)])
@pytest.mark.parametrize("n_tok", TOKENS)
def test_repacked_product_is_ggmls(t, rows, n_in, n_tok):
    assert repack.repacked(t, rows)
    w = _weights(t, rows, n_in, rows + n_in)
    x = _x(n_tok, n_in, n_tok)
    want = ggml_repacked_matmul(t, w, x, threads=2)
    for threads in (1, 2):
        got = matmul(w, t, x, threads=threads)
        assert np.array_equal(got, want), (threads, np.abs(got - want).max())


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_one_token_team_jobs(t):
    """Decoding posts the repacked gemv as a team job (`matmuls`), beside other weights."""
    w1, w2 = _weights(t, 16, 512, 1), _weights(t, 24, 512, 2)
    w3 = _weights(GGMLType.Q8_0, 16, 512, 3)
    x = _x(1, 512, 4)[0]
    ys = matmuls([(w1, t), (w2, t), (w3, GGMLType.Q8_0)], x, threads=2)
    assert np.array_equal(ys[0], ggml_repacked_matmul(t, w1, x[None])[0])
    assert np.array_equal(ys[1], ggml_repacked_matmul(t, w2, x[None])[0])
    assert np.array_equal(ys[2], ggml_repacked_matmul(GGMLType.Q8_0, w3, x[None],
                                                      repack=False)[0])


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [12, 20])
def test_rows_ggml_does_not_repack(t, rows):
    """A row count ggml does not repack keeps the vec_dot order (against the plain buffer).
    Below 8 tokens: Q4_K prompts of 8 or more go through ggml's tiled kernel, not ours."""
    assert not repack.repacked(t, rows)
    w = _weights(t, rows, 512, rows)
    for n_tok in (1, 3, 4, 5) + ((8, 33) if t == GGMLType.Q4_0 else ()):
        x = _x(n_tok, 512, n_tok)
        want = ggml_repacked_matmul(t, w, x, repack=False)
        assert np.array_equal(matmul(w, t, x), want), n_tok


def test_repacked_differs_from_vec_dot():
    """The test above would pass for nothing if both orders gave the same bits here."""
    w = _weights(GGMLType.Q4_K, 16, 512, 5)
    x = _x(8, 512, 6)
    assert not np.array_equal(ggml_repacked_matmul(GGMLType.Q4_K, w, x),
                              ggml_repacked_matmul(GGMLType.Q4_K, w, x, repack=False))


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_any_row_split_gives_the_same_bits(t):
    """Threads take rows in slices of any length (the prompt kernel's row passes leave a
    remainder, the one-token kernel's 8-row passes too): each slice's rows are ggml's."""
    rows, n_in, n_tok = 24, 512, 13  # 12 tokens through the gemm order, 1 through gemv
    w, x = _weights(t, rows, n_in, 7), _x(n_tok, n_in, 8)
    want = ggml_repacked_matmul(t, w, x)
    xq = kernels.round_q8(x, quant.get(t).activation_type)
    y = np.full((n_tok, rows), np.nan, np.float32)
    for r0, r1 in [(0, 3), (3, 10), (10, 11), (11, 24)]:
        part = w[r0:r1]
        y_part = np.empty((n_tok, r1 - r0), np.float32)
        repack.matmul(part, t, xq, y_part, r1 - r0, n_tok, n_in, r1 - r0, threads=1)
        y[:, r0:r1] = y_part
    assert np.array_equal(y, want)
