"""The K-quant products are ggml's own function, bit for bit, in both of the orders llama.cpp's
CPU backend sums them in: below 8 tokens each (row, token) sums its super-blocks as ggml's
AVX2 `vec_dot_<t>_q8_K` does (integer lanes per super-block, the mins through Q8_K's sums of
16, one float conversion and FMA a super-block, ggml's horizontal sums); from 8 tokens on, as
its tiled kernel does (`ggml-cpu/tiled/`, on by default: per super-block d * float(s1) less
dmin * float(s2) in one FMA, then one FMA by the token's scale). Either way whatever the tile
a token falls in and the thread that runs its rows; with `kernels.PROMPT_TILED` off, every
token count in vec_dot's order (llama.cpp's GGML_CPU_TILED_MM=0)."""

from __future__ import annotations

import numpy as np
import pytest
from ggml_oracle import ggml_cpu_matmul, sample_weights
from ggml_repack import ggml_repacked_matmul
from test_runner_activations import activations
from test_runner_float_products import ggml_mul_mat

from gguflab import quant
from gguflab.gguf import GGMLType
from gguflab.gguf.reader import GGUFReader
from gguflab.runner import kernels, repack
from gguflab.runner.kernels import matmul

K_TYPES = (GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K)


def _int_path(t: GGMLType) -> None:
    if not kernels.quantizes_activations(t):  # the integer kernels are x86 AVX2 only
        pytest.skip(f"{t.name} products run on floats on this host")


def _assert_bits(t: GGMLType, w: np.ndarray, x: np.ndarray) -> None:
    """Every token count (1: decoding; 7: the last below the tiled kernel; 8, 9, 33: a whole
    token tile, one more, and a prompt with a remainder) equals ggml's mul_mat, on 1 and 2
    threads: ggml's repacked mul_mat for a weight llama.cpp repacks (Q4_K, rows % 8 == 0)."""
    for n in (1, 7, 8, 9, 33):
        ref = (ggml_repacked_matmul(t, w, x[:n]) if repack.repacked(t, w.shape[0])
               else ggml_mul_mat(t, w, x[:n]))
        for threads in (1, 2):
            got = matmul(w, t, x[:n], threads=threads)
            np.testing.assert_array_equal(got, ref, err_msg=f"{t.name} n={n} t={threads}")


def _assert_vec_dot_bits(t: GGMLType, w: np.ndarray, x: np.ndarray, monkeypatch) -> None:
    """With the tiled order off, every token count equals ggml's `vec_dot`, called a dot
    product at a time (the order llama.cpp's GGML_CPU_TILED_MM=0 gives)."""
    monkeypatch.setattr(kernels, "PROMPT_TILED", False)
    ref = ggml_cpu_matmul(t, w, x)
    for n in (1, 3, 37):  # one token (decode), a few (one tile), a prompt with a remainder
        # a weight llama.cpp repacks (Q4_K, rows % 8 == 0) sums in its repacked kernels'
        # order, which depends on n (test_runner_repack.py)
        want = (ggml_repacked_matmul(t, w, x[:n]) if repack.repacked(t, w.shape[0])
                else ref[:n])
        for threads in (1, 2):
            got = matmul(w, t, x[:n], threads=threads)
            np.testing.assert_array_equal(got, want, err_msg=f"{t.name} n={n} t={threads}")


def _random_case(t: GGMLType) -> tuple[np.ndarray, np.ndarray]:
    """Edge-case weights (zero, constant, tiny, huge, one-signed rows) and activations of
    very different scales, over 4 super-blocks a row; 45 rows (ggml's tiles take 16)."""
    n_in, n_out = 1024, 45
    w = quant.get(t).quantize(sample_weights(n_out, n_in, seed=int(t)))
    return w, activations(37, n_in, seed=int(t))


@pytest.mark.parametrize("t", K_TYPES, ids=lambda t: t.name)
def test_k_products_are_ggmls_bits_on_random_data(t):
    _int_path(t)
    w, x = _random_case(t)
    _assert_bits(t, w, x)
    # the two orders differ here, so the products above took the tiled one where ggml did
    assert not np.array_equal(ggml_mul_mat(t, w, x[:33]), ggml_cpu_matmul(t, w, x[:33])), \
        "ggml's mul_mat summed as vec_dot: was it run with GGML_CPU_TILED_MM=0?"


@pytest.mark.parametrize("t", K_TYPES, ids=lambda t: t.name)
def test_k_products_in_vec_dot_order_on_random_data(t, monkeypatch):
    _int_path(t)
    _assert_vec_dot_bits(t, *_random_case(t), monkeypatch)


@pytest.fixture(scope="module")
def smollm2_ffn(smollm2):
    """SmolLM2's first FFN as the down product sees it: its down weight (1536 -> 576) and
    the SwiGLU of its gate and up over normed token embeddings."""
    r = GGUFReader(smollm2)
    t = {x.name: x for x in r.tensors}

    def rows(name):
        x = t[name]
        return quant.get(x.type).dequantize(np.asarray(x.raw)).reshape(x.shape)

    h = rows("token_embd.weight")[np.arange(100, 137) * 97]
    h = h / np.sqrt((h * h).mean(-1, keepdims=True) + 1e-5)
    g, u = h @ rows("blk.0.ffn_gate.weight").T, h @ rows("blk.0.ffn_up.weight").T
    x = (g / (1 + np.exp(-g)) * u).astype(np.float32)
    return rows("blk.0.ffn_down.weight").astype(np.float32), x


@pytest.mark.parametrize("t", K_TYPES, ids=lambda t: t.name)
def test_k_products_are_ggmls_bits_on_smollm2(t, smollm2_ffn):
    _int_path(t)
    wf, x = smollm2_ffn
    _assert_bits(t, quant.get(t).quantize(wf), x)


@pytest.mark.parametrize("t", K_TYPES, ids=lambda t: t.name)
def test_k_products_in_vec_dot_order_on_smollm2(t, smollm2_ffn, monkeypatch):
    _int_path(t)
    wf, x = smollm2_ffn
    _assert_vec_dot_bits(t, quant.get(t).quantize(wf), x, monkeypatch)
