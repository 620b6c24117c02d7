"""GPU offload speed: prompt processing (pp) and generation (tg) in tok/s with -ngl 0, half
the layers, all the layers, and all + the output layer, plus the bytes of weights and KV
cache each generated token reads on the GPU and the bandwidth that implies.

    python bench/gpu.py [-m MODEL.gguf] [--pp 64] [--tg 32] [--profile] [--host]

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--pp", type=int, default=64)
    ap.add_argument("--tg", type=int, default=32)
    ap.add_argument("--main-gpu", type=int, default=0)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--host", action="store_true", help="use the host device (no GPU needed)")
    args = ap.parse_args()

    path = args.model or embedded_model()
    model = Model(path)
    n_ctx = args.pp + args.tg + 8
    info, why = probe_gpu(args.main_gpu)
    if info is None and not args.host:
        print(f"no GPU ({why}): nothing to measure (--host runs the path on the CPU)")
        return 0
    if args.host:
        device, label = HostDevice(), "host device (CPU build of the GPU kernels)"
    else:
        from gguflab.runner.cuda.device import CudaDevice

        device = CudaDevice(args.main_gpu)
        label = f"GPU {args.main_gpu}: {device.name}, {device.sm} PTX"
    device.profile = args.profile
    n = model.hp.n_layer
    rng = np.random.default_rng(0)
    tokens = [int(t) for t in rng.integers(0, model.hp.n_vocab, args.pp)]
    print(f"{os.path.basename(path)}: {n} layers; {label}; pp {args.pp}, tg {args.tg}")
    print(f"{'ngl':>5} | {'pp tok/s':>9} | {'tg tok/s':>9} | {'GPU MiB':>8} | "
          f"{'bytes/token':>12} | {'GPU GB/s':>8}")
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
        print(f"{ngl:>5} | {pp:>9.1f} | {tg:>9.1f} | {uploaded:>8.1f} | "
              f"{per_token:>12,.0f} | {per_token * tg / 1e9:>8.2f}")
        timings = getattr(device, "timings", None)
        if args.profile and timings:
            total = sum(timings.values())
            for name, s in sorted(timings.items(), key=lambda kv: -kv[1])[:8]:
                print(f"        {name:<20s} {1e3 * s:8.1f} ms  {100 * s / total:5.1f} %")
    device.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
