"""The llvmlite layer: fp16 kernels against numpy, the disk cache, PTX that ptxas accepts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from gguflab import jit
from gguflab.jit import Target


def _edge_floats() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            rng.standard_normal(200_000).astype(np.float32) * 10 ** rng.uniform(-9, 6, 200_000),
            np.array(
                [
                    0.0,
                    -0.0,
                    np.inf,
                    -np.inf,
                    65504,
                    65519.996,
                    65520,
                    -65520,
                    6.0e-8,
                    2.98e-8,
                    2.99e-8,
                    5.96e-8,
                    6.1e-5,
                    1e-45,
                    3.4e38,
                ],
                np.float32,
            ),
            # exact ties between two halves: round to even
            (np.arange(2048, 4096, dtype=np.float32) + 0.5),
        ]
    )
    return x.astype(np.float32)


@pytest.mark.parametrize("hw", [True, False], ids=["hardware", "integer"])
def test_f32_to_f16_matches_numpy(hw):
    x = _edge_floats()
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    got = jit.f32_to_f16(x, hw=hw if hw is False or jit.host_cpu().has("f16c") else None)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("hw", [True, False], ids=["hardware", "integer"])
def test_f16_to_f32_every_half(hw):
    bits = np.arange(1 << 16, dtype=np.uint16)
    want = bits.view(np.float16).astype(np.float32)
    got = jit.f16_to_f32(bits, hw=hw if hw is False or jit.host_cpu().has("f16c") else None)
    nan = np.isnan(want)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
    assert np.isnan(got[nan]).all()


def test_nan_stays_nan():
    x = np.array([np.nan, -np.nan], np.float32)
    for hw in (False, None):
        h = jit.f32_to_f16(x, hw=hw)
        assert np.isnan(h.view(np.float16)).all()


def test_threads_split_rows_exactly():
    seen = np.zeros(1000, np.int32)

    def fn(a, b):
        seen[a:b] += 1

    for threads in (1, 2, 3, 7):
        seen[:] = 0
        jit.parallel_rows(fn, 1000, threads)
        assert (seen == 1).all()


def test_row_slices_run_on_the_team_once_each_nested_and_raise_in_the_caller():
    """parallel_rows runs its slices as a team job of Python callbacks: every row once, cuts
    at the alignment asked, a slice that calls parallel_rows itself, and an exception in any
    slice raised by the call."""
    seen = np.zeros(4000, np.int32)

    def fn(a, b):
        assert a % 8 == 0
        jit.parallel_rows(lambda c, d: np.add.at(seen, np.arange(a + c, a + d), 1), b - a, 2)

    jit.parallel_rows(fn, 4000, 2, align=8)
    assert (seen == 1).all()

    def bad(a, b):
        if a >= 2000:
            raise KeyError(a)

    with pytest.raises(KeyError):
        jit.parallel_rows(bad, 4000, 2)


def test_disk_cache_is_used_by_a_new_process(tmp_path):
    env = {**os.environ, "GGUFLAB_CACHE_DIR": str(tmp_path), "GGUFLAB_DEBUG": "1"}
    code = "from gguflab import jit; import numpy as np; jit.f32_to_f16(np.ones(4, np.float32))"
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "compiled" in first.stderr and "cache hit" in second.stderr
    assert any(name.endswith(".o") for name in os.listdir(tmp_path / "jit"))


def test_a_cached_builder_is_not_run_again(tmp_path):
    """A module given as its builder and a key: the first process builds and compiles it,
    the next loads the object by the key (and the source's hash) without building the IR;
    another key builds again."""
    env = {**os.environ, "GGUFLAB_CACHE_DIR": str(tmp_path), "GGUFLAB_DEBUG": "1"}
    code = """if True:
        import ctypes, sys
        from llvmlite import ir
        from gguflab.jit import compile_kernels
        from gguflab.jit.builders import i64
        def build():
            print("building", file=sys.stderr)
            m = ir.Module(name="t")
            fn = ir.Function(m, ir.FunctionType(i64, [i64]), "twice")
            b = ir.IRBuilder(fn.append_basic_block())
            b.ret(b.add(fn.args[0], fn.args[0]))
            return m
        sig = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64)
        print(compile_kernels(build, {"twice": sig}, key=sys.argv[1])["twice"](21))
    """
    runs = [subprocess.run([sys.executable, "-c", code, key], env=env, capture_output=True,
                           text=True) for key in ("a", "a", "b")]
    assert all(r.returncode == 0 and r.stdout == "42\n" for r in runs), runs
    assert ["building" in r.stderr for r in runs] == [True, False, True]
    assert "cache hit by source" in runs[1].stderr
    with pytest.raises(ValueError, match="needs a key"):
        jit.compile_kernels(lambda: None, {})


def test_debug_level_two_prints_ir(tmp_path):
    env = {**os.environ, "GGUFLAB_CACHE_DIR": str(tmp_path), "GGUFLAB_DEBUG": "2"}
    code = "from gguflab import jit; import numpy as np; jit.f32_to_f16(np.ones(4, np.float32))"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "define" in r.stderr and "f32_to_f16" in r.stderr


@pytest.mark.parametrize("sm", ["sm_80", "sm_90"])
def test_ptx_is_emitted_and_assembles(tmp_path, sm):
    ptx = jit.emit_ptx(jit.build_half_module(Target.NVPTX), sm)
    assert f".target {sm}" in ptx and ".entry f32_to_f16" in ptx and ".entry f16_to_f32" in ptx
    assert "cvt.rn.f16.f32" in ptx
    ptxas = shutil.which("ptxas")
    if ptxas is None:
        pytest.skip("ptxas is not on this machine: PTX emitted but not assembled")
    src = tmp_path / "k.ptx"
    src.write_text(ptx)
    r = subprocess.run(
        [ptxas, f"-arch={sm}", str(src), "-o", str(tmp_path / "k.cubin")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
