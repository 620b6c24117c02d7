"""Attention as llama.cpp's CPU computes it (issue #16).

- The compiled kernel (runner/attention.py) against ggml's own `flash_attn_ext`, run on the
  CPU backend of the oracle build through ctypes: bit for bit, on both of ggml's routes
  (fewer than 64 queries: fp16 V accumulator; 64 or more: f32 tiles), with GQA, a causal
  mask, a sliding window, a softcap and a head size that leaves leftovers.
- The kernel against a plain numpy emulation of ggml's loops (online softmax, fp16 V).
- The same on a real layer of SmolLM2: the q, k, v a forward pass hands to the kernel.
- `Model.attention` with -fa off as llama.cpp's non-FA graph, and the -fa setting.
- Perplexity of SmolLM2 Q8_0 against llama-perplexity -fa on and -fa off.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import replace

import numpy as np
import pytest
from ggml_oracle import llama_quantize
from llama_tools import llama_tool, run_tool

from gguflab.catalog import default_eval_text
from gguflab.cli import build_parser
from gguflab.errors import UserError
from gguflab.runner import attention as A
from gguflab.runner import model as model_mod
from gguflab.runner.attention import TILED, VEC, flash_attn
from gguflab.runner.model import Model, flash_attn_mode
from gguflab.runner.perplexity import perplexity
from gguflab.runner.tokenizer import Tokenizer

# -- ggml's flash_attn_ext, called in the oracle build's CPU backend ------------------------


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p),
                ("no_alloc", ctypes.c_bool)]


_LIBS: list = []


def _ggml():
    if not _LIBS:
        folder = llama_tool("llama-perplexity").parent
        base = ctypes.CDLL(str(folder / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
        cpu = ctypes.CDLL(str(folder / "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
        P, I64 = ctypes.c_void_p, ctypes.c_int64
        for name, res, args in [
            ("ggml_init", P, [_InitParams]),
            ("ggml_new_tensor_4d", P, [P, ctypes.c_int, I64, I64, I64, I64]),
            ("ggml_get_data", P, [P]),
            ("ggml_flash_attn_ext", P, [P, P, P, P, P] + [ctypes.c_float] * 3),
            ("ggml_new_graph", P, [P]),
            ("ggml_build_forward_expand", None, [P, P]),
            ("ggml_free", None, [P]),
        ]:
            fn = getattr(base, name)
            fn.restype, fn.argtypes = res, args
        cpu.ggml_graph_compute_with_ctx.argtypes = [P, P, ctypes.c_int]
        cpu.ggml_cpu_init()
        _LIBS[:] = [base, cpu]
    return _LIBS


def graph_result(ctx, out, shape: tuple[int, ...], threads: int = 2) -> np.ndarray:
    """The graph ending at tensor `out` of context `ctx`, computed by ggml's CPU backend on
    `threads` threads: its data as float32 of `shape`."""
    base, cpu = _ggml()
    graph = base.ggml_new_graph(ctx)
    base.ggml_build_forward_expand(graph, out)
    cpu.ggml_graph_compute_with_ctx(ctx, graph, threads)
    res = np.empty(shape, np.float32)
    ctypes.memmove(res.ctypes.data, base.ggml_get_data(out), res.nbytes)
    return res


def ggml_flash_attn(q, k, v, p0, scale, softcap=0.0, n_swa=0, n_keys=None, threads=2):
    """ggml_flash_attn_ext on q (n, n_head, hd) at positions p0.., over k, v (n_kv, >= p0 + n,
    hd) taken as F16, with llama.cpp's causal (and sliding window) mask over `n_keys` cells
    (the cells past p0 + n are masked, as llama.cpp pads its cache view)."""
    base, cpu = _ggml()
    n, n_head, hd = q.shape
    n_kv, t = k.shape[0], p0 + n
    nk = n_keys or t
    ctx = base.ggml_init(_InitParams(64 << 20, None, False))
    try:
        tq = base.ggml_new_tensor_4d(ctx, 0, hd, n, n_head, 1)  # 0: F32, 1: F16
        tk = base.ggml_new_tensor_4d(ctx, 1, hd, nk, n_kv, 1)
        tv = base.ggml_new_tensor_4d(ctx, 1, hd, nk, n_kv, 1)
        tm = base.ggml_new_tensor_4d(ctx, 1, nk, n, 1, 1)

        def put(tensor, a):
            a = np.ascontiguousarray(a)
            ctypes.memmove(base.ggml_get_data(tensor), a.ctypes.data, a.nbytes)

        def cells(x):
            c = np.zeros((n_kv, nk, hd), np.float16)
            c[:, :t] = x[:, :t]
            return c

        put(tq, np.asarray(q, np.float32).transpose(1, 0, 2))
        put(tk, cells(k))
        put(tv, cells(v))
        pos, j = p0 + np.arange(n)[:, None], np.arange(nk)[None, :]
        masked = j > pos
        if n_swa:
            masked |= pos - j >= n_swa
        put(tm, np.where(masked, -np.inf, 0).astype(np.float16))
        out = base.ggml_flash_attn_ext(ctx, tq, tk, tv, tm, scale, 0.0, softcap)
        return graph_result(ctx, out, (n, n_head * hd), threads)
    finally:
        base.ggml_free(ctx)


# -- a plain numpy emulation of ggml's two loops --------------------------------------------


def f16(x):
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def emulate(q, k, v, p0, scale, softcap=0.0, n_swa=0, route=VEC):
    """ggml's flash attention, row by row in numpy (float order within a dot aside)."""
    n, n_head, hd = q.shape
    group = n_head // k.shape[0]
    out = np.zeros((n, n_head, hd), np.float32)
    sc = np.float32(scale / softcap) if softcap else np.float32(scale)

    def score(s):
        s = np.float32(s) * sc
        return np.float32(softcap) * np.tanh(s) if softcap else s

    for i in range(n):
        pos = p0 + i
        lo = max(0, pos - n_swa + 1) if n_swa else 0
        for h in range(n_head):
            K, V = k[h // group].astype(np.float32), v[h // group].astype(np.float32)
            M, S = np.float32(-np.inf), np.float32(0)
            acc = np.zeros(hd, np.float32)
            if route == VEC:
                qh = f16(q[i, h])
                for j in range(lo, pos + 1):
                    s = score(np.dot(K[j], qh))
                    if s > M:
                        ms, vs = np.exp(np.float32(M - s)), np.float32(1)
                        M = s
                        acc = f16(acc * ms)
                    else:
                        ms, vs = np.float32(1), np.exp(np.float32(s - M))
                    acc = f16(acc + V[j] * vs)  # the fp16 accumulator
                    S = S * ms + vs
            else:
                for ic in range(lo // A.TILE * A.TILE, pos + 1, A.TILE):
                    js = np.arange(max(ic, lo), min(ic + A.TILE - 1, pos) + 1)
                    s = score(K[js] @ q[i, h])
                    mnew = max(M, s.max())
                    if mnew > M:
                        ms = np.exp(np.float32(M - mnew))
                        acc, S = acc * ms, S * ms
                    M = mnew
                    p = np.exp(s - M)
                    S = np.float32(S + p.sum(dtype=np.float64))
                    acc = acc + p @ V[js]
            out[i, h] = acc / S if S else 0
    return out.reshape(n, n_head * hd)


def _inputs(rng, n, p0, n_head, n_kv, hd, spare=3):
    t = p0 + n
    q = (rng.standard_normal((n, n_head, hd)) * 2).astype(np.float32)
    k = rng.standard_normal((n_kv, t + spare, hd)).astype(np.float16)
    v = rng.standard_normal((n_kv, t + spare, hd)).astype(np.float16)
    return q, k, v


# (n queries, first position, n_swa, softcap, n_head, n_kv, head size)
SHAPES = [
    (5, 40, 0, 0.0, 6, 2, 64),  # generation-sized batch, GQA: the fp16 route
    (1, 90, 0, 0.0, 4, 1, 64),  # one token
    (3, 20, 8, 5.0, 4, 1, 80),  # sliding window, softcap, leftovers past 32 dims
    (70, 10, 0, 0.0, 6, 2, 64),  # a prompt: the f32 tiles, past one tile of keys
    (100, 30, 40, 0.0, 4, 4, 64),  # tiles with a sliding window
    (65, 0, 0, 7.0, 4, 2, 128),  # tiles with a softcap
    (2, 60, 0, 0.0, 4, 2, 36),  # a head size with a tail past whole vectors of 8
    (67, 90, 30, 0.0, 3, 1, 40),  # tiles: dims past whole blocks of 16, rows past blocks of 4
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n{}_p{}_swa{}_cap{}_h{}x{}_d{}".format(*s))
def test_kernel_is_ggml_flash_attn(shape):
    n, p0, n_swa, cap, n_head, n_kv, hd = shape
    q, k, v = _inputs(np.random.default_rng(n + p0), n, p0, n_head, n_kv, hd)
    ref = ggml_flash_attn(q, k, v, p0, 0.125, cap, n_swa, n_keys=p0 + n + 2)
    for cache in (np.float16, np.float32):  # the cache as fp16, or as f32 holding fp16
        ours = flash_attn(q, k.astype(cache), v.astype(cache), p0, 0.125, cap, n_swa)
        np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("n, p0", [(1, 300), (3, 300), (80, 200)])
def test_kernel_gives_the_same_bits_on_any_number_of_threads(n, p0):
    """The (head, query) rows are shared out among the threads; each is computed whole
    (below the 512 keys from which ggml splits one query's keys, see the next test)."""
    q, k, v = _inputs(np.random.default_rng(p0), n, p0, 9, 3, 64)
    one = flash_attn(q, k, v, p0, 0.125, threads=1)
    np.testing.assert_array_equal(flash_attn(q, k, v, p0, 0.125, threads=2), one)
    np.testing.assert_array_equal(flash_attn(q, k, v, p0, 0.125, threads=3), one)


# (position, cache cells, threads, n_swa, softcap): llama.cpp's view of the cache is padded
# to 256 cells, and from 512 on ggml splits a single query's keys, a range per thread
@pytest.mark.parametrize("p0, n_ctx, threads, n_swa, cap", [
    (299, 2048, 2, 0, 0.0),  # a view of 512: ranges of 256, the second mostly masked
    (700, 768, 3, 0, 0.0),  # three ranges, the view capped by the cache
    (1000, 4096, 2, 0, 30.0),  # softcap
    (900, 1024, 4, 128, 0.0),  # a sliding window: one range holds every key it sees
    (600, 1024, 4, 128, 0.0),  # ... two ranges do
    (200, 4096, 2, 0, 0.0),  # a view of 256: one pass
])
def test_one_query_over_many_keys_is_ggml_s_split(p0, n_ctx, threads, n_swa, cap):
    """Each range gives its max, sum and unscaled V; ggml combines them in range order with
    libm's expf and one FMA each (GCC's contraction). Not the one-pass bits: tested."""
    q, k, v = _inputs(np.random.default_rng(p0), 1, p0, 9, 3, 64, spare=n_ctx - p0 - 1)
    view = min(n_ctx, max(256, -(-(p0 + 1) // 256) * 256))
    ref = ggml_flash_attn(q, k, v, p0, 0.125, cap, n_swa, n_keys=view, threads=threads)
    ours = flash_attn(q, k, v, p0, 0.125, cap, n_swa, threads=threads)
    np.testing.assert_array_equal(ours, ref)
    one_pass = flash_attn(q, k, v, p0, 0.125, cap, n_swa, route=VEC, threads=threads)
    size, lo = -(-view // threads), max(0, p0 - n_swa + 1) if n_swa else 0
    assert np.array_equal(one_pass, ours) == (view < 512 or p0 // size == lo // size)


@pytest.mark.parametrize("route", [VEC, TILED])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[4]])
def test_kernel_matches_numpy_emulation(shape, route):
    n, p0, n_swa, cap, n_head, n_kv, hd = shape
    q, k, v = _inputs(np.random.default_rng(7), n, p0, n_head, n_kv, hd)
    ours = flash_attn(q, k, v, p0, 0.125, cap, n_swa, route=route)
    ref = emulate(q, k, v, p0, 0.125, cap, n_swa, route)
    # fp16 accumulator: another expf or dot order may round one step a half-ulp apart
    tol = 2e-3 if route == VEC else 2e-6
    np.testing.assert_allclose(ours, ref, rtol=0, atol=tol)
    if route == VEC:  # the fp16 accumulation shows: far from an f32 softmax
        f32 = emulate(q, k, v, p0, 0.125, cap, n_swa, TILED)
        assert np.abs(ours - f32).max() > 10 * np.abs(
            flash_attn(q, k, v, p0, 0.125, cap, n_swa, route=TILED) - f32).max()


def test_kernel_refuses_bad_shapes():
    q, k, v = _inputs(np.random.default_rng(0), 4, 0, 6, 4, 64)
    with pytest.raises(UserError, match="share"):
        flash_attn(q, k, v, 0, 0.125)  # 6 heads over 4 kv heads
    q, k, v = _inputs(np.random.default_rng(0), 4, 0, 4, 2, 64, spare=0)
    with pytest.raises(UserError, match="outside the cache"):
        flash_attn(q, k, v, 1, 0.125)


# -- on SmolLM2 ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_q8(module_tmp, smollm2):
    out = module_tmp("attention") / "smol-q8_0.gguf"
    llama_quantize(smollm2, str(out), 7, allow_requantize=True)  # 7 = MOSTLY_Q8_0
    return out


@pytest.mark.parametrize("n", [70, 9])
def test_model_layer_is_ggml_flash_attn(smol_q8, monkeypatch, n):
    """The q, k, v of a real forward pass (prompt, then a few tokens on top) through the
    kernel, against ggml's flash attention on the same values."""
    m = Model(smol_q8)
    seen = []

    def spy(q, k, v, p0, *args):
        out = flash_attn(q, k, v, p0, *args)
        if len(seen) < 2:
            seen.append((q.copy(), k[:, :p0 + len(q)].copy(), v[:, :p0 + len(q)].copy(), p0,
                         args, out))
        return out

    monkeypatch.setattr(model_mod, "flash_attn", spy)
    cache = m.new_cache(128)
    ids = list(range(100, 100 + 70))
    m.forward(ids, cache)
    if n < 70:
        seen.clear()
        m.forward(ids[:n], cache)
    for q, k, v, p0, (scale, cap, n_swa, *_), out in seen:
        np.testing.assert_array_equal(out, ggml_flash_attn(q, k, v, p0, scale, cap, n_swa))


def ggml_attention_no_fa(q, k, v, p0, scale, view, softcap=0.0, threads=2):
    """llama.cpp's attention graph without flash attention on q (n, n_head, hd) at
    positions p0.. over k, v (n_kv, >= view, hd; fp16 values): K a view of the cache (a row
    per cell, all heads), V transposed, KQ = mul_mat(K, q), the soft cap as scale, tanh,
    scale, soft_max_ext with the causal mask over `view` cells, then mul_mat(V, KQ)."""
    base, cpu = _ggml()
    P, I = ctypes.c_void_p, ctypes.c_int
    for name, res, args in [("ggml_mul_mat", P, [P, P, P]), ("ggml_cont", P, [P, P]),
                            ("ggml_soft_max_ext", P, [P, P, P, ctypes.c_float, ctypes.c_float]),
                            ("ggml_permute", P, [P, P, I, I, I, I]), ("ggml_tanh", P, [P, P]),
                            ("ggml_scale", P, [P, P, ctypes.c_float])]:
        fn = getattr(base, name)
        fn.restype, fn.argtypes = res, args
    n, n_head, hd = q.shape
    n_kv = k.shape[0]
    ctx = base.ggml_init(_InitParams(256 << 20, None, False))
    try:
        tq = base.ggml_new_tensor_4d(ctx, 0, hd, n_head, n, 1)
        tk = base.ggml_new_tensor_4d(ctx, 1, hd, n_kv, view, 1)
        tv = base.ggml_new_tensor_4d(ctx, 1, view, hd, n_kv, 1)
        tm = base.ggml_new_tensor_4d(ctx, 1, view, n, 1, 1)

        def put(tensor, a):
            a = np.ascontiguousarray(a)
            ctypes.memmove(base.ggml_get_data(tensor), a.ctypes.data, a.nbytes)

        put(tq, np.asarray(q, np.float32))
        put(tk, k[:, :view].transpose(1, 0, 2).astype(np.float16))
        put(tv, v[:, :view].transpose(0, 2, 1).astype(np.float16))
        pos, j = p0 + np.arange(n)[:, None], np.arange(view)[None, :]
        put(tm, np.where(j > pos, -np.inf, 0).astype(np.float16))
        kq = base.ggml_mul_mat(ctx, base.ggml_permute(ctx, tk, 0, 2, 1, 3),
                               base.ggml_permute(ctx, tq, 0, 2, 1, 3))
        if softcap:
            kq = base.ggml_scale(ctx, kq, np.float32(1) / np.float32(softcap))
            kq = base.ggml_scale(ctx, base.ggml_tanh(ctx, kq), softcap)
        kq = base.ggml_soft_max_ext(ctx, kq, tm, scale, 0.0)
        out = base.ggml_cont(ctx, base.ggml_permute(ctx, base.ggml_mul_mat(ctx, tv, kq),
                                                    0, 2, 1, 3))
        return graph_result(ctx, out, (n, n_head * hd), threads)
    finally:
        base.ggml_free(ctx)


# (queries, first position, cache cells, softcap): views of 256 (padded) and 512 cells, a
# view capped by the cache, one query, and Gemma 2's soft cap
@pytest.mark.parametrize("n, p0, n_ctx, cap", [(128, 0, 512, 0.0), (128, 384, 512, 0.0),
                                               (1, 300, 2048, 0.0), (32, 64, 128, 0.0),
                                               (7, 3, 512, 50.0)])
def test_model_without_flash_attn_is_llama_s_graph(smol_q8, n, p0, n_ctx, cap):
    """-fa off: the F16 products over llama.cpp's padded view of the cache, its softmax
    and soft cap, bit for bit."""
    m = Model(smol_q8)
    hp = m.hp = replace(m.hp, attn_softcap=cap)
    q, k, v = _inputs(np.random.default_rng(n + p0), n, p0, hp.n_head, hp.n_head_kv,
                      hp.head_dim, spare=n_ctx - p0 - n)
    k, v = k.astype(np.float32), v.astype(np.float32)  # as the cache holds them
    view = min(n_ctx, max(256, -(-(p0 + n) // 256) * 256))
    ours = m._attention_no_fa(q, np.arange(p0, p0 + n), k, v, False)
    np.testing.assert_array_equal(
        ours, ggml_attention_no_fa(q, k, v, p0, hp.q_scale, view, cap))
    if not cap:  # the two settings differ as llama.cpp's two graphs do: by float noise only
        # (with a soft cap they differ by design unless the scale is 1: the non-FA graph
        # caps KQ before its scale, flash attention after)
        fa = flash_attn(q, k, v, p0, hp.q_scale)
        assert 0 < np.abs(fa - ours).max() < 0.05


def test_flash_attn_setting():
    assert build_parser().parse_args(["perplexity"]).flash_attn == "auto"
    assert build_parser().parse_args(["run", "-fa", "off"]).flash_attn == "off"
    assert Model.flash_attn == "auto"
    assert flash_attn_mode("on") == "on"
    with pytest.raises(UserError, match="on, off or auto"):
        flash_attn_mode("yes")


# gguflab's perplexity next to llama-perplexity's, with flash attention on and off: each
# the same function as llama.cpp's, so the same figure to every printed digit (llama.cpp's
# own -fa on and off are 1.8% apart on this text, -c 128, 4 chunks).
N_CTX, CHUNKS = 128, 4


def _llama_ppl(path, fa: str) -> float:
    out = run_tool("llama-perplexity", "-m", path, "-f", default_eval_text(), "-c", N_CTX,
                   "--chunks", CHUNKS, "-t", 2, "-fa", fa)
    return float(re.search(r"Final estimate: PPL = ([\d.]+)", out)[1])


def test_perplexity_is_llama_perplexity_s(smol_q8):
    m = Model(smol_q8)
    tok = Tokenizer.from_gguf(m.reader)
    with open(default_eval_text(), encoding="utf-8") as f:
        ids = tok.encode(f.read(), add_special=True)
    ref = {fa: _llama_ppl(smol_q8, fa) for fa in ("on", "off")}
    spread = abs(ref["on"] - ref["off"]) / ref["off"]
    for fa in ("on", "off"):
        m.flash_attn = fa
        ours = perplexity(m, ids, N_CTX, add_bos=tok.add_bos, bos_id=tok.bos_id,
                          n_chunks=CHUNKS).ppl
        print(f"-fa {fa}: ours {ours:.4f} llama.cpp {ref[fa]:.4f} "
              f"({100 * (ours / ref[fa] - 1):+.2f}%; llama.cpp on/off spread "
              f"{100 * spread:.2f}%)")
        assert f"{ours:.4f}" == f"{ref[fa]:.4f}", (fa, ours, ref)
    assert spread > 0.01  # and the two settings are far apart: the test tells them apart
