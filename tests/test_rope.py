"""RoPE against ggml's own rope op (ggml_rope_ext in a ggml graph on the CPU backend): the
rotated q and k are ggml's bits for every setting the runner's families use."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from test_attention import _ggml, _InitParams

from gguflab.runner.model import Model
from gguflab.runner.rope import RopeParams, rope, rope_rotate, rope_table

P, F = ctypes.c_void_p, ctypes.c_float
GGML_I32 = 26


def ggml_rope(x: np.ndarray, pos: np.ndarray, p: RopeParams) -> np.ndarray:
    """ggml_rope_ext on x (n_tok, n_head, head_dim) at positions `pos`, computed by ggml."""
    base, cpu = _ggml()
    n, n_head, hd = x.shape
    ctx = base.ggml_init(_InitParams(64 << 20, None, False))

    def tensor(a: np.ndarray, type_: int, *ne: int):
        t = base.ggml_new_tensor_4d(ctx, type_, *ne, *[1] * (4 - len(ne)))
        ctypes.memmove(base.ggml_get_data(t), a.ctypes.data, a.nbytes)
        return t

    try:
        xt = tensor(np.ascontiguousarray(x, np.float32), 0, hd, n_head, n)
        pt = tensor(np.ascontiguousarray(pos, np.int32), GGML_I32, n)
        ft = None if p.factors is None else tensor(np.array(p.factors, np.float32), 0,
                                                   len(p.factors))
        base.ggml_rope_ext.restype = P
        base.ggml_rope_ext.argtypes = [P, P, P, P] + [ctypes.c_int] * 3 + [F] * 6
        out = base.ggml_rope_ext(ctx, xt, pt, ft, p.n_dims, 2 if p.neox else 0, p.n_ctx_orig,
                                 p.freq_base, p.freq_scale, p.ext_factor, p.attn_factor,
                                 p.beta_fast, p.beta_slow)
        graph = base.ggml_new_graph(ctx)
        base.ggml_build_forward_expand(graph, out)
        cpu.ggml_graph_compute_with_ctx(ctx, graph, 2)
        res = np.empty(x.shape, np.float32)
        ctypes.memmove(res.ctypes.data, base.ggml_get_data(out), res.nbytes)
        return res
    finally:
        base.ggml_free(ctx)


_FACTORS = tuple(np.random.default_rng(3).uniform(1, 8, 32).astype(np.float32).tolist())

SETTINGS = {
    # SmolLM2 (llama): adjacent pairs over the whole head
    "llama": RopeParams(64, False, 100000.0),
    # qwen2/qwen3: the two halves of the head
    "neox": RopeParams(64, True, 1000000.0),
    # a rotary dim short of the head (the rest passes through)
    "neox-partial": RopeParams(32, True, 10000.0),
    # LLaMA 3.1's rope_freqs (and LongRoPE's factors): each pair's angle divided
    "freq-factors": RopeParams(64, False, 500000.0, factors=_FACTORS),
    # linear scaling (Gemma 3's global layers)
    "linear": RopeParams(64, True, 1000000.0, freq_scale=0.125),
    # YaRN as the runner passes it: ramps inside the head, and past its end
    "yarn": RopeParams(64, True, 1000000.0, freq_scale=0.25, ext_factor=1.0,
                       attn_factor=0.8, n_ctx_orig=16),
    "yarn-long": RopeParams(128, True, 1000000.0, freq_scale=0.25, ext_factor=1.0,
                            attn_factor=0.8, n_ctx_orig=32768),
}


@pytest.mark.parametrize("name", SETTINGS)
@pytest.mark.parametrize("p0, n, n_head", [(0, 512, 9), (0, 512, 3), (4000, 37, 9)])
def test_rope_is_ggmls(name, p0, n, n_head):
    p = SETTINGS[name]
    rng = np.random.default_rng(p0 + n_head)
    x = (rng.standard_normal((n, n_head, max(64, p.n_dims))) * 4).astype(np.float32)
    pos = np.arange(p0, p0 + n)
    np.testing.assert_array_equal(rope(x, pos, p), ggml_rope(x, pos, p))


def test_model_rope_is_ggmls_with_llama_cpps_arguments(smollm2):
    """The embedded SmolLM2: the arguments llama.cpp gives ggml_rope_ext for it (the file's
    base, no scaling, its training context), and q's and k's heads rotated to ggml's bits,
    batch after batch (the table is kept between layers)."""
    m = Model(smollm2)
    hp = m.hp
    p = m.rope_params(2048)
    assert p == RopeParams(hp.rope_dim, False, hp.rope_base, n_ctx_orig=hp.n_ctx_train)
    rng = np.random.default_rng(7)
    for p0, n in [(0, 128), (128, 128), (2000, 48)]:
        pos = np.arange(p0, p0 + n)
        for n_head in (hp.n_head, hp.n_head_kv):
            x = rng.standard_normal((n, n_head, hp.head_dim)).astype(np.float32)
            np.testing.assert_array_equal(m.rope(x, pos, False, 2048), ggml_rope(x, pos, p))


def test_rope_table_and_rotation_check_their_shapes():
    p = RopeParams(8, False, 10000.0)
    table = rope_table(p, np.arange(3))
    assert table.shape == (3, 8)
    with pytest.raises(ValueError, match="RoPE table"):
        rope_rotate(np.zeros((4, 2, 8), np.float32), table, 8, False)
    with pytest.raises(ValueError, match="even"):
        rope_table(RopeParams(7, False, 10000.0), np.arange(3))
    with pytest.raises(ValueError, match="factors for 3 pairs"):
        rope_table(RopeParams(8, False, 10000.0, factors=(1.0, 2.0, 3.0)), np.arange(3))
