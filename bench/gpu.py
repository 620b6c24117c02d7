"""GPU offload speed: prompt processing (pp) and generation (tg) in tok/s with -ngl 0, half
the layers, all the layers, and all + the output layer, plus the bytes of weights and KV
cache each generated token reads on the GPU and the bandwidth that implies.

    python bench/gpu.py [-m MODEL.gguf | --synthetic 1b TYPE] [--pp 64] [--tg 32]
                        [--profile] [--host]

`--synthetic 1b Q4_K_M` writes a llama-shaped model of 1.2B weights (random, 22 layers of
2048, SmolLM2's shapes scaled up) and quantizes it with gguflab first: a size where the
weights, not the launches, set the speed, and no download is needed.

Then the two yardsticks of the GPU issue, from the same run: the card's copy bandwidth
(a device-to-device copy, read + write) and what tg would be if every token only streamed
its bytes at that rate (`roof`, and tg / roof), and llama.cpp's CPU build
(llama-cpp-python, all cores) on the same file (tg / llama.cpp, above 1 is faster).

Without a GPU it says why and stops; `--host` runs the same offload path on the host device
(the CPU build of the GPU kernels), to check the script itself. `--profile` synchronises
after every kernel and prints where the device time went (slower, but per kernel).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from gguflab.catalog import embedded_model  # noqa: E402
from gguflab.runner.cuda.device import HostDevice  # noqa: E402
from gguflab.runner.cuda.layers import GpuLayers, forward_offloaded  # noqa: E402
from gguflab.runner.model import Model  # noqa: E402
from gguflab.runner.offload import placement, plan_offload, probe_gpu  # noqa: E402


def timed_run(model: Model, gpu: GpuLayers | None, tokens: list[int], tg: int,
              n_ctx: int) -> tuple[float, float]:
    cache = model.new_cache(n_ctx)
    t = time.perf_counter()
    logits = forward_offloaded(model, gpu, tokens, cache)
    pp = len(tokens) / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(tg):
        logits = forward_offloaded(model, gpu, [int(np.argmax(logits))], cache)
    return pp, tg / (time.perf_counter() - t)


def copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """GB/s of a device-to-device copy (bytes read + bytes written), best of 3."""
    cu = device.cu
    a, b = device.alloc(nbytes), device.alloc(nbytes)
    best = 0.0
    for _ in range(3):
        device.synchronize()
        t = time.perf_counter()
        cu.cuMemcpyDtoDAsync(cu.CUdeviceptr(b), cu.CUdeviceptr(a), nbytes, device.stream)
        device.synchronize()
        best = max(best, 2 * nbytes / (time.perf_counter() - t) / 1e9)
    return best


def llama_cpp_cpu(path: str, tokens: list[int]) -> tuple[float, float] | None:
    """llama-cpp-python's (pp, tg) tok/s on the CPU, all cores, or None without it."""
    try:
        from runner import Theirs  # noqa: PLC0415  (bench/runner.py, beside this script)
    except ImportError:
        return None
    return Theirs(path, os.cpu_count()).run(tokens)


SYNTHETIC = {  # llama shapes: TinyLlama's (1.1B) and a 7B's
    "1b": dict(n_layer=22, n_embd=2048, n_ff=5632, n_head=32, n_head_kv=4, n_vocab=32000),
    "7b": dict(n_layer=32, n_embd=4096, n_ff=11008, n_head=32, n_head_kv=32, n_vocab=32000),
}


def synthetic_model(size: str, mix: str, folder: str) -> str:
    """A random llama of `size` quantized as `mix` (kept in `folder` for reruns)."""
    from gguflab.quant.mixes import parse_mix  # noqa: PLC0415
    from gguflab.quant.pipeline import QuantizeOptions, quantize_model  # noqa: PLC0415
    from gguflab.synth import SynthConfig, write_synthetic_llama  # noqa: PLC0415

    os.makedirs(folder, exist_ok=True)
    f16 = os.path.join(folder, f"synth-{size}-f16.gguf")
    out = os.path.join(folder, f"synth-{size}-{mix}.gguf")
    if not os.path.exists(out):
        if not os.path.exists(f16):
            write_synthetic_llama(f16, SynthConfig(name=f"synth-{size}", **SYNTHETIC[size]))
        t = time.perf_counter()
        for _ in quantize_model(f16, out, parse_mix(mix), QuantizeOptions()):
            pass
        print(f"quantized {os.path.basename(out)} in {time.perf_counter() - t:.0f} s")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--pp", type=int, default=64)
    ap.add_argument("--tg", type=int, default=32)
    ap.add_argument("--main-gpu", type=int, default=0)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--host", action="store_true", help="use the host device (no GPU needed)")
    ap.add_argument("--synthetic", nargs=2, metavar=("SIZE", "TYPE"),
                    help=f"a random llama of SIZE ({', '.join(SYNTHETIC)}) as TYPE")
    ap.add_argument("--work", default=os.path.join(os.path.dirname(__file__), ".work"),
                    help="where --synthetic models are kept")
    args = ap.parse_args()

    info, why = probe_gpu(args.main_gpu)
    if info is None and not args.host:
        print(f"no GPU ({why}): nothing to measure (--host runs the path on the CPU)")
        return 0
    if args.synthetic:
        path = synthetic_model(args.synthetic[0], args.synthetic[1], args.work)
    else:
        path = args.model or embedded_model()
    model = Model(path)
    n_ctx = args.pp + args.tg + 8
    if args.host:
        device, label = HostDevice(), "host device (CPU build of the GPU kernels)"
    else:
        from gguflab.runner.cuda.device import CudaDevice

        device = CudaDevice(args.main_gpu)
        label = f"GPU {args.main_gpu}: {device.name}, {device.sm} PTX"
    bandwidth = None if args.host else copy_bandwidth(device)
    device.profile = args.profile
    n = model.hp.n_layer
    rng = np.random.default_rng(0)
    tokens = [int(t) for t in rng.integers(0, model.hp.n_vocab, args.pp)]
    print(f"{os.path.basename(path)}: {n} layers; {label}; pp {args.pp}, tg {args.tg}")
    theirs = llama_cpp_cpu(path, tokens) if not args.host else None
    if bandwidth:
        print(f"device-to-device copy: {bandwidth:.0f} GB/s (read + write)")
    if theirs:
        print(f"llama.cpp CPU ({os.cpu_count()} threads): pp {theirs[0]:.1f} tok/s, "
              f"tg {theirs[1]:.1f} tok/s")
    print(f"{'ngl':>5} | {'pp tok/s':>9} | {'tg tok/s':>9} | {'GPU MiB':>8} | "
          f"{'bytes/token':>12} | {'GPU GB/s':>8} | {'tg/roof':>7} | {'tg/llama':>8} | graph")
    for ngl in sorted({0, n // 2, n, n + 1}):
        layers, output = placement(n, ngl)
        gpu = GpuLayers(model, layers, n_ctx, device, output=output) if ngl else None
        plan = plan_offload(model.reader, n_ctx, ngl, 1 << 50)
        # per generated token the GPU reads its weights once and, on average, half the
        # context of K and V in each of its layers
        kv_read = plan.kv_bytes_per_layer * len(layers) * (args.pp + args.tg / 2) / n_ctx
        per_token = sum(plan.bytes_per_layer[i] for i in layers) + kv_read + (
            plan.output_bytes if output else 0)
        # warm up: kernel compile or PTX JIT, module load, first touch of the buffers
        forward_offloaded(model, gpu, tokens[:4], model.new_cache(n_ctx))
        forward_offloaded(model, gpu, tokens[:1], model.new_cache(n_ctx))
        getattr(device, "timings", {}).clear()
        pp, tg = timed_run(model, gpu, tokens, args.tg, n_ctx)
        uploaded = gpu.bytes_uploaded / (1 << 20) if gpu else 0.0
        roof = bandwidth * 1e9 / per_token if bandwidth and per_token else None
        graph = ("-" if gpu is None else "off: " + gpu.graph_error if gpu.graph_error
                 else "on" if gpu.graphs and not args.profile else "off")
        print(f"{ngl:>5} | {pp:>9.1f} | {tg:>9.1f} | {uploaded:>8.1f} | "
              f"{per_token:>12,.0f} | {per_token * tg / 1e9:>8.2f} | "
              f"{tg / roof if roof else float('nan'):>7.2f} | "
              f"{tg / theirs[1] if theirs else float('nan'):>8.2f} | {graph}")
        timings = getattr(device, "timings", None)
        if args.profile and timings:
            total = sum(timings.values())
            for name, s in sorted(timings.items(), key=lambda kv: -kv[1])[:8]:
                print(f"        {name:<20s} {1e3 * s:8.1f} ms  {100 * s / total:5.1f} %")
    device.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
