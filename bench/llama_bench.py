"""`gguflab bench` vs llama-bench on the same files, the same tests (-p, -n), threads and
repetitions: both tools' t/s (mean ± stddev over the repetitions, as each prints it) and
the ratio (ours / llama.cpp: above 1.0 means we are faster), from one run of each.

    python bench/llama_bench.py [-m FILE ...] [-p 512] [-n 128] [-t 2] [-r 3] [--synth-1b]

Without -m: SmolLM2-135M (the embedded one, requantized by llama.cpp to F16, then Q8_0 and
Q4_K_M by gguflab); --synth-1b adds a synthetic ~1B llama-shaped model in Q4_K_M.
llama-bench is the one the tests use (.venv/oracle/build/bin, or $GGUFLAB_LLAMA_TOOLS).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

from models import bench_models  # noqa: E402

from gguflab.benchmark import BenchParams, TestResult, parse_int_range, run_bench  # noqa: E402
from gguflab.jit.parallel import default_threads  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
LLAMA_BENCH = os.path.join(os.environ.get("GGUFLAB_LLAMA_TOOLS",
                                          os.path.join(ROOT, ".venv", "oracle", "build", "bin")),
                           "llama-bench")


def llama_bench(path: str, p: str, n: str, threads: int, reps: int) -> list[dict]:
    cmd = [LLAMA_BENCH, "-m", path, "-p", p, "-n", n, "-t", str(threads), "-r", str(reps),
           "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", action="append", default=[])
    ap.add_argument("-p", default="512")
    ap.add_argument("-n", default="128")
    ap.add_argument("-t", "--threads", type=int, default=default_threads())
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("--synth-1b", action="store_true")
    args = ap.parse_args()
    if not os.path.exists(LLAMA_BENCH):
        sys.exit(f"{LLAMA_BENCH} is not built: run `make test` once")
    with tempfile.TemporaryDirectory() as tmp:
        models = [(os.path.basename(m), m) for m in args.model]
        models += bench_models(tmp, args.threads, args.synth_1b, smol=not models)
        print(f"{args.threads} threads, {args.repetitions} repetitions; t/s as each tool "
              f"prints it (mean ± stddev); ratio = gguflab / llama.cpp")
        w = max(24, *(len(name) for name, _ in models))
        print(f"| {'model':{w}s} | {'test':>8s} | {'gguflab t/s':>17s} | {'llama.cpp t/s':>17s} "
              f"| {'ratio':>5s} |")
        print(f"| {'-' * w} | {'-' * 7}: | {'-' * 16}: | {'-' * 16}: | {'-' * 4}: |")
        for name, path in models:
            theirs = llama_bench(path, args.p, args.n, args.threads, args.repetitions)
            ours: list[TestResult] = []
            run_bench(BenchParams(models=[path], n_prompt=parse_int_range("-p", args.p),
                                  n_gen=parse_int_range("-n", args.n),
                                  n_threads=[args.threads], reps=args.repetitions), ours.append)
            for o, t in zip(ours, theirs):
                assert (o.inst.n_prompt, o.inst.n_gen) == (t["n_prompt"], t["n_gen"])
                mine = f"{o.avg_ts:.2f} ± {o.stddev_ts:.2f}"
                ref = f"{t['avg_ts']:.2f} ± {t['stddev_ts']:.2f}"
                print(f"| {name:{w}s} | {o.inst.name:>8s} | {mine:>17s} | {ref:>17s} "
                      f"| {o.avg_ts / t['avg_ts']:5.2f} |", flush=True)


if __name__ == "__main__":
    main()
