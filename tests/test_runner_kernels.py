"""gguflab.runner.kernels: x @ W.T over quantized weights against numpy on the dequantized
weight (float64), for every supported type."""

from __future__ import annotations

import numpy as np
import pytest

from gguflab import quant
from gguflab.errors import UserError
from gguflab.gguf import GGMLType
from gguflab.runner import kernels
from gguflab.runner.kernels import SUPPORTED_TYPES, get_rows, matmul

N_IN = 768  # 3 super-blocks, 24 legacy blocks
TOL = 1e-5


def make_weight(t: GGMLType, n_out: int, n_in: int = N_IN, seed: int = 0) -> np.ndarray:
    """The weight as a GGUF reader hands it over: raw bytes, or a float array."""
    rng = np.random.default_rng(seed)
    wf = (rng.standard_normal((n_out, n_in)) * rng.uniform(0.1, 2.0, (n_out, 1))).astype(np.float32)
    if t == GGMLType.F32:
        return wf
    if t == GGMLType.F16:
        return wf.astype(np.float16)
    qt = quant.get(t)
    # the i-quants llama.cpp refuses to make without an importance matrix get one
    imatrix = rng.uniform(0.1, 2.0, n_in).astype(np.float32) if qt.requires_imatrix else None
    q = qt.quantize(wf, imatrix=imatrix)
    return q.view(np.uint16) if t == GGMLType.BF16 else q


def dequantized(t: GGMLType, w: np.ndarray) -> np.ndarray:
    n_out = w.shape[0]
    return quant.get(t).dequantize(np.ascontiguousarray(w).view(np.uint8)).reshape(n_out, -1)


def expected(t: GGMLType, x: np.ndarray, wd: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The product in float64 as the kernels define it: x rounded to the weight type's
    activation type, as llama.cpp's CPU backend rounds it (pinned against ggml in
    test_runner_activations), times the dequantized weight. Where that is Q8_1 (Q4_1, Q5_1),
    each block's offset m meets llama.cpp's fp16 group sum s = fp16(d * sum(q)) rather than
    the exact one."""
    act = quant.get(t).activation_type
    ref = kernels.round_activations(x, act).astype(np.float64) @ wd.astype(np.float64).T
    if act == GGMLType.Q8_1:
        n, ng = x.shape[-1], x.shape[-1] // 32
        xq = kernels.round_q8(x, act)
        levels = xq[:, :n].view(np.int8).reshape(len(x), ng, 32).sum(-1)
        s = xq[:, n + 4 * ng:].view(np.float32).astype(np.float64)
        dx = xq[:, n:n + 4 * ng].view(np.float32).astype(np.float64)
        blocks = np.ascontiguousarray(w).view(np.uint8).reshape(w.shape[0], ng, -1)
        m = blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
        ref += (s - dx * levels) @ m.T
    return ref


def check_close(y: np.ndarray, t: GGMLType, x: np.ndarray, wd: np.ndarray,
                w: np.ndarray) -> float:
    x = np.atleast_2d(x)
    ref = expected(t, x, wd, w)
    scale = np.maximum(np.abs(x.astype(np.float64)) @ np.abs(wd.astype(np.float64)).T, 1e-30)
    err = float((np.abs(y.astype(np.float64) - ref) / scale).max())
    assert err < TOL, err
    return err


@pytest.fixture(scope="module", params=SUPPORTED_TYPES, ids=lambda t: t.name)
def case(request):
    t = request.param
    n_out = 97 + 17 * SUPPORTED_TYPES.index(t)  # 97..301: odd and even row counts
    w = make_weight(t, n_out, seed=int(t))
    return t, w, dequantized(t, w)


@pytest.mark.parametrize("n_tok", [1, 3, 17])  # decode kernel, 4-token decode kernel, prompt
def test_matches_dequantized_reference(case, n_tok):
    t, w, wd = case
    x = np.random.default_rng(n_tok).standard_normal((n_tok, N_IN)).astype(np.float32)
    y = matmul(w, t, x)
    assert y.shape == (n_tok, w.shape[0]) and y.dtype == np.float32
    check_close(y, t, x, wd, w)


def test_integer_dot_products_on_x86():
    """On an AVX2 host the products of the common llama.cpp types run on integer dot
    products over rounded activations; their error against the float product is that
    rounding's, not more."""
    from gguflab.jit import host_cpu

    if not host_cpu().has("avx2"):
        pytest.skip("integer dot products are x86 AVX2 only")
    for t in (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0,
              GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K):
        assert kernels.quantizes_activations(t)
        w = make_weight(t, 40, seed=1)
        x = np.random.default_rng(2).standard_normal((1, N_IN)).astype(np.float32)
        y = matmul(w, t, x)
        wd = dequantized(t, w)
        check_close(y, t, x, wd, w)
        scale = np.abs(x) @ np.abs(wd).T
        assert (np.abs(y - x @ wd.T) < 0.01 * scale).all()
    assert not kernels.quantizes_activations(GGMLType.F16)


@pytest.mark.parametrize("n_tok", [1, 2, 17])
def test_threads_agree(case, n_tok, monkeypatch):
    t, w, _ = case
    monkeypatch.setattr(kernels, "MIN_WORK_PER_THREAD", 1)  # split even these small products
    monkeypatch.setattr(kernels, "MIN_WORK_PER_PART", 1)
    x = np.random.default_rng(7).standard_normal((n_tok, N_IN)).astype(np.float32)
    y1 = matmul(w, t, x, threads=1)
    y2 = matmul(w, t, x, threads=2)
    # each row is computed the same way whatever part of the split it falls in: same bits
    np.testing.assert_array_equal(y1.view(np.uint32), y2.view(np.uint32))


def test_out_and_1d(case):
    t, w, wd = case
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, N_IN)).astype(np.float32)
    out = np.full((5, w.shape[0]), np.nan, np.float32)
    assert matmul(w, t, x, out=out) is out
    check_close(out, t, x, wd, w)
    v = x[2]
    y = matmul(w, t, v)
    assert y.shape == (w.shape[0],)
    check_close(y[None], t, v, wd, w)
    out1 = np.empty(w.shape[0], np.float32)
    assert matmul(w, t, v, out=out1) is out1
    np.testing.assert_array_equal(out1, y)
    # x of another dtype or layout is converted
    np.testing.assert_array_equal(matmul(w, t, np.asfortranarray(x.astype(np.float64))), out)


@pytest.mark.parametrize("n_tok", [1, 3, 9])
def test_matmuls_is_matmul_of_each(n_tok):
    """The products posted together (a layer's Q, K, V) give what each gives alone."""
    types = (GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.F16, GGMLType.Q5_K)
    ws = [(make_weight(t, 40 + 8 * i, seed=i), t) for i, t in enumerate(types)]
    x = np.random.default_rng(4).standard_normal((n_tok, N_IN)).astype(np.float32)
    for y, (w, t) in zip(kernels.matmuls(ws, x), ws, strict=True):
        np.testing.assert_array_equal(y, matmul(w, t, x))


def test_concurrent_callers_get_their_own_results():
    """Two Python threads decoding at once: one gets the team, the other runs alone."""
    import threading

    t = GGMLType.Q4_K
    w = make_weight(t, 300)
    xs = np.random.default_rng(6).standard_normal((2, 50, N_IN)).astype(np.float32)
    want = [[matmul(w, t, x) for x in xs[k]] for k in range(2)]
    got = [[], []]

    def run(k):
        for x in xs[k]:
            got[k].append(matmul(w, t, x, threads=2))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for k in range(2):
        np.testing.assert_array_equal(np.array(got[k]), np.array(want[k]))


def test_decoding_after_the_team_fell_asleep(monkeypatch):
    """A worker that found nothing to do goes to sleep; the caller then runs the parts alone
    and wakes it: every result is still whole."""
    import time

    from gguflab.jit import parallel

    monkeypatch.setattr(parallel, "SPIN_LIMIT", 1)
    t = GGMLType.Q4_1
    w = make_weight(t, 256)
    x = np.random.default_rng(8).standard_normal((1, N_IN)).astype(np.float32)
    want = matmul(w, t, x, threads=1)
    for _ in range(20):
        np.testing.assert_array_equal(matmul(w, t, x, threads=2), want)
        time.sleep(0.002)


def test_get_rows_is_dequantize(case):
    t, w, wd = case
    ids = np.array([0, 5, w.shape[0] - 1, 5, 3])
    r = get_rows(w, t, ids)
    assert r.dtype == np.float32 and r.shape == (len(ids), N_IN)
    np.testing.assert_array_equal(r.view(np.uint32), wd[ids].view(np.uint32))


def test_weight_view_is_used_in_place():
    """A read-only zero-copy view (as from a memory map), with rows strided inside a larger
    buffer, works as it is."""
    t = GGMLType.Q4_K
    w = make_weight(t, 64)
    buf = np.zeros((64, w.shape[1] + 16), np.uint8)
    buf[:, 8:8 + w.shape[1]] = w
    buf.flags.writeable = False
    view = buf[:, 8:8 + w.shape[1]]
    x = np.random.default_rng(1).standard_normal((2, N_IN)).astype(np.float32)
    np.testing.assert_array_equal(matmul(view, t, x), matmul(w, t, x))


def test_float_weights_as_raw_bytes_and_odd_widths():
    rng = np.random.default_rng(2)
    for n_in in (96, 100):
        wf = rng.standard_normal((33, n_in)).astype(np.float32)
        x = rng.standard_normal((3, n_in)).astype(np.float32)
        for t, w in ((GGMLType.F32, wf), (GGMLType.F16, wf.astype(np.float16)),
                     (GGMLType.BF16, quant.get(GGMLType.BF16).quantize(wf).view(np.uint16))):
            wd = dequantized(t, w)
            check_close(matmul(w, t, x), t, x, wd, w)
            check_close(matmul(w.view(np.uint8), t, x), t, x, wd, w)
            check_close(matmul(w, t, x[0])[None], t, x[:1], wd, w)


def test_shapes_errors():
    t = GGMLType.Q4_0
    w = make_weight(t, 8, n_in=64)
    with pytest.raises(UserError, match="multiple of 32"):
        matmul(w, t, np.zeros((2, 48), np.float32))
    with pytest.raises(UserError, match="features"):
        matmul(w, t, np.zeros((2, 96), np.float32))
    with pytest.raises(UserError, match="whole blocks of 18 bytes"):
        matmul(w[:, :30], t, np.zeros(64, np.float32))
    with pytest.raises(UserError, match="whole blocks of 144 bytes"):
        matmul(np.zeros((4, 100), np.uint8), GGMLType.Q4_K, np.zeros(256, np.float32))
    with pytest.raises(UserError, match="uint8"):
        matmul(w.view(np.int8), t, np.zeros(64, np.float32))
    with pytest.raises(UserError, match="out must be"):
        matmul(w, t, np.zeros((2, 64), np.float32), out=np.zeros((8, 2), np.float32))
    with pytest.raises(UserError, match="not supported"):  # an activation-only type
        matmul(w, GGMLType.Q8_K, np.zeros(64, np.float32))
    with pytest.raises(UserError, match="out of range"):
        get_rows(w, t, np.array([8]))


def test_empty():
    t = GGMLType.Q8_0
    w = make_weight(t, 8, n_in=64)
    assert matmul(w, t, np.zeros((0, 64), np.float32)).shape == (0, 8)
    assert matmul(w[:0], t, np.zeros((3, 64), np.float32)).shape == (3, 0)
    assert get_rows(w, t, np.array([], np.int64)).shape == (0, 64)
    y = matmul(np.zeros((5, 0), np.uint8), t, np.zeros((9, 0), np.float32))
    assert y.shape == (9, 5) and not y.any()


def test_long_prompt_and_strided_out():
    """More tokens than one prompt-kernel chunk, several row groups, output rows inside a
    wider buffer."""
    t = GGMLType.Q4_K
    w = make_weight(t, 70, n_in=512)
    wd = dequantized(t, w)
    x = np.random.default_rng(5).standard_normal((kernels.TOKEN_CHUNK + 7, 512)).astype(np.float32)
    buf = np.zeros((x.shape[0], 80), np.float32)
    out = buf[:, 3:73]
    assert matmul(w, t, x, out=out) is out
    check_close(out, t, x, wd, w)
    assert not buf[:, :3].any() and not buf[:, 73:].any()
