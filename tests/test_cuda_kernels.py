"""The CUDA backend without a GPU: every kernel's PTX assembles (ptxas, sm_80 and sm_90), the
same kernel bodies built for the host CPU match numpy, and the offloaded forward pass on the
host device gives Model.forward's logits. The `gpu` test runs the real device when there is
one."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import threading
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from agreement import assert_same_top1_where_clear, kld
from fake_cuda import install_driver

from gguflab import quant
from gguflab.errors import UserError
from gguflab.gguf import GGMLType
from gguflab.jit import Target, emit_ptx
from gguflab.runner.cuda import kernels as K
from gguflab.runner.cuda.device import KERNELS, MAX_GRID, HostDevice, build_module
from gguflab.runner.cuda.layers import DeviceWeight, GpuLayers, forward_offloaded, round_code
from gguflab.runner.model import Model
from gguflab.runner.offload import placement, probe_gpu
from gguflab.synth import SynthConfig, write_synthetic_llama

MODULES = ["common", *(t.name for t in K.WEIGHT_TYPES)]

# Bounds between the device's logits and the CPU's, as fractions of the logits' scale:
# - FLOAT_ORDER: the same arithmetic, floats summed in another order (a warp's tree, the
#   CPU's vector lanes); measured at most a few 1e-6 on these models.
FLOAT_ORDER = 1e-4
# - FP16_ATTN: FLOAT_ORDER, and the CPU's attention is llama.cpp's CPU flash attention,
#   whose V sums are fp16 (a prompt of under 64 tokens): measured 5e-4 of the scale.
FP16_ATTN = 2e-3
# - Q8_LEVEL: where products read Q8-rounded activations (rounded as the CPU rounds them),
#   an activation within noise of a rounding boundary lands one level off on one side (as
#   between any two backends that round activations). The noise is FP16_ATTN's (the
#   device's attention is f32 throughout): measured up to 3% of the scale downstream on the
#   3-layer quantized models, the first token (one key: no attention noise) to 7e-7.
Q8_LEVEL = 5e-2


def test_every_registry_type_with_a_dequantizer_has_gpu_kernels():
    want = {t for t, q in quant.REGISTRY.items() if q.has_dequantize_kernel and q.weight_type}
    assert want | {GGMLType.F32} == set(K.WEIGHT_TYPES)
    for t in (GGMLType.F32, GGMLType.F16, GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1,
              GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K):
        assert f"matvec_{t.name.lower()}" in KERNELS


def test_rows_of_few_blocks_share_a_warp():
    """A warp's lanes take whole blocks: a row of 8 blocks gets 8 lanes, not 32."""
    assert [K.lanes_per_row(n) for n in (1, 2, 3, 8, 18, 32, 100)] == [1, 2, 4, 8, 32, 32, 32]


@pytest.mark.slow  # ~15 s of llvmlite + ptxas CPU time per target
@pytest.mark.parametrize("sm", ["sm_80", "sm_90"])
def test_ptx_of_every_kernel_assembles(sm, tmp_path):
    ptxas = shutil.which("ptxas")

    def emit_and_assemble(key):  # llvmlite and ptxas both run outside the GIL: 2 at a time
        ptx = emit_ptx(build_module(key, Target.NVPTX), sm)
        if ptxas is None:
            return key, ptx, 0, ""
        src = tmp_path / f"{key}.ptx"
        src.write_text(ptx)
        r = subprocess.run([ptxas, f"-arch={sm}", str(src), "-o", str(tmp_path / f"{key}.o")],
                           capture_output=True, text=True)
        return key, ptx, r.returncode, r.stderr

    with ThreadPoolExecutor(2) as pool:
        results = {key: rest for key, *rest in pool.map(emit_and_assemble, MODULES)}
    for name, (_, key) in KERNELS.items():
        ptx, rc, err = results[key]
        assert f".entry {name}(" in ptx and f".target {sm}" in ptx, name
        assert rc == 0, f"ptxas -arch={sm} rejected {key}: {err}"
    if ptxas is None:
        pytest.skip("ptxas is not on this machine: PTX emitted but not assembled")


# -- the kernels against numpy: host builds everywhere, the GPU where there is one -------


@pytest.fixture(scope="module", params=["host", pytest.param("cuda", marks=pytest.mark.gpu)])
def dev(request):
    """The host device; and, marked `gpu`, a CudaDevice running the same checks."""
    if request.param == "host":
        yield HostDevice()
        return
    info, why = probe_gpu(0)
    if info is None:
        pytest.skip(f"no GPU: {why}")
    from gguflab.runner.cuda.device import CudaDevice

    device = CudaDevice(0)
    yield device
    device.close()


def _f32(dev, p, shape):
    return dev.read(p, np.empty(shape, np.float32))


def _weights(t: GGMLType, n_out: int, n_in: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(raw rows, the floats they decode to per the quant type's numpy reference)."""
    w = rng.standard_normal((n_out, n_in)).astype(np.float32)
    if t == GGMLType.F32:
        return w.view(np.uint8).reshape(n_out, -1), w
    qt = quant.get(t)
    if t in (GGMLType.Q8_K,):  # no quantizer: random bytes with sane f32 scales
        blocks = rng.integers(-127, 128, (n_out, n_in // 256, 292), dtype=np.int64)
        raw = blocks.astype(np.int8).view(np.uint8)
        raw[..., :4] = np.frombuffer(np.float32(0.01).tobytes(), np.uint8)
        raw = np.ascontiguousarray(raw.reshape(n_out, -1))
    else:
        raw = qt.quantize(w, reference=True, imatrix=rng.uniform(0.1, 2.0, n_in).astype(
            np.float32) if qt.requires_imatrix else None)  # IQ2_XXS/XS/IQ1_S need one
    return raw, qt.dequantize(raw, reference=True)


@pytest.mark.parametrize("t", K.WEIGHT_TYPES, ids=lambda t: t.name)
def test_products_and_get_rows_match_numpy(t, dev):
    rng = np.random.default_rng(int(t))
    n_out, n_in = 37, 512
    raw, wf = _weights(t, n_out, n_in, rng)
    pw = dev.upload(raw)
    nb = n_in // K.virtual_block(t)
    name = t.name.lower()
    for n_tok in (1, 3, K.MATMUL_TOKENS + 3):  # a prompt's last group of tokens short
        x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
        px, py = dev.upload(x), dev.alloc(4 * n_tok * n_out)
        ref = x.astype(np.float64) @ wf.T.astype(np.float64)
        # float32 sums of n_in products, in any order: a few ulps of the sum of magnitudes
        tol = 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(wf).T.astype(np.float64))
        for kernel, items in (("matvec", n_tok * n_out), ("matmul", K.matmul_items(n_tok, n_out))):
            dev.write(py, np.full((n_tok, n_out), np.nan, np.float32))
            dev.launch(f"{kernel}_{name}", items, pw, raw.strides[0], px, n_in, py, n_out,
                       n_out, nb, n_tok, K.lanes_per_row(nb))
            got = _f32(dev, py, (n_tok, n_out))
            assert np.all(np.abs(got - ref) <= tol), (kernel, n_tok)
    ids = np.array([5, 0, 36, 5], np.int64)
    py = dev.alloc(4 * len(ids) * n_in)
    dev.launch(f"get_rows_{name}", len(ids) * nb, pw, raw.strides[0], dev.upload(ids), py, nb)
    np.testing.assert_array_equal(_f32(dev, py, (len(ids), n_in)), wf[ids])


def test_rms_norm_softmax_and_elementwise_match_numpy(dev):
    rng = np.random.default_rng(1)
    n, rows = 300, 5
    x = rng.standard_normal((rows, n)).astype(np.float32)
    w = rng.standard_normal(n).astype(np.float32)
    u = rng.standard_normal((rows, n)).astype(np.float32)
    px, pw, pu, py = dev.upload(x), dev.upload(w), dev.upload(u), dev.alloc(x.nbytes)

    dev.launch("rms_norm", rows, px, pw, py, n, 1e-5)
    ms = np.mean(x.astype(np.float64) ** 2, -1, keepdims=True)
    np.testing.assert_allclose(_f32(dev, py, x.shape), x / np.sqrt(ms + 1e-5) * w, rtol=1e-5,
                               atol=1e-6)

    dev.launch("softmax", rows, px, py, n)
    e = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
    np.testing.assert_allclose(_f32(dev, py, x.shape), e / e.sum(-1, keepdims=True),
                               rtol=1e-5, atol=1e-9)

    dev.launch("silu_mul", x.size, px, pu, py)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(_f32(dev, py, x.shape), x64 / (1 + np.exp(-x64)) * u,
                               rtol=1e-5, atol=1e-6)

    dev.launch("add", x.size, px, pu, py)
    np.testing.assert_array_equal(_f32(dev, py, x.shape), x + u)

    pb = dev.upload(w)
    dev.launch("add_bias", x.size, px, pb, n)
    np.testing.assert_array_equal(_f32(dev, px, x.shape), x + w)

    # the residual add and the next norm in one kernel: x += u, y = RMSNorm(x) * w
    px = dev.upload(x)
    dev.launch("add_rms_norm", rows, px, pu, pw, py, n, 1e-5)
    s = x + u
    np.testing.assert_array_equal(_f32(dev, px, x.shape), s)
    ms = np.mean(s.astype(np.float64) ** 2, -1, keepdims=True)
    np.testing.assert_allclose(_f32(dev, py, x.shape), s / np.sqrt(ms + 1e-5) * w, rtol=1e-5,
                               atol=1e-6)


ROUNDINGS = [GGMLType.Q8_0, GGMLType.Q8_1, GGMLType.Q8_K, GGMLType.F16, GGMLType.BF16]


def _hard_rows(rng) -> np.ndarray:
    """Rows of 512 that exercise every rounding's corners: scales from 0.01 to 30, an
    all-zero Q8 group and an all-zero Q8_K block, ties at .5 levels, a Q8_K block whose
    largest magnitude is negative and one where -m comes before +m (the first one counts),
    values at fp16/bf16 ties and a NaN-free f16 overflow."""
    x = (rng.standard_normal((4, 512)) * rng.uniform(0.01, 30, (4, 1))).astype(np.float32)
    x[1, 32:64] = 0
    x[1, 256:] = 0
    x[2, :32] = np.arange(32) - 15.5  # d = 16.5 / 127: many levels near .5
    x[2, 300] = -4 * np.abs(x[2]).max()
    x[3, 10], x[3, 200] = -50.0, 50.0
    x[3, 300:304] = [1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 1 + 2.0 ** -8, 70000.0]
    return x


@pytest.mark.parametrize("act", ROUNDINGS, ids=lambda t: t.name)
def test_round_act_gives_the_cpus_activations(act, dev):
    """The activations the CPU's products over a type with this `activation_type` see
    (`kernels.round_activations`, pinned against ggml), bit for bit, in place too."""
    from gguflab.runner.kernels import round_activations

    x = _hard_rows(np.random.default_rng(4))
    code = K.round_code(act)
    px, py = dev.upload(x), dev.alloc(x.nbytes)
    with np.errstate(over="ignore"):  # 70000 is inf in fp16, as intended
        want = round_activations(x, act)
        dev.launch("round_act", x.size // K.round_group(code), px, py, code)
        np.testing.assert_array_equal(_f32(dev, py, x.shape), want)
        dev.launch("round_act", x.size // K.round_group(code), px, px, code)  # in place
        np.testing.assert_array_equal(_f32(dev, px, x.shape), want)


@pytest.mark.parametrize("act", ROUNDINGS, ids=lambda t: t.name)
def test_kernels_that_also_write_their_output_rounded(act, dev):
    """rms_norm_round, add_rms_norm_round and silu_mul_round write what their plain
    versions write, and beside it that output as the CPU's products would round it."""
    from gguflab.runner.kernels import round_activations

    rng = np.random.default_rng(7)
    rows, n = 3, 512
    x = (rng.standard_normal((rows, n)) * 3).astype(np.float32)
    a = rng.standard_normal((rows, n)).astype(np.float32)
    w = rng.standard_normal(n).astype(np.float32)
    code = K.round_code(act)

    def rounded(v):
        return round_activations(v, act)

    pw, py, pq = dev.upload(w), dev.alloc(x.nbytes), dev.alloc(x.nbytes)
    dev.launch("rms_norm", rows, dev.upload(x), pw, py, n, 1e-5)
    y = _f32(dev, py, x.shape)
    dev.launch("rms_norm_round", rows, dev.upload(x), pw, py, pq, code, n, 1e-5)
    np.testing.assert_array_equal(_f32(dev, py, x.shape), y)
    np.testing.assert_array_equal(_f32(dev, pq, x.shape), rounded(y))

    px, pa = dev.upload(x), dev.upload(a)
    dev.launch("add_rms_norm", rows, px, pa, pw, py, n, 1e-5)
    y = _f32(dev, py, x.shape)
    px = dev.upload(x)
    dev.launch("add_rms_norm_round", rows, px, pa, pw, py, pq, code, n, 1e-5)
    np.testing.assert_array_equal(_f32(dev, px, x.shape), x + a)
    np.testing.assert_array_equal(_f32(dev, py, x.shape), y)
    np.testing.assert_array_equal(_f32(dev, pq, x.shape), rounded(y))

    dev.launch("silu_mul", x.size, dev.upload(x), pa, py)
    y = _f32(dev, py, x.shape)
    pg = dev.upload(x)
    # in place, as the FFN runs it, over all rows at once (a prompt's)
    dev.launch("silu_mul_round", x.size // K.round_group(code), pg, pa, pg, pq, code)
    np.testing.assert_array_equal(_f32(dev, pg, x.shape), y)
    np.testing.assert_array_equal(_f32(dev, pq, x.shape), rounded(y))


def test_kv_store_writes_f16_rows_at_the_device_position(dev):
    rng = np.random.default_rng(6)
    row, n_ctx, p0, n = 24, 10, 6, 3
    x = rng.standard_normal((n, row)).astype(np.float32)
    pc = dev.upload(np.full((n_ctx, row), 7, np.float16))
    dev.launch("kv_store", x.size, dev.upload(x), pc, dev.upload(np.array([p0], np.int64)),
               row)
    want = np.full((n_ctx, row), 7, np.float16)
    want[p0:p0 + n] = x.astype(np.float16)
    got = dev.read(pc, np.empty((n_ctx, row), np.float16))
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


def test_f16_conversions_round_like_numpy(dev):
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.standard_normal(1000).astype(np.float32) * 100,
                        np.float32([65504, 65520, 1e-7, -0.0, np.inf])])
    px, ph, pf = dev.upload(x), dev.alloc(2 * x.size), dev.alloc(4 * x.size)
    dev.launch("kv_store", x.size, px, ph, dev.upload(np.zeros(1, np.int64)), x.size)
    h = dev.read(ph, np.empty(x.size, np.float16))
    with np.errstate(over="ignore"):  # 65520 rounds to inf, as intended
        want = x.astype(np.float16)
    np.testing.assert_array_equal(h.view(np.uint16), want.view(np.uint16))
    dev.launch("f16_to_f32", x.size, ph, pf)
    np.testing.assert_array_equal(_f32(dev, pf, x.shape), h.astype(np.float32))


def _rope_ref(x, pos, d, base, neox):
    inv = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    ang = pos[:, None, None] * inv[None, None, :]
    cos, sin = np.cos(ang), np.sin(ang)
    out = x.astype(np.float64).copy()
    if neox:
        a, b = x[..., : d // 2], x[..., d // 2: d]
        out[..., : d // 2], out[..., d // 2: d] = a * cos - b * sin, a * sin + b * cos
    else:
        a, b = x[..., 0:d:2], x[..., 1:d:2]
        out[..., 0:d:2], out[..., 1:d:2] = a * cos - b * sin, a * sin + b * cos
    return out


@pytest.mark.parametrize("neox", [False, True], ids=["normal", "neox"])
def test_rope_matches_numpy(neox, dev):
    rng = np.random.default_rng(3)
    n_tok, n_head, hd, rope_dim, p0, base = 3, 4, 16, 12, 5, 10000.0
    x = rng.standard_normal((n_tok, n_head, hd)).astype(np.float32)
    half = rope_dim // 2
    inv = base ** (-np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim)
    ang = np.arange(16)[:, None] * inv[None, :]
    table = np.stack([np.cos(ang), np.sin(ang)], -1).astype(np.float32)
    px = dev.upload(x)
    dev.launch("rope_neox" if neox else "rope_normal", n_tok * n_head * half, px,
               dev.upload(table), dev.upload(np.array([p0], np.int64)), n_head, hd, half)
    ref = _rope_ref(x, np.arange(p0, p0 + n_tok), rope_dim, base, neox)
    np.testing.assert_allclose(_f32(dev, px, x.shape), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window, cap", [(0, 0.0), (6, 0.0), (0, 5.0), (6, 5.0)],
                         ids=["full", "window", "softcap", "window+softcap"])
@pytest.mark.parametrize("n_tok, p0", [(1, 0), (1, 40), (7, 0), (5, 20)])
def test_attention_over_the_f16_cache_matches_numpy(n_tok, p0, window, cap, dev):
    """One query (decode) and a batch (prompt), causal, with grouped-query heads; a sliding
    window (Gemma's local layers: the last `window` positions) and a soft-cap on the scores."""
    rng = np.random.default_rng(n_tok * 100 + p0)
    n_head, n_kv, hd, n_ctx = 6, 2, 32, 64
    T = p0 + n_tok
    q = rng.standard_normal((n_tok, n_head, hd)).astype(np.float32)
    kc = np.zeros((n_ctx, n_kv, hd), np.float16)
    vc = np.zeros((n_ctx, n_kv, hd), np.float16)
    kc[:T] = rng.standard_normal((T, n_kv, hd)) * 2
    vc[:T] = rng.standard_normal((T, n_kv, hd))
    po = dev.alloc(q.nbytes)
    scale = float(np.float32(1 / np.sqrt(hd)))
    dev.launch("attention", n_tok * n_head, dev.upload(q), dev.upload(kc), dev.upload(vc), po,
               n_head, n_kv, hd, dev.upload(np.array([p0], np.int64)), scale, window, cap)
    k64, v64 = kc[:T].astype(np.float64), vc[:T].astype(np.float64)
    ref = np.empty((n_tok, n_head, hd))
    for t in range(n_tok):
        first = max(0, p0 + t - window + 1) if window else 0
        for h in range(n_head):
            g = h // (n_head // n_kv)
            s = k64[first: p0 + t + 1, g] @ q[t, h] * scale
            if cap:
                s = np.tanh(s / cap) * cap
            p = np.exp(s - s.max())
            ref[t, h] = p @ v64[first: p0 + t + 1, g] / p.sum()
    np.testing.assert_allclose(_f32(dev, po, q.shape), ref, rtol=1e-4, atol=1e-5)


def test_gelu_mul_is_ggml_s_table_times_up(dev):
    """The device's GeGLU against ggml's CPU GELU table (read out of libggml-cpu) at every
    fp16 input: its tanh comes from exp, rounded as tanhf's float is; measured 3 of 37,376
    entries one fp16 step off."""
    from ggml_oracle import ggml_gelu_table

    table = ggml_gelu_table()
    f = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    g = f.astype(np.float32)
    inside = np.isfinite(g) & (g > -10) & (g < 10)
    g = np.concatenate([g[inside], [-12, -10, 10, 15]]).astype(np.float32)
    u = np.full(g.size, 1.0, np.float32)
    py = dev.alloc(g.nbytes)
    dev.launch("gelu_mul", g.size, dev.upload(g), dev.upload(u), py)
    got = _f32(dev, py, g.shape)
    assert list(got[-4:]) == [0, 0, 10, 15]  # outside (-10, 10): 0 or x
    assert (got[:-4].astype(np.float16).view(np.uint16) != table[inside]).sum() <= 4


# -- the offloaded forward pass on the host device ------------------------------------------

N_LAYER = 4


@pytest.fixture(scope="module")
def tiny_model(module_tmp) -> Model:
    path = module_tmp("cuda-fwd") / "tiny.gguf"
    return Model(write_synthetic_llama(path, SynthConfig(
        n_layer=N_LAYER, n_embd=128, n_ff=256, n_head=4, n_head_kv=2, n_vocab=160)))


def _greedy(forward, prompt, steps, tokens=None):
    """Prompt logits (all positions), then `steps` tokens with the logits after each: greedy,
    or `tokens` teacher-forced (a reference run's, so that a near-tie cannot send two runs
    down different texts and every step compares the same inputs)."""
    logits = forward(prompt, True)
    toks, step_logits = [], []
    nxt = int(np.argmax(logits[-1]))
    for i in range(steps):
        if tokens is not None:
            nxt = tokens[i]
        toks.append(nxt)
        lg = forward([nxt], False)
        step_logits.append(lg)
        nxt = int(np.argmax(lg))
    return logits, toks, np.array(step_logits)


def _assert_prompt_logits_match(got: np.ndarray, ref: np.ndarray) -> None:
    """A prompt's logits (n, n_vocab) against the CPU's: the first token attends to itself
    alone (the same products, the same numbers: FLOAT_ORDER), the others through the CPU's
    fp16 flash attention (FP16_ATTN)."""
    scale = np.abs(ref).max()
    np.testing.assert_allclose(got[0], ref[0], atol=FLOAT_ORDER * scale, rtol=0)
    np.testing.assert_allclose(got, ref, atol=FP16_ATTN * scale, rtol=0)


@pytest.mark.parametrize("ngl", [0, N_LAYER // 2, N_LAYER, 999])
def test_forward_offloaded_on_the_host_device_matches_model_forward(ngl, tiny_model):
    m, prompt, n_ctx = tiny_model, [3, 17, 42, 99, 5, 8, 120], 32
    cpu_cache = m.new_cache(n_ctx)
    ref = _greedy(lambda t, a: m.forward(t, cpu_cache, all_logits=a), prompt, 4)
    layers, output = placement(m.hp.n_layer, ngl)
    gpu = GpuLayers(m, layers, n_ctx, HostDevice(), output=output) if ngl else None
    cache = m.new_cache(n_ctx)
    got = _greedy(lambda t, a: forward_offloaded(m, gpu, t, cache, all_logits=a), prompt, 4,
                  ref[1])
    noise = FP16_ATTN * np.abs(ref[0]).max()
    assert_same_top1_where_clear(ref[0], got[0], noise)
    assert_same_top1_where_clear(ref[2], got[2], noise)
    assert cache.n == cpu_cache.n == len(prompt) + 4
    if gpu is not None:  # every offloaded layer's weights went to the device, once
        per_layer = sum(w.data.nbytes for w in (
            m.layers[0].wq, m.layers[0].wk, m.layers[0].wv, m.layers[0].wo,
            m.layers[0].w_gate, m.layers[0].w_up, m.layers[0].w_down))
        assert gpu.bytes_uploaded >= len(layers) * per_layer


@pytest.fixture(scope="module")
def quantized_models(module_tmp) -> dict[str, Model]:
    """A tiny llama of 256-wide rows (K-quant blocks) as Q4_0 and Q8_0 (their products read
    Q8_0-rounded activations), Q4_K_M and Q5_K_S (Q8_K-rounded)."""
    from gguflab.quant.mixes import parse_mix
    from gguflab.quant.pipeline import QuantizeOptions, quantize_model

    d = module_tmp("cuda-quant")
    src = write_synthetic_llama(d / "f16.gguf", SynthConfig(
        n_layer=3, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_vocab=256))
    out = {}
    for mix in ("Q4_0", "Q8_0", "Q4_K_M", "Q5_K_S"):
        for _ in quantize_model(src, d / f"{mix}.gguf", parse_mix(mix), QuantizeOptions()):
            pass
        out[mix] = Model(d / f"{mix}.gguf")
    return out


@pytest.mark.parametrize("mix", ["Q4_0", "Q8_0", "Q4_K_M", "Q5_K_S"])
def test_offloaded_decode_of_quantized_weights_matches_the_cpu(mix, quantized_models):
    """Every product rounds its input as the CPU's does (Q8_0 or Q8_K activations here), the
    prompt's as the decode steps'. Teacher-forced on the CPU's greedy tokens: the logits
    agree to float order where attention is exact (the first token), elsewhere to one Q8
    level (Q8_LEVEL), and the top-1 token wherever the margin is above that."""
    m, prompt, n_ctx = quantized_models[mix], [3, 17, 42, 99, 5, 8, 120], 32
    cpu_cache = m.new_cache(n_ctx)
    ref = _greedy(lambda t, a: m.forward(t, cpu_cache, all_logits=a), prompt, 6)
    gpu = GpuLayers(m, [0, 1, 2], n_ctx, HostDevice(), output=True)
    cache = m.new_cache(n_ctx)
    got = _greedy(lambda t, a: forward_offloaded(m, gpu, t, cache, all_logits=a), prompt, 6,
                  ref[1])
    scale = np.abs(ref[0]).max()
    weights = [m.output, *(w for L in m.layers for w in vars(L).values() if hasattr(w, "type"))]
    assert all(round_code(w.type) in (K.ROUND_Q8, K.ROUND_Q8_K) for w in weights)
    # the prompt's first token attends to itself alone: the same products, the same numbers
    np.testing.assert_allclose(got[0][0], ref[0][0], atol=FLOAT_ORDER * scale, rtol=0)
    assert_same_top1_where_clear(ref[0], got[0], Q8_LEVEL * scale)  # the prompt
    assert_same_top1_where_clear(ref[2], got[2], Q8_LEVEL * scale)  # the decode steps
    # measured at most 6e-5
    assert kld(ref[0], got[0]).max() < 5e-4 and kld(ref[2], got[2]).max() < 5e-4


def _q8_1_offset_bound(raw: np.ndarray, t: GGMLType, x: np.ndarray) -> np.ndarray:
    """The one difference the float form of x allows, per (token, row), for Q4_1/Q5_1: the
    CPU's integer products add m * s per block with s = fp16(d * sum(levels)) (d before its
    fp16 rounding), the float form gives m * fp16(d) * sum(levels); 0 for other types."""
    from gguflab.runner.kernels import round_q8

    if t not in (GGMLType.Q4_1, GGMLType.Q5_1):
        return np.zeros((x.shape[0], raw.shape[0]))
    n_in = x.shape[1]
    ng = n_in // 32
    xq = round_q8(x, GGMLType.Q8_1)
    levels = xq[:, :n_in].view(np.int8).reshape(-1, ng, 32).astype(np.float64)
    dx = xq[:, n_in:n_in + 4 * ng].copy().view(np.float32).astype(np.float64)
    xs = xq[:, n_in + 4 * ng:].copy().view(np.float32).astype(np.float64)
    diff = np.abs(xs - dx * levels.sum(-1))  # (n_tok, ng)
    block = raw.reshape(raw.shape[0], ng, -1)  # d, m (fp16) then the quants
    m = block[:, :, 2:4].copy().view(np.float16).reshape(raw.shape[0], ng).astype(np.float64)
    return diff @ np.abs(m).T


@pytest.mark.parametrize("t", [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1,
                               GGMLType.Q8_0, GGMLType.Q2_K, GGMLType.Q4_K, GGMLType.Q5_K,
                               GGMLType.Q6_K, GGMLType.IQ4_NL, GGMLType.IQ4_XS, GGMLType.IQ2_XXS,
                               GGMLType.MXFP4, GGMLType.F16, GGMLType.BF16, GGMLType.F32],
                         ids=lambda t: t.name)
def test_products_see_the_cpus_activations(t, quantized_models):
    """A product on the device, decode (one token) and prompt (several), x rounded first as
    the weight type's `activation_type` rounds it, against the CPU's `matmul`: float-sum
    noise apart, and for Q4_1/Q5_1 the bounded offset-term difference, the same numbers."""
    from gguflab.runner.kernels import matmul

    rng = np.random.default_rng(int(t))
    raw, _ = _weights(t, 48, 512, rng)
    gpu = GpuLayers(quantized_models["Q8_0"], [], 16, HostDevice())  # 16: a pass's tokens
    dev = gpu.device
    w = DeviceWeight(dev.upload(raw), t, 48, 512, raw.shape[1])
    calls = 0
    for n in (1, 3, K.MATMUL_TOKENS + 1):
        for scale in (0.05, 1.0, 40.0):
            x = (rng.standard_normal((n, 512)) * scale).astype(np.float32)
            want = matmul(raw, t, x)
            px, py = dev.upload(x), dev.alloc(4 * n * 48)
            gpu._matmul(w, px, py, n)
            calls += 1
            got = _f32(dev, py, (n, 48))
            tol = 2e-6 * np.abs(want).max() + _q8_1_offset_bound(raw, t, x)
            assert np.all(np.abs(got - want) <= tol), (n, scale, np.abs(got - want).max())
    rounds = quant.get(t).activation_type != GGMLType.F32
    assert rounds == (round_code(t) is not None)
    assert gpu.launches == calls * (2 if rounds else 1)  # round_act + the product, or it


def test_decode_steps_replay_one_recording(tiny_model, monkeypatch):
    """The first decode step runs directly, the second is recorded, and every later one
    replays that recording (launch count 1): the logits are those of direct launches, at
    every position, because the position is read from device memory."""
    m, prompt, n_ctx = tiny_model, [3, 17, 42, 99, 5], 32
    runs = {}
    for graphs in ("0", "1"):
        monkeypatch.setenv("GGUFLAB_CUDA_GRAPHS", graphs)
        gpu = GpuLayers(m, list(range(N_LAYER)), n_ctx, HostDevice(), output=True)
        assert gpu.graphs == (graphs == "1")
        cache = m.new_cache(n_ctx)
        forward_offloaded(m, gpu, prompt, cache, all_logits=True)
        counts, steps = [], []
        for tok in (7, 8, 9, 10, 11):
            before = gpu.launches
            x = gpu.run(np.full((1, m.hp.n_embd), tok / 100, np.float32), cache.n)
            cache.n += 1
            counts.append(gpu.launches - before)
            steps.append(x)
        runs[graphs] = (counts, np.array(steps))
    direct, replayed = runs["0"][0], runs["1"][0]
    assert len(set(direct)) == 1 and direct[0] > N_LAYER  # the same launches every step
    assert replayed == [direct[0], 1, 1, 1, 1]  # direct, recorded then replayed, replays
    np.testing.assert_array_equal(runs["1"][1], runs["0"][1])


def test_a_decode_step_launches_few_kernels_per_layer(tiny_model, monkeypatch):
    """Q, K, V in one product, gate and up in one, RoPE of q and k in one, residual adds
    fused into the next norm, inputs rounded (to fp16, for F16 weights) by the kernels that
    write them: 12 kernels per layer on F16 weights (norm, QKV, RoPE, two KV stores,
    attention, the rounding of its output, output, add + norm, gate-up, SwiGLU, down), and
    the last add."""
    monkeypatch.setenv("GGUFLAB_CUDA_GRAPHS", "0")
    m = tiny_model
    gpu = GpuLayers(m, list(range(N_LAYER)), 16, HostDevice(), output=True)
    gpu.run(np.ones((1, m.hp.n_embd), np.float32), 0)
    assert all(round_code(w.type) == K.ROUND_F16 for w in (m.layers[0].wq, m.layers[0].wo))
    assert gpu.launches == 12 * N_LAYER + 1


def test_rounded_product_inputs_come_from_the_kernels_that_write_them(quantized_models,
                                                                       monkeypatch):
    """On Q4_0 (every product reads Q8_0-rounded input) the norms and SwiGLU write the
    rounded copy themselves: one extra launch per layer, the round before the attention's
    output product."""
    monkeypatch.setenv("GGUFLAB_CUDA_GRAPHS", "0")
    m = quantized_models["Q4_0"]
    gpu = GpuLayers(m, [0, 1, 2], 16, HostDevice())
    gpu.run(np.ones((1, m.hp.n_embd), np.float32), 0)
    assert gpu.launches == 12 * 3 + 1


def test_the_cpu_cache_holds_only_the_cpu_layers(tiny_model):
    m = tiny_model
    try:
        m.gpu = GpuLayers(m, [2, 3], 16, HostDevice(), output=True)
        cache = m.new_cache(16)
        assert cache.k.shape[0] == 2 and cache.nbytes == m.new_cache(16).nbytes
        m.forward([1, 2, 3], cache)
        m.gpu = GpuLayers(m, [3], 16, HostDevice())
        with pytest.raises(UserError, match="holds 2 layers but the CPU runs 3"):
            m.forward([4], cache)
    finally:
        m.gpu = None
    assert m.new_cache(16).k.shape[0] == N_LAYER


def test_forward_offloaded_with_neox_rope_and_qkv_biases(tmp_path):
    """qwen2's differences from llama (NEOX RoPE, q/k/v biases, a partial rotary dim) on a
    llama file whose Model is given them: the device path must follow the CPU's."""
    from dataclasses import replace

    path = write_synthetic_llama(tmp_path / "q.gguf", SynthConfig(
        n_layer=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, n_vocab=64))
    m = Model(path)
    m.hp = replace(m.hp, rope_neox=True, rope_dim=8)
    m.inv_freq = m.hp.rope_base ** (-np.arange(0, 8, 2, dtype=np.float64) / 8)
    rng = np.random.default_rng(5)
    for L in m.layers:
        L.bq = rng.standard_normal(64).astype(np.float32)
        L.bk = rng.standard_normal(32).astype(np.float32)
        L.bv = rng.standard_normal(32).astype(np.float32)
    prompt = [1, 2, 3, 50, 60]
    ref = m.forward(prompt, m.new_cache(16), all_logits=True)
    gpu = GpuLayers(m, [0, 1], 16, HostDevice(), output=True)
    got = forward_offloaded(m, gpu, prompt, m.new_cache(16), all_logits=True)
    _assert_prompt_logits_match(got, ref)


def test_forward_offloaded_handles_prompts_longer_than_a_device_batch(tiny_model, monkeypatch):
    from gguflab.runner.cuda import layers as L

    monkeypatch.setattr(L, "MAX_BATCH", 3)
    with pytest.raises(UserError, match="4 tokens in one GPU pass: at most 3"):
        GpuLayers(tiny_model, [3], 16, HostDevice()).forward_layers(
            np.zeros((4, tiny_model.hp.n_embd), np.float32), 0)
    m, prompt = tiny_model, list(range(10, 18))
    ref = m.forward(prompt, m.new_cache(16), all_logits=True)
    gpu = GpuLayers(m, [2, 3], 16, HostDevice(), output=True)
    got = forward_offloaded(m, gpu, prompt, m.new_cache(16), all_logits=True)
    _assert_prompt_logits_match(got, ref)


# -- a real GPU -----------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_device_logits_match_the_cpu(tiny_model):
    gpu_info, why = probe_gpu(0)
    if gpu_info is None:
        pytest.skip(f"no GPU: {why}")
    from gguflab.runner.cuda.device import CudaDevice

    m, prompt, n_ctx = tiny_model, [3, 17, 42, 99, 5, 8, 120], 32
    cpu_cache = m.new_cache(n_ctx)
    ref = _greedy(lambda t, a: m.forward(t, cpu_cache, all_logits=a), prompt, 4)
    dev = CudaDevice(0)
    try:
        gpu = GpuLayers(m, list(range(N_LAYER)), n_ctx, dev, output=True)
        cache = m.new_cache(n_ctx)
        got = _greedy(lambda t, a: forward_offloaded(m, gpu, t, cache, all_logits=a), prompt, 4,
                      ref[1])
    finally:
        dev.close()
    # the CPU's fp16 flash attention (FP16_ATTN), and the device's exp and sqrt are the
    # GPU's approximations, not libm's: 10x float order
    noise = (FP16_ATTN + 10 * FLOAT_ORDER) * np.abs(ref[0]).max()
    assert_same_top1_where_clear(ref[0], got[0], noise)
    assert_same_top1_where_clear(ref[2], got[2], noise)  # replayed steps
    assert gpu.graph_error == ""


# -- CudaDevice against a stand-in driver -------------------------------------------------


class FakeDriver(types.ModuleType):
    """`cuda.bindings.driver` as far as CudaDevice uses it: (CUresult, values...) tuples,
    memory in host buffers, modules that must be the PTX holding the asked-for `.entry`, and
    launches that decode the `void**` parameter block and run the host build of that kernel.
    So the device's argument packing, copies and module handling are checked without a GPU."""

    CUdeviceptr = int
    CUstream = int
    CUstreamCaptureMode = types.SimpleNamespace(CU_STREAM_CAPTURE_MODE_THREAD_LOCAL=1)
    CAPTURE_UNSUPPORTED = 900  # CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED
    CUdevice_attribute = types.SimpleNamespace(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR="maj",
                                               CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR="min")

    def __init__(self, fail_alloc_over: int | None = None):
        super().__init__("cuda.bindings.driver")
        self.host = HostDevice()
        self.modules: dict[int, bytes] = {}
        self.launched: list[str] = []
        self.fail_alloc_over = fail_alloc_over
        self.current: dict[int, object] = {}  # thread -> its current context
        self.capturing: list | None = None  # launches recorded on the stream, not run
        self.graphs_launched = 0
        self.streams = 0
        self.copies = 0

    def cuInit(self, flags):
        return (0,)

    def cuDeviceGetCount(self):
        return 0, 1

    def cuDeviceGet(self, i):
        return (0, i) if i == 0 else (101,)  # CUDA_ERROR_INVALID_DEVICE

    def cuDevicePrimaryCtxRetain(self, dev):
        return 0, "ctx"

    def cuDevicePrimaryCtxRelease(self, dev):
        return (0,)

    def cuCtxSetCurrent(self, ctx):
        self.current[threading.get_ident()] = ctx
        return (0,)

    def cuCtxSynchronize(self):
        return (0,)

    def cuDeviceGetName(self, n, dev):
        return 0, b"Fake H100".ljust(n, b"\0")

    def cuDeviceGetAttribute(self, attr, dev):
        return 0, 9 if attr == "maj" else 0

    def cuMemGetInfo(self):
        return 0, 80 << 30, 81 << 30

    def cuGetErrorString(self, err):
        return 0, b"out of memory" if int(err) == 2 else b"error"

    def cuModuleLoadData(self, image):
        assert isinstance(image, bytes) and image.endswith(b"\0") and b".target sm_90" in image
        self.modules[len(self.modules)] = image
        return 0, len(self.modules) - 1

    def cuModuleUnload(self, mod):
        return (0,)

    def cuModuleGetFunction(self, mod, name):
        assert b".entry " + name + b"(" in self.modules[mod]
        return 0, name.decode()

    def cuMemAlloc(self, n):
        assert self.current.get(threading.get_ident()) == "ctx", "no current context"
        if self.fail_alloc_over is not None and n > self.fail_alloc_over:
            return (2,)  # CUDA_ERROR_OUT_OF_MEMORY
        return 0, self.host.alloc(n)

    def cuMemFree(self, p):
        return (0,)

    def cuStreamCreate(self, flags):
        self.streams += 1
        return 0, "stream"

    def cuStreamDestroy(self, stream):
        self.streams -= 1
        return (0,)

    def cuStreamSynchronize(self, stream):
        assert stream == "stream"
        return (self.CAPTURE_UNSUPPORTED,) if self.capturing is not None else (0,)

    def cuMemcpyHtoDAsync(self, dst, src, n, stream):
        assert stream == "stream"
        if self.capturing is not None:  # pageable copies cannot be recorded
            return (self.CAPTURE_UNSUPPORTED,)
        self.copies += 1
        ctypes.memmove(int(dst), src, n)
        return (0,)

    def cuMemcpyDtoHAsync(self, dst, src, n, stream):
        assert stream == "stream"
        if self.capturing is not None:
            return (self.CAPTURE_UNSUPPORTED,)
        self.copies += 1
        ctypes.memmove(dst, int(src), n)
        return (0,)

    def cuStreamBeginCapture(self, stream, mode):
        assert stream == "stream" and mode == 1 and self.capturing is None
        self.capturing = []
        return (0,)

    def cuStreamEndCapture(self, stream):
        graph, self.capturing = self.capturing, None
        return 0, graph

    def cuGraphInstantiate(self, graph, flags):
        return 0, tuple(graph)

    def cuGraphDestroy(self, graph):
        return (0,)

    def cuGraphExecDestroy(self, exe):
        return (0,)

    def cuGraphLaunch(self, exe, stream):
        assert stream == "stream" and self.capturing is None
        self.graphs_launched += 1
        for f, n_items, args in exe:
            self.host.launch(f, n_items, *args)
        return (0,)

    def cuLaunchKernel(self, f, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        spec = KERNELS[f][0]
        ptrs = (ctypes.c_void_p * (len(spec.args) + 1)).from_address(params)
        kinds = {"p": ctypes.c_uint64, "i": ctypes.c_int64, "f": ctypes.c_float}
        args = [kinds[k].from_address(p).value for k, p in zip(spec.args, ptrs)]
        n_items = ctypes.c_int64.from_address(ptrs[-1]).value
        assert (gy, gz, by, bz, shared, extra) == (1, 1, 1, 1, 0, 0)
        assert bx % 32 == 0 and gx >= 1 and n_items > 0
        lanes = args[-1] if spec.grouped else spec.lanes  # the grid covers every item
        assert gx * bx >= min(n_items * lanes, MAX_GRID * bx)
        assert stream == "stream"
        self.launched.append(f)
        if self.capturing is not None:  # the parameters are copied when recorded
            self.capturing.append((f, n_items, args))
        else:
            self.host.launch(f, n_items, *args)
        return (0,)


@pytest.fixture
def fake_cuda(monkeypatch):
    driver = FakeDriver()
    install_driver(monkeypatch, driver)
    return driver


def test_cuda_device_through_a_stand_in_driver_matches_the_cpu(fake_cuda, tiny_model):
    from gguflab.runner.cuda.device import CudaDevice

    info, why = probe_gpu(0)
    assert why == "" and (info.name, info.compute_capability) == ("Fake H100", (9, 0))
    assert info.free_bytes == 80 << 30
    assert probe_gpu(1) == (None, "there is no GPU 1 (found 1)")
    m, prompt, n_ctx = tiny_model, [3, 17, 42, 99, 5], 16
    ref = m.forward(prompt, m.new_cache(n_ctx), all_logits=True)
    dev = CudaDevice(0)
    assert (dev.name, dev.sm) == ("Fake H100", "sm_90")
    gpu = GpuLayers(m, [1, 2, 3], n_ctx, dev, output=True)
    got = forward_offloaded(m, gpu, prompt, m.new_cache(n_ctx), all_logits=True)
    dev.close()
    _assert_prompt_logits_match(got, ref)
    assert {"matmul_f16", "attention", "rope_normal", "kv_store"} <= set(fake_cuda.launched)


def test_cuda_device_records_decode_steps_and_replays_them(fake_cuda, tiny_model):
    """Through the stand-in driver: the decode steps after the second are one cuGraphLaunch
    each (no copy or sync is attempted while recording: the driver would refuse), and the
    greedy run equals the CPU's."""
    from gguflab.runner.cuda.device import CudaDevice

    m, prompt, n_ctx = tiny_model, [3, 17, 42, 99, 5, 8, 120], 32
    cpu_cache = m.new_cache(n_ctx)
    ref = _greedy(lambda t, a: m.forward(t, cpu_cache, all_logits=a), prompt, 5)
    dev = CudaDevice(0)
    gpu = GpuLayers(m, list(range(N_LAYER)), n_ctx, dev, output=True)
    cache = m.new_cache(n_ctx)
    got = _greedy(lambda t, a: forward_offloaded(m, gpu, t, cache, all_logits=a), prompt, 5,
                  ref[1])
    assert gpu.graph_error == "" and fake_cuda.graphs_launched == 4
    assert_same_top1_where_clear(ref[2], got[2], FP16_ATTN * np.abs(ref[0]).max())
    # a step with every layer and the head on the device: position and x in, logits out,
    # one replay (layers and head are one recording)
    copies, launched = fake_cuda.copies, len(fake_cuda.launched)
    forward_offloaded(m, gpu, [got[1][-1]], cache)
    assert fake_cuda.copies - copies == 3 and fake_cuda.graphs_launched == 5
    assert len(fake_cuda.launched) == launched
    gpu.close()
    dev.close()
    assert fake_cuda.streams == 0


def test_a_device_that_cannot_record_runs_steps_directly(fake_cuda, tiny_model):
    from gguflab.runner.cuda.device import CudaDevice

    fake_cuda.cuStreamBeginCapture = lambda stream, mode: (fake_cuda.CAPTURE_UNSUPPORTED,)
    m, n_ctx = tiny_model, 16
    cpu_cache = m.new_cache(n_ctx)
    ref = _greedy(lambda t, a: m.forward(t, cpu_cache, all_logits=a), [1, 2, 3], 3)
    gpu = GpuLayers(m, list(range(N_LAYER)), n_ctx, CudaDevice(0), output=True)
    cache = m.new_cache(n_ctx)
    got = _greedy(lambda t, a: forward_offloaded(m, gpu, t, cache, all_logits=a), [1, 2, 3], 3,
                  ref[1])
    assert_same_top1_where_clear(ref[2], got[2], FP16_ATTN * np.abs(ref[0]).max())
    assert fake_cuda.graphs_launched == 0
    assert gpu.graph_error.startswith("CUDA error 900") and not gpu.graphs


def test_cuda_device_binds_its_context_in_every_calling_thread(fake_cuda):
    from gguflab.runner.cuda.device import CudaDevice

    dev = CudaDevice(0)
    with ThreadPoolExecutor(1) as pool:  # a UI's worker thread
        p = pool.submit(dev.upload, np.arange(4, dtype=np.float32)).result()
    np.testing.assert_array_equal(dev.read(p, np.empty(4, np.float32)), np.arange(4))
    dev.close()
    dev.close()  # twice is harmless


def test_load_offload_follows_the_plan(fake_cuda, tiny_model):
    from gguflab.runner.cuda.layers import load_offload
    from gguflab.runner.offload import plan_offload

    reader = tiny_model.reader
    assert load_offload(tiny_model, plan_offload(reader, 16, 2, None), 16) is None
    assert load_offload(tiny_model, plan_offload(reader, 16, 0, 1 << 40), 16) is None
    gpu = load_offload(tiny_model, plan_offload(reader, 16, 999, 1 << 40), 16)
    assert gpu.layers == list(range(N_LAYER)) and gpu.output
    assert gpu.device.name == "Fake H100"
    gpu.device.close()


def test_cuda_out_of_memory_is_one_user_error(fake_cuda, tiny_model):
    from gguflab.runner.cuda.device import CudaDevice

    fake_cuda.fail_alloc_over = 1 << 10
    dev = CudaDevice(0)
    with pytest.raises(UserError, match=r"CUDA error 2 \(out of memory\) allocating"):
        GpuLayers(tiny_model, [3], 16, dev)


def test_cuda_device_without_a_driver_library_is_one_user_error(fake_cuda):
    from gguflab.runner.cuda.device import CudaDevice

    def no_libcuda(flags):
        raise RuntimeError('"cuda" is an NVIDIA driver library...\nmore')

    fake_cuda.cuInit = no_libcuda
    with pytest.raises(UserError, match=r"^the CUDA driver is not usable: \"cuda\" is an NVIDIA"
                                        r" driver library\.\.\.$"):
        CudaDevice(0)
