"""GPU offload planning: llama.cpp's -ngl placement, the fit maths against the tensor sizes
gguf-py computes, auto, too-big requests, and the no-GPU path (probe and CLI)."""

from __future__ import annotations

import re
import sys
import types

import numpy as np
import pytest
from fake_cuda import install_driver
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from gguflab.cli import main
from gguflab.errors import UserError
from gguflab.gguf import GGUFReader
from gguflab.runner import offload
from gguflab.runner.offload import OffloadPlan, placement, plan_offload, probe_gpu
from gguflab.synth import SynthConfig, write_synthetic_llama

N_LAYER = 4


@pytest.fixture(scope="module")
def tiny(module_tmp) -> str:
    path = module_tmp("offload") / "tiny.gguf"
    return write_synthetic_llama(path, SynthConfig(n_layer=N_LAYER, n_embd=64, n_ff=128,
                                                   n_head=4, n_head_kv=2, n_vocab=96))


def _oracle_bytes(path: str) -> tuple[list[int], int]:
    """Per-layer and output-head bytes from each tensor's shape and gguf-py's block sizes."""
    per, out = [0] * N_LAYER, 0
    for t in GGUFReader(path).tensors:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int(t.type))]
        nbytes = int(np.prod(t.shape)) // block * type_size
        if t.name.startswith("blk."):
            per[int(t.name.split(".")[1])] += nbytes
        elif t.name in ("output.weight", "output_norm.weight"):
            out += nbytes
    return per, out


@pytest.mark.parametrize("ngl, layers, output", [
    (0, [], False), (1, [3], False), (2, [2, 3], False), (4, [0, 1, 2, 3], False),
    (5, [0, 1, 2, 3], True), (999, [0, 1, 2, 3], True)])
def test_placement_is_llama_cpp_s_last_n_layers_then_output(ngl, layers, output):
    assert placement(N_LAYER, ngl) == (layers, output)


def test_negative_layer_count_is_a_user_error():
    with pytest.raises(UserError, match="-ngl -1"):
        placement(N_LAYER, -1)


def test_plan_adds_up_weights_kv_and_scratch(tiny):
    per, out = _oracle_bytes(tiny)
    n_ctx = 256
    kv = 2 * n_ctx * 2 * 16 * 2  # K and V, n_head_kv=2, head_dim=16, f16
    p = plan_offload(tiny, n_ctx, 2, free_bytes=1 << 40, total_bytes=1 << 41, gpu_name="H100")
    assert p.bytes_per_layer == per and p.output_bytes == out
    assert p.kv_bytes_per_layer == kv
    assert p.gpu_layers == [2, 3] and not p.output_on_gpu
    assert p.needed_bytes == per[2] + per[3] + 2 * kv + p.scratch_bytes
    assert p.scratch_bytes >= offload.RESERVE_BYTES
    full = plan_offload(tiny, n_ctx, 999, free_bytes=1 << 40)
    assert full.output_on_gpu and full.needed_bytes == sum(per) + 4 * kv + out + \
        full.scratch_bytes
    # the output head adds a batch of logits to the scratch
    assert full.scratch_bytes - p.scratch_bytes == 4 * min(n_ctx, offload.MAX_BATCH) * 96
    assert re.fullmatch(r"offload: 2/4 layers on GPU 0 \(H100\), \d+ MiB of "
                        r"1024\.0 GiB free", p.summary())


def test_auto_takes_the_most_layers_that_fit(tiny):
    n_ctx = 128
    need = {k: plan_offload(tiny, n_ctx, k, free_bytes=1 << 40).needed_bytes
            for k in range(N_LAYER + 2)}
    assert need[0] == 0 and all(need[k] < need[k + 1] for k in range(N_LAYER + 1))
    for k in range(1, N_LAYER + 2):
        exact = plan_offload(tiny, n_ctx, "auto", free_bytes=need[k])
        short = plan_offload(tiny, n_ctx, "auto", free_bytes=need[k] - 1)
        assert (len(exact.gpu_layers) + exact.output_on_gpu, exact.max_fit) == (k, k)
        assert len(short.gpu_layers) + short.output_on_gpu == k - 1
    nothing = plan_offload(tiny, n_ctx, "auto", free_bytes=need[1] - 1)
    assert nothing.gpu_layers == [] and not nothing.on_gpu
    assert "0/4 layers" in nothing.summary() and "running on the CPU" in nothing.summary()


def test_asking_for_more_than_fits_is_a_user_error_with_the_numbers(tiny):
    need3 = plan_offload(tiny, 128, 3, free_bytes=1 << 40).needed_bytes
    with pytest.raises(UserError) as e:
        plan_offload(tiny, 128, N_LAYER, free_bytes=need3)
    msg = str(e.value)
    assert "-ngl 4" in msg and "at most -ngl 3" in msg and "MiB" in msg


def test_no_gpu_plan_runs_on_the_cpu_and_says_why(tiny):
    p = plan_offload(tiny, 128, 999, None, no_gpu_reason="cuda-bindings is not installed")
    assert p.gpu_layers == [] and not p.output_on_gpu and not p.on_gpu
    assert p.summary() == "no GPU (cuda-bindings is not installed): running on the CPU"


def test_bad_auto_spelling_is_a_user_error(tiny):
    with pytest.raises(UserError, match="auto"):
        plan_offload(tiny, 128, "most", free_bytes=1 << 40)


def _hide_cuda(monkeypatch):
    for name in ("cuda", "cuda.bindings", "cuda.bindings.driver"):
        monkeypatch.setitem(sys.modules, name, None)  # `import` raises ImportError


def test_probe_gpu_without_cuda_bindings_gives_a_reason(monkeypatch):
    _hide_cuda(monkeypatch)
    assert probe_gpu() == (None, "cuda-bindings is not installed")


def test_probe_gpu_survives_a_driver_that_cannot_load(monkeypatch):
    """cuda-bindings raises from cuInit when libcuda.so is missing: one line, no raise."""
    driver = types.ModuleType("cuda.bindings.driver")

    def cu_init(flags):
        raise RuntimeError('"cuda" is an NVIDIA driver library and can only be found via '
                           "system search.\nsecond line")

    driver.cuInit = cu_init
    install_driver(monkeypatch, driver)
    gpu, why = probe_gpu(0)
    assert gpu is None and why.startswith("the CUDA driver is not usable: ")
    assert "\n" not in why and "NVIDIA driver library" in why


def test_probe_gpu_reports_no_device(monkeypatch):
    driver = types.ModuleType("cuda.bindings.driver")
    driver.cuInit = lambda flags: (100,)  # CUDA_ERROR_NO_DEVICE
    bindings = types.ModuleType("cuda.bindings")
    bindings.driver = driver
    monkeypatch.setitem(sys.modules, "cuda", types.ModuleType("cuda"))
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.driver", driver)
    assert probe_gpu(0) == (None, "no CUDA device found")


def test_plan_is_a_dataclass_with_the_fields_the_tui_reads():
    names = set(OffloadPlan.__dataclass_fields__)
    assert {"gpu_layers", "output_on_gpu", "bytes_per_layer", "kv_bytes_per_layer",
            "scratch_bytes", "needed_bytes", "free_bytes", "reason"} <= names


@pytest.fixture(scope="module")
def tiny_with_vocab(module_tmp, smollm2) -> str:
    path = module_tmp("offload-cli") / "tiny-vocab.gguf"
    return write_synthetic_llama(path, SynthConfig(n_layer=N_LAYER, n_embd=64, n_ff=128,
                                                   n_head=4, n_head_kv=2,
                                                   tokenizer_from=smollm2))


def test_cli_ngl_without_a_gpu_says_so_and_gives_the_cpu_output(tiny_with_vocab, capsys,
                                                                   monkeypatch):
    _hide_cuda(monkeypatch)
    args = ["run", "-m", tiny_with_vocab, "-p", "Hello", "-n", "6", "--temp", "0", "-c", "64"]
    assert main(args) == 0
    cpu = capsys.readouterr()
    assert main([*args, "-ngl", "4"]) == 0
    gpu = capsys.readouterr()
    assert gpu.out == cpu.out and len(gpu.out) > len("Hello")
    lines = [ln for ln in gpu.err.splitlines() if "GPU" in ln]
    assert lines == ["gguflab: no GPU (cuda-bindings is not installed): running on the CPU"]
    assert "GPU" not in cpu.err
    assert main([*args, "-ngl", "auto", "--main-gpu", "1"]) == 0
    assert "no GPU (cuda-bindings is not installed)" in capsys.readouterr().err


def test_cli_rejects_a_bad_layer_count(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "-ngl", "many", "-p", "x"])
    assert e.value.code == 2
    assert "give a number of layers or auto" in capsys.readouterr().err


@pytest.mark.parametrize("ngl", ["1", "999"])
def test_cli_offloads_to_the_emulated_gpu_with_the_cpu_tokens(tiny_with_vocab, capsys,
                                                               monkeypatch, ngl):
    """GGUFLAB_GPU=host: the device kernels, compiled for the CPU, run the offloaded layers
    through `run` and `perplexity` exactly as a GPU would; tokens and figures as the CPU's."""
    args = ["run", "-m", tiny_with_vocab, "-p", "Hello", "-n", "6", "--temp", "0", "-c", "64"]
    assert main(args) == 0
    cpu = capsys.readouterr().out
    monkeypatch.setenv("GGUFLAB_GPU", "host")
    assert main([*args, "-ngl", ngl]) == 0
    got = capsys.readouterr()
    assert got.out == cpu
    n = "1/4 layers" if ngl == "1" else "4/4 layers + output"
    assert f"offload: {n} on GPU 0 (host emulation)" in got.err

    ppl = ["perplexity", "-m", tiny_with_vocab, "-c", "64", "--chunks", "2"]
    figures = []
    for env in ("", "host"):
        monkeypatch.setenv("GGUFLAB_GPU", env)
        assert main([*ppl, "-ngl", ngl]) == 0
        out = capsys.readouterr().out
        figures.append(float(out.split("Final estimate: PPL = ")[1].split()[0]))
    assert figures[1] == pytest.approx(figures[0], rel=1e-3)


def test_load_model_is_the_one_way_to_open_a_model_with_its_offload(tiny_with_vocab, monkeypatch):
    """CLI, chat tab and sweep all open models through runner.load_model: the context is
    settled, the plan made first, and the Model built with its GPU layers."""
    from gguflab.runner.load import load_model

    tiny = tiny_with_vocab

    lm = load_model(tiny, 0, 0)
    assert lm.plan is None and lm.model.gpu is None and lm.n_ctx == 2048  # the trained ctx
    monkeypatch.setenv("GGUFLAB_GPU", "host")
    lm = load_model(tiny, 64, 2)
    assert lm.plan.gpu_layers == [2, 3] and not lm.plan.output_on_gpu
    assert [g for g in lm.model.gpu.layers] == [2, 3]
    assert lm.model.new_cache(64).k.shape[0] == N_LAYER - 2  # the CPU keeps its own layers
    lm = load_model(tiny, 64, 999)
    assert lm.model.gpu.output
    with pytest.raises(UserError, match="no such file"):
        load_model(str(tiny) + ".missing")
    with pytest.raises(UserError, match="too small"):
        load_model(tiny, 4)
    with pytest.raises(UserError, match="--threads -2"):
        load_model(tiny, threads=-2)
