"""F16 / BF16 / F32: kernels against the reference, the reference against ggml."""

from __future__ import annotations

import numpy as np
import pytest
from ggml_oracle import ggml_dequantize, ggml_quantize, sample_weights

from gguflab import quant
from gguflab.gguf import GGMLType


def _inputs() -> np.ndarray:
    x = sample_weights(16, 256, seed=3)
    specials = np.array([np.inf, -np.inf, np.nan, -np.nan, 0.0, -0.0, 1e-45, 3.4e38,
                         65504, 65520, 1e-8] * 2 + [0.5] * 10, np.float32)
    nan_payload = np.array([0x7FC12345, 0xFF812345, 0x7F800001], np.uint32).view(np.float32)
    x[0, : len(specials)] = specials
    x[0, 40:43] = nan_payload
    return x


@pytest.mark.parametrize("t", [GGMLType.F16, GGMLType.BF16])
def test_matches_ggml_bits(t):
    x = _inputs()
    want = ggml_quantize(t, x)
    qt = quant.get(t)
    with np.errstate(over="ignore", invalid="ignore"):
        assert np.array_equal(qt.quantize(x, reference=True), want)
    assert np.array_equal(qt.quantize(x), want)
    back = ggml_dequantize(t, want, x.shape[1])
    for ref in (True, False):
        got = qt.dequantize(want, reference=ref)
        assert np.array_equal(got.view(np.uint32), back.view(np.uint32))


def test_f32_is_identity():
    x = _inputs()
    qt = quant.get(GGMLType.F32)
    assert np.array_equal(qt.quantize(x).view(np.float32).view(np.uint32), x.view(np.uint32))
    assert np.array_equal(qt.dequantize(qt.quantize(x)).view(np.uint32), x.view(np.uint32))


def test_threads_give_the_same_bytes():
    x = np.random.default_rng(0).standard_normal((64, 4096)).astype(np.float32)
    qt = quant.get(GGMLType.BF16)
    assert np.array_equal(qt.quantize(x, threads=1), qt.quantize(x, threads=2))


def test_unknown_type_is_a_user_error():
    from gguflab.errors import UserError

    with pytest.raises(UserError, match="IQ2_XXS is not supported"):
        quant.get(GGMLType.IQ2_XXS)
