"""The kernels compute the same bits on every x86-64 CPU.

CI runs on whichever machine a session gets: AVX2-only, or AVX-512. The kernels are compiled
for the host, so the IR must leave LLVM no target-dependent choice that changes a result:
float reductions in a fixed lane count and order, explicit FMAs, no reassociating or
contracting flags. Three checks, each of which an AVX2-only machine runs:

- the IR the generators emit is the same text for x86-64-v3 and x86-64-v4;
- after LLVM's optimisation pipeline for x86-64-v4, no float op carries a flag that lets
  the code generator reorder or fuse it;
- every kernel family (tests/target_probe.py) gives the same bits compiled for x86-64-v3,
  for the host, and optimised as for x86-64-v4 with machine code for the host (what an
  AVX-512 CPU's optimiser leaves, run here); on an AVX-512 host also compiled for v4.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gguflab import quant
from gguflab.jit import Target, build_half_module
from gguflab.jit import core as jit_core
from gguflab.runner import kernels as rk
from gguflab.runner.cuda import kernels as ck

x86 = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                         reason="the x86-64 levels are an x86 matter")
V3, V4 = "x86-64-v3", "x86-64-v4"


def _modules() -> dict[str, str]:
    """The IR text of every kernel module the CPU compiles (the GPU's, built for the host)."""
    mods = {f"matmul/{t.name}": rk.build_module(t) for t in rk.SUPPORTED_TYPES}
    mods |= {f"quant/{t.name}": q.build_module(Target.CPU) for t, q in quant.REGISTRY.items()
             if q.has_quantize_kernel or q.has_dequantize_kernel}
    mods |= {f"quant/{t.name}/{k}": m for t, q in quant.REGISTRY.items()
             for k, m in q.row_modules().items()}
    mods["gpu/common"] = ck.build_common_module(Target.CPU)
    mods |= {f"gpu/{t.name}": ck.build_weight_module(t, Target.CPU) for t in ck.WEIGHT_TYPES}
    mods["half"] = build_half_module(Target.CPU)
    return {k: str(m) for k, m in mods.items()}


def _as_target(monkeypatch, name: str) -> None:
    cpu = jit_core.cpu_target(name)
    monkeypatch.setattr(rk, "host_cpu", lambda: cpu)
    rk._x86_f16c.cache_clear()


@x86
def test_kernel_ir_is_the_same_for_avx2_and_avx512(monkeypatch):
    _as_target(monkeypatch, V3)
    v3 = _modules()
    _as_target(monkeypatch, V4)
    v4 = _modules()
    rk._x86_f16c.cache_clear()
    assert v3.keys() == v4.keys()
    assert [k for k in v3 if v3[k] != v4[k]] == []


# a float instruction with a flag that licenses reordering, fusing or approximating it
_LOOSE = re.compile(r"= f(?:add|sub|mul|div|neg|rem)\b[^\n]*\b(fast|reassoc|contract|arcp|afn)\b"
                    r"|call [^\n]*\b(fast|reassoc|contract|afn)\b[^\n]*@llvm\.|@llvm\.fmuladd")


@x86
def test_optimised_kernels_leave_llvm_no_float_reordering():
    tm = jit_core._target_machine(jit_core.cpu_target(V4))
    loose = {}
    for name, text in _modules().items():
        mod = jit_core._parse(text)
        mod.triple = tm.triple
        mod.data_layout = str(tm.target_data)
        jit_core._optimise(mod, tm)
        hits = {m.group(0)[:80] for m in _LOOSE.finditer(str(mod))}
        if hits:
            loose[name] = sorted(hits)[:3]
    assert loose == {}


def _probe(tmp: Path, label: str, env: dict[str, str]) -> dict[str, np.ndarray]:
    out = tmp / f"{label}.npz"
    full = {k: v for k, v in os.environ.items()
            if k not in ("GGUFLAB_CPU", "GGUFLAB_OPTIMISE_FOR")} | env
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("target_probe.py")),
                        str(out), str(tmp)], env=full, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, f"{label}: {r.stderr[-3000:]}"
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


@x86
@pytest.mark.slow  # compiles every kernel per target: about 20 s each
def test_every_kernel_gives_the_same_bits_on_every_x86_64_target(tmp_path):
    targets = {V3: {"GGUFLAB_CPU": V3},
               f"{V4} optimiser, {V3} code": {"GGUFLAB_CPU": V3, "GGUFLAB_OPTIMISE_FOR": V4},
               "native": {"GGUFLAB_CPU": "native"},
               "haswell": {"GGUFLAB_CPU": "haswell"}}  # an LLVM CPU name: v3's features
    if "+avx512f" in jit_core.cpu_target("native").features.split(","):
        targets[V4] = {"GGUFLAB_CPU": V4}
    runs = {label: _probe(tmp_path, label, env) for label, env in targets.items()}
    ref = runs.pop(V3)
    families = {k.split("/")[0] for k in ref}
    assert {"matmul", "quantize", "dequantize", "forward", "f32_to_f16"} <= families
    for label, got in runs.items():
        assert got.keys() == ref.keys(), label
        differ = [k for k in ref if not k.startswith("_")
                  and ref[k].tobytes() != got[k].tobytes()]
        assert differ == [], f"{label} differs from {V3} in {differ[:8]}"


def test_a_target_this_cpu_cannot_run_is_one_clear_error(monkeypatch):
    from gguflab.errors import UserError

    real = jit_core.cpu_target  # this machine, as an AVX2-only one
    monkeypatch.setattr(jit_core, "cpu_target",
                        lambda name=None: real(V3 if name in (None, "native") else name))
    monkeypatch.setenv("GGUFLAB_CPU", V4)
    jit_core.host_cpu.cache_clear()
    try:
        with pytest.raises(UserError, match=f"GGUFLAB_CPU={V4}: this CPU lacks avx512f"):
            jit_core.host_cpu()
    finally:
        jit_core.host_cpu.cache_clear()
