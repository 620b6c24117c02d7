"""The grid i-quants' products (IQ3_S, IQ3_XXS, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M) are ggml's own
function, bit for bit, in both orders llama.cpp's CPU backend sums them in: below 8 tokens
as its AVX2 `vec_dot_iq*_q8_K` (per super-block the grid points' magnitudes with their signs
dotted with Q8_K's levels, times the factors 2s + 1, in 8 i32 lanes; one float conversion
and FMA by d * dx a super-block; ggml's horizontal sum, then its 0.125 or 0.25; IQ1_S's
delta through Q8_K's sums of 16 into a float scalar; IQ1_M's, a delta a grid point, through
a second integer sum in float lanes of its own), from 8 tokens on as its tiled kernel
(`ggml-cpu/tiled/`: per super-block d * float(sum), IQ1's levels as 8 * grid + delta, then
one FMA by the token's scale). Whatever the tile a token falls in and the threads that run its
rows; with `kernels.PROMPT_TILED` off (llama.cpp's GGML_CPU_TILED_MM=0), vec_dot's order
for every token count."""

from __future__ import annotations

import numpy as np
import pytest
from ggml_oracle import ggml_cpu_matmul, sample_weights
from test_runner_activations import activations
from test_runner_kquant_products import ggml_mul_mat

from gguflab import quant
from gguflab.gguf import GGMLType
from gguflab.runner import kernels
from gguflab.runner.kernels import matmul

IQ_TYPES = (GGMLType.IQ3_S, GGMLType.IQ3_XXS, GGMLType.IQ2_XXS, GGMLType.IQ2_XS,
            GGMLType.IQ2_S, GGMLType.IQ1_S, GGMLType.IQ1_M)
N_IN = 1024  # 4 super-blocks a row


def _int_path(t: GGMLType) -> None:
    if not kernels.quantizes_activations(t):  # the integer kernels are x86 AVX2 only
        pytest.skip(f"{t.name} products run on floats on this host")


def _case(t: GGMLType, n_out: int, imatrix: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Edge-case weights (zero, constant, tiny, huge, one-signed rows) quantized with an
    importance matrix (zeros in it too) or without, and activations of very different
    scales (an all-zero super-block, ties, levels on .5)."""
    rng = np.random.default_rng(int(t))
    qw = rng.uniform(0.0, 4.0, N_IN).astype(np.float32)
    qw[::13] = 0.0
    w = quant.get(t).quantize(sample_weights(n_out, N_IN, seed=int(t) + n_out),
                              imatrix=qw if imatrix else None)
    return w, activations(33, N_IN, seed=int(t))


@pytest.mark.parametrize("n_out", [16, 20])
@pytest.mark.parametrize("t", IQ_TYPES, ids=lambda t: t.name)
def test_iq_products_are_ggmls_bits(t, n_out):
    _int_path(t)
    w, x = _case(t, n_out)
    for n in (1, 3, 7, 8, 9, 33):  # decode, vec_dot tiles, the tiled kernel's first and more
        ref = ggml_mul_mat(t, w, x[:n])
        for threads in (1, 2):
            got = matmul(w, t, x[:n], threads=threads)
            np.testing.assert_array_equal(got, ref, err_msg=f"{t.name} n={n} t={threads}")
    # the two orders differ here, so the products above took the tiled one where ggml did
    assert not np.array_equal(ggml_mul_mat(t, w, x), ggml_cpu_matmul(t, w, x)), \
        "ggml's mul_mat summed as vec_dot: was it run with GGML_CPU_TILED_MM=0?"


@pytest.mark.parametrize("t", IQ_TYPES, ids=lambda t: t.name)
def test_iq_products_in_vec_dot_order(t, monkeypatch):
    _int_path(t)
    monkeypatch.setattr(kernels, "PROMPT_TILED", False)
    # without an importance matrix where the type quantizes without one
    w, x = _case(t, 20, imatrix=quant.get(t).requires_imatrix)
    ref = ggml_cpu_matmul(t, w, x)
    for n in (1, 3, 33):
        for threads in (1, 2):
            got = matmul(w, t, x[:n], threads=threads)
            np.testing.assert_array_equal(got, ref[:n], err_msg=f"{t.name} n={n} t={threads}")


@pytest.mark.parametrize("t", [GGMLType.TQ1_0, GGMLType.TQ2_0], ids=lambda t: t.name)
def test_ternary_products_are_ggmls_bits(t):
    """TQ1_0 and TQ2_0 as ggml's AVX2 `vec_dot_tq{1,2}_0_q8_K`: levels 0..2 dotted with
    Q8_K's, less Q8_K's sums of 16, one conversion and FMA by d * dx a super-block. llama.cpp's
    tiled kernel does not take them: every token count sums in that order."""
    _int_path(t)
    w = quant.get(t).quantize(sample_weights(20, N_IN, seed=int(t)))
    x = activations(33, N_IN, seed=int(t))
    for n in (1, 3, 8, 9, 33):
        ref = ggml_mul_mat(t, w, x[:n])
        for threads in (1, 2):
            got = matmul(w, t, x[:n], threads=threads)
            np.testing.assert_array_equal(got, ref, err_msg=f"{t.name} n={n} t={threads}")
    np.testing.assert_array_equal(matmul(w, t, x), ggml_cpu_matmul(t, w, x))
