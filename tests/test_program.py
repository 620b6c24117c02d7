"""runner/program.py: a decoding step's phases and serial steps run as one compiled call;
the words that depend on the position are rewritten per run."""

import numpy as np
import pytest

from gguflab.jit.parallel import STEP_ARGS, team
from gguflab.runner.program import Program, f32_bits, kernels, rows_job


def test_steps_run_in_order_and_varying_words_follow_the_position():
    k = kernels()
    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, 40).astype(np.float32)
    one = np.full(40, 0.5, np.float32)
    w = rng.normal(1, 0.1, 40).astype(np.float32)
    dst = np.zeros((2, 6, 40), np.float32)  # (rows, positions, n): a KV cache's layout
    prog = Program()
    prog.step(k["add_step"], x.ctypes.data, one.ctypes.data, x.ctypes.data, 40)
    prog.step(k["rms_norm_step"], x.ctypes.data, w.ctypes.data, x.ctypes.data, 1, 40,
              f32_bits(1e-5))
    where = prog.step(k["store_f16_step"], x.ctypes.data, 0, 1, 40, 6 * 40)
    prog.vary("p0", where, 2, dst.ctypes.data, 4 * 40)  # word 2: the step's 2nd argument
    prog.build()
    want = x.copy()
    for p0 in range(4):
        prog.run(team(2), p0=p0)
        want = want + one
        want = want * np.float32(1 / np.sqrt(np.float32(np.mean(
            want.astype(np.float64) ** 2)) + np.float32(1e-5))) * w
        np.testing.assert_allclose(x, want, rtol=1e-5)
        want = x.copy()
        np.testing.assert_array_equal(dst[0, p0], x.astype(np.float16).astype(np.float32))
    assert not dst[0, 4:].any() and not dst[1].any()


def test_a_step_takes_at_most_its_argument_words():
    with pytest.raises(ValueError, match="at most"):
        Program().step(kernels()["add_step"], *range(STEP_ARGS + 1))


def test_cache_writes_round_as_numpy_s_float16():
    """The KV cache's fp16 rounding (store_f16: the prompt's and the decode program's
    writes) is numpy's astype(float16): nearest even, fp16 subnormals, overflow to inf."""
    from gguflab.runner.program import store_f16
    rng = np.random.default_rng(1)
    n, n_kv, hd = 7, 3, 40
    x = (rng.standard_normal((n, n_kv, hd)) * 10.0 ** rng.integers(-8, 6, (n, n_kv, hd))
         ).astype(np.float32)
    x[0, 0, :4] = [65520.0, -70000.0, 2.0 ** -25, 1 + 2.0 ** -11]  # inf, -inf, ties to even
    cache = np.full((n_kv, 16, hd), 7.0, np.float32)
    store_f16(x, cache, 5)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).astype(np.float32).transpose(1, 0, 2)
    np.testing.assert_array_equal(cache[:, 5:12].view(np.uint32), want.view(np.uint32))
    assert (cache[:, :5] == 7).all() and (cache[:, 12:] == 7).all()
    with pytest.raises(ValueError):
        store_f16(x, cache, 10)  # past the cache's end


def test_geglu_step_is_the_general_route_s_gelu():
    """The program's GELU step is model.gelu_ggml (ggml's fp16 table, 0 from -10 down, x
    from 10 up) times u, bit for bit, across the table's range and its edges."""
    from gguflab.runner.model import gelu_ggml, gelu_table
    rng = np.random.default_rng(2)
    g = np.concatenate([rng.uniform(-12, 12, 4000), [-10, 10, -9.999, 9.999, 0, -0.0],
                        rng.normal(0, 1e-3, 100)]).astype(np.float32)
    u = rng.normal(0, 2, g.size).astype(np.float32)
    y = np.empty_like(g)
    prog = Program()
    prog.step(kernels()["geglu_step"], g.ctypes.data, u.ctypes.data, y.ctypes.data, g.size,
              gelu_table().ctypes.data)
    prog.build().run(team(2))
    np.testing.assert_array_equal(y.view(np.uint32), (gelu_ggml(g) * u).view(np.uint32))


def test_rows_jobs_split_rows_and_words_varied_twice_sum_their_terms():
    """`rows_job` runs a step over rows in parts (each part's pointers moved to its first
    row; a stride of 0 for what all rows share); `bias_step` adds a vector to each row;
    `keys_t_step` transposes a cache's keys with zeros to the padding; a word varied by two
    variables (a cache's address and a position) is the sum of both terms."""
    k = kernels()
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (37, 24)).astype(np.float32)
    c = rng.normal(0, 1, 24).astype(np.float32)
    y = np.zeros_like(x)
    keys = [np.zeros((2, 16, 8), np.float32) for _ in range(2)]  # (n_kv, n_ctx, hd)
    kt = np.full((2, 8, 8), 7.0, np.float32)  # (n_kv, hd, tpad)
    prog = Program()
    prog.parallel([rows_job(k["bias_step"], 37, [(x.ctypes.data, 96), (c.ctypes.data, 0),
                                                  (y.ctypes.data, 96)], (24,), parts=5)])
    where = prog.step(k["store_f16_step"], y.ctypes.data, 0, 3, 8, 8, 24)  # 3 rows into head 0
    prog.vary("cache", where, 2)
    prog.vary("p0", where, 2, 0, 4 * 8)
    where = prog.step(k["keys_t_step"], 0, kt.ctypes.data, 2, 8, 16 * 8, 0, 8)
    prog.vary("cache", where, 1)
    prog.vary("t", where, 6)
    prog.build()
    for cache, p0 in ((keys[0], 2), (keys[1], 5)):
        prog.run(team(2), cache=cache.ctypes.data, p0=p0, t=p0 + 3)
        np.testing.assert_array_equal(y, x + c)
        want = np.zeros((2, 16, 8), np.float32)
        want[0, p0:p0 + 3] = y[:3, :8].astype(np.float16)
        np.testing.assert_array_equal(cache, want)
        np.testing.assert_array_equal(kt[:, :, :p0 + 3], want[:, :p0 + 3].transpose(0, 2, 1))
        assert not kt[:, :, p0 + 3:8].any()
    with pytest.raises(ValueError, match="three row pointers"):
        rows_job(k["add_step"], 4, [(0, 0)] * 4)
