"""Quantize speed: gguflab vs llama.cpp's llama_model_quantize (llama-cpp-python), same
F16 input, same thread count, per mix. Prints MB/s of F16 input and the time ratio
(ours / llama.cpp: below 1.0 means we are faster). Also checks the bytes are equal.

    python bench/quantize.py [--model F16.gguf] [--types Q4_K_M,Q8_0] [--threads 2] [--rss]

Without --model it writes a synthetic LLaMA-shaped F16 model (2048 wide, 8 layers, ~0.8 GB).
--rss also quantizes a synthetic model of a few GB in a child process and prints its peak
resident memory.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from ggml_oracle import llama_quantize  # noqa: E402

from gguflab.quant.mixes import MIXES, parse_mix  # noqa: E402
from gguflab.quant.pipeline import QuantizeOptions, quantize_model  # noqa: E402
from gguflab.synth import SynthConfig, write_synthetic_llama  # noqa: E402

BENCH_MODEL = SynthConfig(n_layer=8, n_embd=2048, n_ff=5632, n_head=16, n_head_kv=4,
                          n_vocab=8192, name="bench-llama")


def _silence_llama():
    """llama.cpp logs every tensor to stderr; keep the table readable."""
    import llama_cpp

    @llama_cpp.llama_log_callback
    def quiet(level, text, user_data):
        pass

    llama_cpp.llama_log_set(quiet, None)
    _silence_llama.keep = quiet


def time_ours(src, dst, name, threads, stats):
    t = time.perf_counter()
    for _ in quantize_model(src, dst, parse_mix(name),
                            QuantizeOptions(overwrite=True, threads=threads, stats=stats)):
        pass
    return time.perf_counter() - t


def time_llama(src, dst, name, threads):
    t = time.perf_counter()
    llama_quantize(src, dst, int(parse_mix(name).ftype), threads=threads)
    return time.perf_counter() - t


def peak_rss(tmp: str, threads: int) -> None:
    big = os.path.join(tmp, "big-f16.gguf")
    cfg = SynthConfig(n_layer=24, n_embd=3072, n_ff=8192, n_head=24, n_head_kv=8,
                      n_vocab=32000, name="big")
    write_synthetic_llama(big, cfg, overwrite=True)
    size = os.path.getsize(big)
    code = ("import sys, resource; from gguflab.cli import main; "
            f"rc = main(['quantize', '-f', '--no-stats', '-t', '{threads}', {big!r}, "
            f"{os.path.join(tmp, 'big-q4.gguf')!r}, 'Q4_K_M']); "
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    peak = [line for line in r.stderr.splitlines() if line.startswith("PEAK")]
    print(f"\npeak RSS quantizing a {size / 2**30:.2f} GiB F16 model to Q4_K_M: "
          f"{int(peak[0].split()[1]) / 1024:.0f} MiB" if peak else r.stderr[-2000:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    # Q2_K_S needs an importance matrix in llama.cpp (and gguflab): not benchmarked
    ap.add_argument("--types", default=",".join(
        m.name for m in MIXES if m.alias_of is None and m.name not in ("COPY", "Q2_K_S")))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rss", action="store_true")
    args = ap.parse_args()
    _silence_llama()
    with tempfile.TemporaryDirectory() as tmp:
        src = args.model
        if src is None:
            src = os.path.join(tmp, "bench-f16.gguf")
            write_synthetic_llama(src, BENCH_MODEL)
        mb = os.path.getsize(src) / 1e6
        print(f"input {src}: {mb:.0f} MB, {args.threads} threads, median of {args.repeat}")
        print(f"{'type':8s} {'llama.cpp':>10s} {'gguflab':>10s} {'ratio':>6s} "
              f"{'+stats':>8s} {'ratio':>6s}  same bytes")
        for name in args.types.split(","):
            ref, ours = os.path.join(tmp, "ref.gguf"), os.path.join(tmp, "ours.gguf")
            tl = statistics.median(time_llama(src, ref, name, args.threads)
                                   for _ in range(args.repeat))
            to = statistics.median(time_ours(src, ours, name, args.threads, False)
                                   for _ in range(args.repeat))
            ts = time_ours(src, ours, name, args.threads, True)
            same = filecmp.cmp(ref, ours, shallow=False)
            print(f"{name:8s} {mb / tl:7.0f} MB/s {mb / to:7.0f} MB/s {to / tl:6.2f} "
                  f"{mb / ts:5.0f} MB/s {ts / tl:6.2f}  {same}", flush=True)
        if args.rss:
            peak_rss(tmp, args.threads)


if __name__ == "__main__":
    main()
