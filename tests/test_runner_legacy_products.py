"""The legacy types' prompt products (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 on integer dot
products) are ggml's mul_mat, bit for bit, whatever the token tile a token falls in (whole
tiles, a short last tile that repeats its last token, a remainder done one token at a time),
the chunk of tokens and the thread that runs its rows."""

from __future__ import annotations

import numpy as np
import pytest
from ggml_oracle import sample_weights
from test_runner_activations import activations
from test_runner_float_products import ggml_mul_mat

from gguflab import quant
from gguflab.gguf import GGMLType
from gguflab.runner import kernels
from gguflab.runner.kernels import matmul

LEGACY = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0)
# one tile exactly, a short tile alone, a tile and a one-token remainder, a tile and a short
# tile, a chunk of tiles and a short tile, two chunks and a one-token remainder
N_TOKENS = (2, 3, 8, 9, 13, kernels.TOKEN_CHUNK + 5, 2 * kernels.TOKEN_CHUNK + 1)


@pytest.mark.parametrize("t", LEGACY, ids=lambda t: t.name)
def test_legacy_prompt_products_are_ggmls_bits(t, monkeypatch):
    if not kernels.quantizes_activations(t):  # the integer kernels are x86 AVX2 only
        pytest.skip(f"{t.name} products run on floats on this host")
    monkeypatch.setattr(kernels, "MIN_WORK_PER_THREAD", 1)  # split even these small products
    n_in, n_out = 576, 45  # an odd row count: the thread split and row groups end unevenly
    w = quant.get(t).quantize(sample_weights(n_out, n_in, seed=int(t)))
    x = activations(max(N_TOKENS), n_in, seed=int(t))
    for n in N_TOKENS:
        want = ggml_mul_mat(t, w, x[:n])
        for threads in (1, 2):
            got = matmul(w, t, x[:n], threads=threads)
            np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32),
                                          err_msg=f"{t.name} n={n} threads={threads}")
