"""`gguflab bench`: llama-bench's speed test on gguflab's runner, with its flags, its test
matrix and its output (the markdown table, json, jsonl, csv).

A test is pp N (N prompt tokens in batches of -b from an empty cache), tg N (N tokens one at
a time) or pp N+tg M (both, timed together). Each runs once to warm up (the whole prompt,
or one generated token) and then -r times; a repetition's tokens per second is its token
count over its time, and the table shows their mean ± their sample standard deviation, as
llama-bench computes them."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import UserError
from .gguf import GGUFReader, Keys, LlamaFileType

DEFAULT_N_PROMPT = [512]
DEFAULT_N_GEN = [128]
DEFAULT_N_BATCH = 2048
N_UBATCH = 512  # llama-bench's default; our runner has no micro-batches: reported as such
OUTPUTS = ("md", "json", "jsonl", "csv")

_RANGE = re.compile(r"(-?\d+)(?:-(\d+)(?:([+*])(\d+))?)?(?:,|$)")
_RANGE_POS = re.compile(r"(\d+)(?:-(\d+)(?:([+*])(\d+))?)?(?:,|$)")


def parse_int_range(flag: str, text: str, allow_negative: bool = False) -> list[int]:
    """llama-bench's integer lists: `first[-last[(+|*)step]]`, comma separated
    (`-p 128,512`, `-t 1-4`, `-p 64-512*2`)."""
    rx = _RANGE if allow_negative else _RANGE_POS
    out: list[int] = []
    at = 0
    while at < len(text):
        m = rx.match(text, at)
        if m is None or m.end() == at:
            raise UserError(f"{flag} {text!r}: expected numbers like 512, 128,512 or 1-8*2")
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) else first
        op, step = m.group(3) or "+", int(m.group(4)) if m.group(4) else 1
        i = first
        while i <= last:
            out.append(i)
            nxt = i + step if op == "+" else i * step
            if nxt <= i:
                raise UserError(f"{flag} {text!r}: the range does not grow")
            i = nxt
        at = m.end()
    if not out:
        raise UserError(f"{flag} {text!r}: no values")
    return out


@dataclass
class BenchParams:
    """The command line, lists expanded (repeated flags add to a list, as llama-bench's)."""

    models: list[str]
    n_prompt: list[int] = field(default_factory=lambda: list(DEFAULT_N_PROMPT))
    n_gen: list[int] = field(default_factory=lambda: list(DEFAULT_N_GEN))
    n_pg: list[tuple[int, int]] = field(default_factory=list)
    n_batch: list[int] = field(default_factory=lambda: [DEFAULT_N_BATCH])
    n_threads: list[int] = field(default_factory=list)  # empty: all cores
    n_gpu_layers: list[int] = field(default_factory=lambda: [0])
    reps: int = 5
    no_warmup: bool = False
    output: str = "md"
    main_gpu: int = 0

    def check(self) -> None:
        if self.output not in OUTPUTS:
            raise UserError(f"-o {self.output}: one of {', '.join(OUTPUTS)}")
        if self.reps < 1:
            raise UserError(f"-r {self.reps}: give 1 or more repetitions")
        for flag, vals in (("-p", self.n_prompt), ("-n", self.n_gen), ("-b", self.n_batch),
                           ("-t", self.n_threads)):
            low = 1 if flag in ("-b", "-t") else 0
            bad = [v for v in vals if v < low]
            if bad:
                raise UserError(f"{flag} {bad[0]}: give {low} or more")
        for pp, tg in self.n_pg:
            if pp < 0 or tg < 0:
                raise UserError(f"-pg {pp},{tg}: give counts of 0 or more")
        for m in self.models:
            if not os.path.isfile(m):
                raise UserError(f"{m}: no such file")


@dataclass(frozen=True)
class Instance:
    """One test of the matrix."""

    model: str
    n_prompt: int
    n_gen: int
    n_batch: int
    n_threads: int
    n_gpu_layers: int

    @property
    def name(self) -> str:
        if self.n_prompt and not self.n_gen:
            return f"pp{self.n_prompt}"
        if self.n_gen and not self.n_prompt:
            return f"tg{self.n_gen}"
        return f"pp{self.n_prompt}+tg{self.n_gen}"


def instances(p: BenchParams) -> list[Instance]:
    """The tests in llama-bench's order: per model, GPU layers, batch size and threads,
    the pp tests, then tg, then pp+tg (zero counts left out)."""
    from .jit.parallel import default_threads

    threads = p.n_threads or [default_threads()]
    out = []
    for m in p.models:
        for ngl in p.n_gpu_layers:
            for nb in p.n_batch:
                for nt in threads:
                    out += [Instance(m, n, 0, nb, nt, ngl) for n in p.n_prompt if n]
                    out += [Instance(m, 0, n, nb, nt, ngl) for n in p.n_gen if n]
                    out += [Instance(m, a, b, nb, nt, ngl) for a, b in p.n_pg if a or b]
    return out


# -- what llama.cpp says of a model ---------------------------------------------------------

_FTYPE_NAMES = {
    "ALL_F32": "all F32", "MOSTLY_MXFP4_MOE": "MXFP4 MoE",
    "MOSTLY_Q2_K": "Q2_K - Medium", "MOSTLY_Q2_K_S": "Q2_K - Small",
    "MOSTLY_Q3_K_S": "Q3_K - Small", "MOSTLY_Q3_K_M": "Q3_K - Medium",
    "MOSTLY_Q3_K_L": "Q3_K - Large", "MOSTLY_Q4_K_S": "Q4_K - Small",
    "MOSTLY_Q4_K_M": "Q4_K - Medium", "MOSTLY_Q5_K_S": "Q5_K - Small",
    "MOSTLY_Q5_K_M": "Q5_K - Medium", "MOSTLY_TQ1_0": "TQ1_0 - 1.69 bpw ternary",
    "MOSTLY_TQ2_0": "TQ2_0 - 2.06 bpw ternary", "MOSTLY_IQ2_XXS": "IQ2_XXS - 2.0625 bpw",
    "MOSTLY_IQ2_XS": "IQ2_XS - 2.3125 bpw", "MOSTLY_IQ2_S": "IQ2_S - 2.5 bpw",
    "MOSTLY_IQ2_M": "IQ2_M - 2.7 bpw", "MOSTLY_IQ3_XS": "IQ3_XS - 3.3 bpw",
    "MOSTLY_IQ3_XXS": "IQ3_XXS - 3.0625 bpw", "MOSTLY_IQ1_S": "IQ1_S - 1.5625 bpw",
    "MOSTLY_IQ1_M": "IQ1_M - 1.75 bpw", "MOSTLY_IQ4_NL": "IQ4_NL - 4.5 bpw",
    "MOSTLY_IQ4_XS": "IQ4_XS - 4.25 bpw", "MOSTLY_IQ3_S": "IQ3_S - 3.4375 bpw",
    "MOSTLY_IQ3_M": "IQ3_S mix - 3.66 bpw",
}

# llama.cpp's size label of a llama-architecture model by its layer count (src/models/llama.cpp)
_LLAMA_SIZES = {16: "1B", 22: "1B", 26: "3B", 28: "3B", 30: "256M", 36: "8B", 40: "13B",
                48: "34B", 60: "30B"}


def ftype_name(ftype: int) -> str:
    """llama.cpp's `llama_ftype_name`: "Q4_K - Medium", "F16", "(guessed) Q8_0"."""
    guessed = bool(ftype & LlamaFileType.GUESSED)
    try:
        key = LlamaFileType(ftype & ~LlamaFileType.GUESSED).name
        name = _FTYPE_NAMES.get(key, key.removeprefix("MOSTLY_"))
    except ValueError:
        name = "unknown, may not work"
    return f"(guessed) {name}" if guessed else name


def _size_label(r: GGUFReader, arch: str) -> str:
    n_layer = r.arch_get(Keys.BLOCK_COUNT, 0)
    if arch != "llama" or r.arch_get(Keys.EXPERT_COUNT, 0):
        return "?B"
    if n_layer == 32:
        tokens = r.get(Keys.TOKENS)
        n_vocab = r.arch_get(Keys.VOCAB_SIZE, 0) or (len(tokens) if tokens is not None else 0)
        return "3B" if n_vocab == 49152 else ("7B" if n_vocab < 40000 else "8B")
    if n_layer == 80:
        same = r.arch_get(Keys.HEAD_COUNT) == r.arch_get(Keys.HEAD_COUNT_KV)
        return "65B" if same else "70B"
    return _LLAMA_SIZES.get(n_layer, "?B")


@dataclass(frozen=True)
class ModelFacts:
    type: str  # llama_model_desc: "llama 1B Q4_K - Medium"
    size: int  # bytes of the tensors
    n_params: int

    @classmethod
    def of(cls, r: GGUFReader) -> ModelFacts:
        size = n_params = 0
        counts: dict[int, int] = {}
        for t in r.tensors:
            n = t.n_elements
            n_params += n
            size += n // t.info.block_size * t.info.type_size
            counts[int(t.type)] = counts.get(int(t.type), 0) + 1
        ftype = r.get(Keys.FILE_TYPE)
        if ftype is None:  # llama.cpp guesses from the most common tensor type
            ftype = _guess_ftype(max(counts, key=counts.get) if counts else 0)
        arch = r.architecture or "unknown"
        return cls(f"{arch} {_size_label(r, arch)} {ftype_name(int(ftype))}", size, n_params)


def _guess_ftype(ggml_type: int) -> int:
    from .gguf import GGMLType

    name = GGMLType(ggml_type).name
    table = {"F32": "ALL_F32", "Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_M",
             "Q4_K": "MOSTLY_Q4_K_M", "Q5_K": "MOSTLY_Q5_K_M"}
    key = table.get(name, f"MOSTLY_{name}")
    try:
        return int(LlamaFileType[key]) | LlamaFileType.GUESSED
    except KeyError:
        return -1


# -- running the tests ----------------------------------------------------------------------


@dataclass
class TestResult:
    inst: Instance
    model: ModelFacts
    backend: str
    gpu_info: str
    test_time: str
    samples_ns: list[int] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return self.inst.n_prompt + self.inst.n_gen

    @property
    def samples_ts(self) -> list[float]:
        return [1e9 * self.n_tokens / t for t in self.samples_ns]

    @property
    def avg_ns(self) -> int:
        return sum(self.samples_ns) // len(self.samples_ns) if self.samples_ns else 0

    @property
    def stddev_ns(self) -> int:
        return _stdev_u64(self.samples_ns)

    @property
    def avg_ts(self) -> float:
        ts = self.samples_ts
        return sum(ts) / len(ts) if ts else 0.0

    @property
    def stddev_ts(self) -> float:
        return _stdev(self.samples_ts)


def _stdev(v: list[float]) -> float:
    """llama-bench's sample standard deviation: sqrt(sum x^2/(n-1) - mean^2 n/(n-1))."""
    if len(v) <= 1:
        return 0.0
    n = len(v)
    mean = sum(v) / n
    sq = sum(x * x for x in v)
    return max(0.0, sq / (n - 1) - mean * mean * n / (n - 1)) ** 0.5


def _stdev_u64(v: list[int]) -> int:
    """The same in llama-bench's unsigned 64-bit integers (integer divisions, wrap-around)."""
    if len(v) <= 1:
        return 0
    mask = (1 << 64) - 1
    n = len(v)
    mean = (sum(v) & mask) // n
    sq = sum(x * x for x in v) & mask
    d = (sq // (n - 1) - ((mean * mean & mask) * n & mask) // (n - 1)) & mask
    return int(float(d) ** 0.5)


class _Runner:
    """A loaded model and how to feed it llama-bench's random tokens."""

    def __init__(self, path: str, n_ctx: int, ngl: int, main_gpu: int):
        from .runner.load import load_model

        ask: int | str = 999 if ngl < 0 else ngl  # llama-bench's -1: every layer
        lm = load_model(path, n_ctx, ask, None, main_gpu)
        self.model, self.n_ctx, self.plan = lm.model, lm.n_ctx, lm.plan
        self.n_vocab = lm.model.hp.n_vocab
        self.bos = lm.tokenizer.bos_id if lm.tokenizer.add_bos else None
        self.rand = random.Random(1)  # llama-bench's std::rand, unseeded: seed 1
        self.facts = ModelFacts.of(lm.model.reader)
        on_gpu = self.plan is not None and self.plan.on_gpu
        self.backend = "CUDA" if on_gpu else "CPU"
        self.gpu_info = self.plan.gpu_name if on_gpu else ""

    def _token(self) -> int:
        return self.rand.randrange(self.n_vocab)

    def prompt(self, cache, n_prompt: int, n_batch: int) -> None:
        done = 0
        while done < n_prompt:
            n = min(n_prompt - done, n_batch)
            toks = [self._token() for _ in range(n)]
            if done == 0 and self.bos is not None:
                toks[0] = self.bos
            self.model.forward(toks, cache)
            done += n

    def generate(self, cache, n_gen: int) -> None:
        tok = self.bos if self.bos is not None else self._token()
        for _ in range(n_gen):
            self.model.forward([tok], cache)
            tok = self._token()


def run_bench(p: BenchParams, on_result: Callable[[TestResult], None],
              progress: Callable[[str], None] = lambda s: None) -> list[TestResult]:
    """Run every test of the matrix, handing each result to `on_result` as it is done."""
    from .runner.load import set_kernel_threads

    p.check()
    tests = instances(p)
    results = []
    runner, loaded = None, None
    for k, inst in enumerate(tests, 1):
        key = (inst.model, inst.n_gpu_layers)
        if key != loaded:  # one load per model and offload, as llama-bench keeps its model
            n_ctx = max(t.n_prompt + t.n_gen for t in tests
                        if (t.model, t.n_gpu_layers) == key)
            runner = None
            progress(f"loading {inst.model}" + (f" with -ngl {inst.n_gpu_layers}"
                                                if inst.n_gpu_layers else ""))
            runner = _Runner(inst.model, max(8, n_ctx), inst.n_gpu_layers, p.main_gpu)
            if runner.plan is not None:
                progress(runner.plan.summary())
            loaded = key
        set_kernel_threads(inst.n_threads)
        res = TestResult(inst, runner.facts, runner.backend, runner.gpu_info,
                         time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        tag = f"benchmark {k}/{len(tests)}: {inst.name}, {inst.n_threads} threads"
        size = max(8, inst.n_prompt + inst.n_gen)
        if not p.no_warmup:
            progress(f"{tag}: warm-up")
            cache = runner.model.new_cache(max(8, runner.n_ctx))
            if inst.n_prompt:
                runner.prompt(cache, inst.n_prompt, inst.n_batch)
            if inst.n_gen:
                runner.generate(cache, 1)
        for i in range(p.reps):
            progress(f"{tag}: run {i + 1}/{p.reps}")
            cache = runner.model.new_cache(size)  # an empty cache, made before the clock
            t0 = time.perf_counter_ns()
            if inst.n_prompt:
                runner.prompt(cache, inst.n_prompt, inst.n_batch)
            if inst.n_gen:
                runner.generate(cache, inst.n_gen)
            res.samples_ns.append(time.perf_counter_ns() - t0)
        results.append(res)
        on_result(res)
    return results


# -- output ---------------------------------------------------------------------------------

# llama-bench's json keys that mean something for gguflab, in its order
FIELDS = ["build_commit", "build_number", "cpu_info", "gpu_info", "backends", "model_filename",
          "model_type", "model_size", "model_n_params", "n_batch", "n_ubatch", "n_threads",
          "type_k", "type_v", "n_gpu_layers", "main_gpu", "flash_attn", "n_prompt", "n_gen",
          "n_depth", "test_time", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts"]
_FLOATS = {"avg_ts", "stddev_ts"}


def cpu_info() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def record(r: TestResult, main_gpu: int = 0) -> dict:
    """One test as llama-bench's json object (its keys, its value types)."""
    from . import __version__

    i = r.inst
    d = {"build_commit": f"gguflab-{__version__}", "build_number": 0, "cpu_info": cpu_info(),
         "gpu_info": r.gpu_info, "backends": r.backend, "model_filename": i.model,
         "model_type": r.model.type, "model_size": r.model.size,
         "model_n_params": r.model.n_params, "n_batch": i.n_batch,
         "n_ubatch": min(i.n_batch, N_UBATCH), "n_threads": i.n_threads,
         "type_k": "f32", "type_v": "f32",  # the runner's KV cache holds float32
         "n_gpu_layers": i.n_gpu_layers, "main_gpu": main_gpu, "flash_attn": 0,
         "n_prompt": i.n_prompt, "n_gen": i.n_gen, "n_depth": 0, "test_time": r.test_time,
         "avg_ns": r.avg_ns, "stddev_ns": r.stddev_ns, "avg_ts": r.avg_ts,
         "stddev_ts": r.stddev_ts}
    assert list(d) == FIELDS
    return d


def _json_value(key: str, v) -> str:
    if key in _FLOATS:
        return f"{v:.6f}"  # std::to_string(double)
    return json.dumps(v, ensure_ascii=False)


def _samples(r: TestResult) -> tuple[str, str]:
    return (", ".join(str(t) for t in r.samples_ns),
            ", ".join(f"{t:g}" for t in r.samples_ts))


class Printer:
    """Writes the header, each test as it is done, and the footer, in one of OUTPUTS."""

    def __init__(self, p: BenchParams, out=None):
        self.p, self.out, self.first = p, out or sys.stdout, True
        self.fields: list[str] = []

    def w(self, s: str) -> None:
        self.out.write(s)
        self.out.flush()

    def header(self) -> None:
        fmt = self.p.output
        if fmt == "json":
            self.w("[\n")
        elif fmt == "csv":
            self.w(",".join(FIELDS) + "\n")
        elif fmt == "md":
            self.fields = _md_fields(self.p)
            self.w("|" + "".join(f" {_md_pad(f, _MD_NAMES.get(f, f))} |" for f in self.fields)
                   + "\n")
            self.w("|" + "".join(
                f" {'-' * (abs(_md_width(f)) - 1)}{':' if _md_width(f) > 0 else '-'} |"
                for f in self.fields) + "\n")

    def test(self, r: TestResult) -> None:
        fmt, d = self.p.output, record(r, self.p.main_gpu)
        ns, ts = _samples(r)
        if fmt == "json":
            body = "".join(f'    "{k}": {_json_value(k, v)},\n' for k, v in d.items())
            self.w(("" if self.first else ",\n") + "  {\n" + body
                   + f'    "samples_ns": [ {ns} ],\n    "samples_ts": [ {ts} ]\n  }}')
        elif fmt == "jsonl":
            body = "".join(f'"{k}": {_json_value(k, v)}, ' for k, v in d.items())
            self.w("{" + body + f'"samples_ns": [ {ns} ],"samples_ts": [ {ts} ]}}\n')
        elif fmt == "csv":
            buf = io.StringIO()
            csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n").writerow(
                [_json_value(k, v).strip('"') if k in _FLOATS else
                 (str(int(v)) if isinstance(v, bool) else str(v)) for k, v in d.items()])
            self.w(buf.getvalue())
        else:
            self.w("|" + "".join(f" {_md_cell(f, r, d)} |" for f in self.fields) + "\n")
        self.first = False

    def footer(self) -> None:
        from . import __version__

        if self.p.output == "json":
            self.w("\n]\n")
        elif self.p.output == "md":
            self.w(f"\nbuild: gguflab {__version__}\n")


_MD_NAMES = {"n_gpu_layers": "ngl", "n_threads": "threads"}


def _md_width(f: str) -> int:
    """llama-bench's column widths; negative: left-aligned."""
    widths = {"model": -30, "t/s": 20, "size": 10, "params": 10, "n_gpu_layers": 3,
              "n_threads": 7, "n_batch": 7, "test": 15, "backend": -10}
    return widths.get(f, max(len(f), 10))


def _md_pad(f: str, text: str, extra: int = 0) -> str:
    w = _md_width(f)
    return text.ljust(-w + extra) if w < 0 else text.rjust(w + extra)


def _md_fields(p: BenchParams) -> list[str]:
    """model, size, params, backend, then ngl when a GPU was asked for, threads (a CPU
    backend always shows it), the batch size when not the default, test, t/s."""
    f = ["model", "size", "params", "backend"]
    if any(n != 0 for n in p.n_gpu_layers):
        f.append("n_gpu_layers")
    f.append("n_threads")
    if p.n_batch != [DEFAULT_N_BATCH]:
        f.append("n_batch")
    return f + ["test", "t/s"]


def _md_cell(f: str, r: TestResult, d: dict) -> str:
    if f == "model":
        text = r.model.type
    elif f == "size":
        s = r.model.size
        text = f"{s / 2**20:.2f} MiB" if s < 2**30 else f"{s / 2**30:.2f} GiB"
    elif f == "params":
        n = r.model.n_params
        text = f"{n / 1e6:.2f} M" if n < 1e9 else f"{n / 1e9:.2f} B"
    elif f == "backend":
        text = r.backend
    elif f == "test":
        text = r.inst.name
    elif f == "t/s":
        text = f"{r.avg_ts:.2f} ± {r.stddev_ts:.2f}"
    else:
        text = str(d[f])
    return _md_pad(f, text)


def bench(p: BenchParams, out=None, err=None) -> list[TestResult]:
    """The whole command: tests run, results printed as they come; progress on `err`."""
    err = err or sys.stderr
    p.check()
    pr = Printer(p, out)
    pr.header()
    results = run_bench(p, pr.test, lambda s: print(f"gguflab bench: {s}", file=err,
                                                    flush=True))
    pr.footer()
    return results

