"""`gguflab perplexity` vs llama-perplexity on the same files and text: each tool's wall time
for the whole run (start-up included, as a user waits for it), its final estimate, and the
ratio (llama.cpp's time / ours: above 1.0 means we are faster), from `-r` runs of each
taken in turns (the medians, and the ratio of each pair's times: shared machines drift by
tens of percent within minutes, and a pair run back to back sees the same machine).

    python bench/perplexity.py [-m FILE ...] [-c 512] [-t 2] [-r 1] [--chunks N] [-f TEXT]

Without -m: SmolLM2-135M in F16, Q8_0 and Q4_K_M (see models.py) and the shipped Q4_1.
llama-perplexity is the one the tests use (.venv/oracle/build/bin, or $GGUFLAB_LLAMA_TOOLS).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

from models import bench_models  # noqa: E402

from gguflab.catalog import default_eval_text  # noqa: E402
from gguflab.jit.parallel import default_threads  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
TOOLS = os.environ.get("GGUFLAB_LLAMA_TOOLS", os.path.join(ROOT, ".venv", "oracle", "build",
                                                           "bin"))
FINAL = re.compile(r"Final estimate: PPL = ([\d.]+ \+/- [\d.]+)")


def timed(cmd: list[str]) -> tuple[float, str]:
    """(seconds, the final estimate) of one run of `cmd`."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    found = FINAL.search(p.stdout + p.stderr)
    if p.returncode or not found:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return seconds, found[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", action="append", default=[])
    ap.add_argument("-f", "--file", default=default_eval_text())
    ap.add_argument("-c", "--ctx-size", type=int, default=512)
    ap.add_argument("-t", "--threads", type=int, default=default_threads())
    ap.add_argument("--chunks", type=int, default=-1)
    ap.add_argument("-r", "--repetitions", type=int, default=1)
    args = ap.parse_args()
    llama = os.path.join(TOOLS, "llama-perplexity")
    if not os.path.exists(llama):
        sys.exit(f"{llama} is not built: run `make test` once")
    common = ["-f", args.file, "-c", str(args.ctx_size), "-t", str(args.threads),
              "--chunks", str(args.chunks)]
    with tempfile.TemporaryDirectory() as tmp:
        models = [(os.path.basename(m), m) for m in args.model]
        models += bench_models(tmp, args.threads, False, smol=not models, shipped=not models)
        print(f"{args.threads} threads, -c {args.ctx_size}, {os.path.basename(args.file)}; "
              f"{args.repetitions} runs each, medians; ratio = median of llama.cpp's time / gguflab's")
        w = max(24, *(len(name) for name, _ in models))
        print(f"| {'model':{w}s} | {'gguflab':>8s} | {'llama.cpp':>9s} | {'ratio':>5s} | "
              f"{'gguflab PPL':>19s} | {'llama.cpp PPL':>19s} |")
        print(f"| {'-' * w} | {'-' * 7}: | {'-' * 8}: | {'-' * 4}: | {'-' * 18}: | "
              f"{'-' * 18}: |")
        for name, path in models:
            runs = []
            for _ in range(max(1, args.repetitions)):
                ours = timed([sys.executable, "-m", "gguflab", "perplexity", "-m", path,
                              *common])
                theirs = timed([llama, "-m", path, *common])
                runs.append((ours, theirs))
            t_ours = statistics.median(o[0] for o, _ in runs)
            t_theirs = statistics.median(t[0] for _, t in runs)
            ratio = statistics.median(t[0] / o[0] for o, t in runs)
            print(f"| {name:{w}s} | {t_ours:7.1f}s | {t_theirs:8.1f}s | "
                  f"{ratio:5.2f} | {ours[1]:>19s} | {theirs[1]:>19s} |", flush=True)


if __name__ == "__main__":
    main()
