"""Perplexity and KL-divergence the way llama-perplexity computes them, so the numbers are
comparable: the text is cut into chunks of n_ctx tokens, each chunk's first token becomes
BOS when the model adds one, and only the second half of each chunk is scored.

KL-divergence streams: the base (llama-perplexity's `--kl-divergence-base` file, see
kldbase.py) is written and read one chunk at a time; only a few floats per scored token are
kept, for llama-perplexity's statistics (percentiles need every token's value)."""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError
from .attention import TILE
from .kldbase import BaseReader, BaseWriter, header, token_nll
from .model import Model
from .ops import kld_sums, max_sum_exp


@dataclass
class PerplexityResult:
    ppl: float
    ppl_err: float
    n_chunks: int
    n_ctx: int
    count: int  # scored tokens
    chunk_ppl: list[float] = field(default_factory=list)  # running estimate after each chunk
    kld: dict | None = None  # with a base: llama-perplexity's statistics (kld_statistics)


def chunks_of(tokens: list[int], n_ctx: int, n_chunks: int | None) -> int:
    if n_ctx < 8:
        raise UserError(f"--ctx-size {n_ctx} is too small for perplexity (use 128 or more)")
    if len(tokens) < 2 * n_ctx:
        raise UserError(f"you need at least {2 * n_ctx} tokens to evaluate perplexity with a "
                        f"context of {n_ctx}; the text has {len(tokens)}")
    n = len(tokens) // n_ctx
    return n if n_chunks is None or n_chunks < 0 else min(n, n_chunks)


N_BATCH, N_UBATCH = 2048, 512  # llama-perplexity's -b and -ub defaults


def batch_sizes(n_ctx: int, n_batch: int = N_BATCH, n_ubatch: int = N_UBATCH
                ) -> tuple[int, int, int]:
    """(chunks evaluated side by side, batch, ubatch) as llama-perplexity sets them from
    its -c, -b and -ub: a stream per chunk, and a batch no larger than the streams hold."""
    if n_batch < 1 or n_ubatch < 1:
        raise UserError(f"batch sizes must be positive, got -b {n_batch} -ub {n_ubatch}")
    n_seq = max(1, n_batch // n_ctx)
    n_batch = min(n_batch, n_seq * n_ctx)
    return n_seq, n_batch, min(n_ubatch, n_batch)


def chunk_pieces(n_ctx: int, n_side: int, n_batch: int = N_BATCH,
                 n_ubatch: int = N_UBATCH, flash: bool = True) -> list[int]:
    """The lengths of the pieces a chunk is evaluated in so that each token sees attention
    as llama-perplexity computes it, with `n_side` chunks side by side. llama.cpp gives
    each chunk a KV stream of its own and splits the batch into ubatches holding an equal
    share of every chunk (n_ubatch // n_side tokens each); attention runs per stream over
    that share, on ggml's tiled route from TILE queries on and its one-query route below.
    A token's result depends only on that route (and the products' on nothing), so a
    chunk goes whole unless the share is below TILE; then it goes in shares. Without flash
    attention (`flash` False) the products over the cache run over a view that grows with
    each ubatch, and their sums depend on its length: always in shares."""
    _, n_batch, n_ub = batch_sizes(n_ctx, n_batch, n_ubatch)
    if n_side > 1:  # the chunk is in one batch, n_ub // n_side of its tokens a ubatch
        per = max(1, n_ub // n_side)
        pieces = [min(per, n_ctx - s) for s in range(0, n_ctx, per)]
    else:  # one stream: batches of -b tokens, each split into ubatches of -ub
        pieces = [min(n_ub, b - u) for b0 in range(0, n_ctx, n_batch)
                  for b in [min(n_ctx, b0 + n_batch) - b0] for u in range(0, b, n_ub)]
    return [n_ctx] if flash and min(pieces) >= TILE else pieces


def perplexity(model: Model, tokens: list[int], n_ctx: int, *, add_bos: bool,
               bos_id: int | None, n_chunks: int | None = None,
               base_path: str | None = None, save_base: str | None = None,
               on_chunk: Callable[[int, int, float], None] | None = None,
               running: dict | None = None, n_batch: int = N_BATCH,
               n_ubatch: int = N_UBATCH) -> PerplexityResult:
    """`base_path`: compare against a base file (KL-divergence); `save_base`: write this
    model's log-probs there (llama-perplexity's format) for a later comparison.
    `on_chunk(i, n, ppl)` after each chunk with the running estimate; `running` as in
    `iter_perplexity`; `n_batch`, `n_ubatch`: llama-perplexity's -b and -ub."""
    steps = iter_perplexity(model, tokens, n_ctx, add_bos=add_bos, bos_id=bos_id,
                            n_chunks=n_chunks, base_path=base_path, save_base=save_base,
                            running=running, n_batch=n_batch, n_ubatch=n_ubatch)
    try:
        while True:
            try:
                i, n, ppl = next(steps)
            except StopIteration as stop:
                return stop.value
            if on_chunk:
                on_chunk(i, n, ppl)
    finally:
        steps.close()  # a callback that raises stops the run: no partial base is left


def iter_perplexity(model: Model, tokens: list[int], n_ctx: int, *, add_bos: bool,
                    bos_id: int | None, n_chunks: int | None = None,
                    base_path: str | None = None, save_base: str | None = None,
                    running: dict | None = None, n_batch: int = N_BATCH,
                    n_ubatch: int = N_UBATCH
                    ) -> Generator[tuple[int, int, float], None, PerplexityResult]:
    """`perplexity` one chunk at a time: yields (chunk, chunks, running ppl) and returns the
    result, so that a job can report progress and stop between chunks. With a base, the
    number of chunks is the base's (at most `n_chunks`), and `running` (a dict, if given) is
    updated after each chunk with the running KLD figures llama-perplexity prints per chunk
    (see `format_kld_chunk`). A base being written is removed if the run does not finish."""
    base = BaseReader(base_path) if base_path else None
    if base is not None:
        want = base.n_chunk if n_chunks is None or n_chunks < 0 else min(n_chunks, base.n_chunk)
        n_chunk = chunks_of(tokens, n_ctx, want)
        hp = getattr(model, "hp", None)
        base.check(tokens, n_ctx, getattr(hp, "n_vocab", None), n_chunk)
    else:
        n_chunk = chunks_of(tokens, n_ctx, n_chunks)
    n_seq = batch_sizes(n_ctx, n_batch, n_ubatch)[0]
    writer = BaseWriter(save_base, tokens, n_ctx, n_chunk) if save_base else None
    first = n_ctx // 2
    nll = nll2 = 0.0
    count = 0
    acc = _KldAccumulator(n_chunk * (n_ctx - 1 - first)) if base is not None else None
    ppls = []
    cache = buf = None  # one KV cache and one logits buffer for every chunk
    try:
        for i in range(n_chunk):
            chunk = list(tokens[i * n_ctx:(i + 1) * n_ctx])
            if add_bos and bos_id is not None:
                chunk[0] = bos_id
            if cache is None:
                cache = model.new_cache(n_ctx)
            cache.n = 0  # (a chunk reads only the cells it writes: no need to clear them)
            # the logits from `first` on, as llama-perplexity asks for them, evaluated as
            # its batches of n_seq chunks side by side hold them
            n_side = min(n_seq, n_chunk - i // n_seq * n_seq)
            n_vocab = getattr(getattr(model, "hp", None), "n_vocab", None)
            if buf is None and n_vocab is not None and getattr(model, "gpu", None) is None:
                buf = np.empty((n_ctx - first, n_vocab), np.float32)
            logits = _chunk_logits(model, chunk, cache, first,
                                   chunk_pieces(n_ctx, n_side, n_batch, n_ubatch,
                                                getattr(model, "flash_attn", "on") != "off"),
                                   buf)
            target = np.asarray(tokens[i * n_ctx + first + 1:(i + 1) * n_ctx])
            if writer is not None:
                writer.write_chunk(logits)
            if acc is not None:
                if logits.shape[1] != base.n_vocab:
                    raise UserError(f"{base_path}: the base has a vocabulary of "
                                    f"{base.n_vocab} tokens, the model {logits.shape[1]}")
                acc.add(*compare_chunk(logits, base.chunk(i), target))
                base.release(i)
                count = acc.n
                ppls.append(math.exp(acc.s["nll"] / count))
                if running is not None:
                    running.update(acc.running())
            else:
                tok_nll = token_nll(logits, target)  # llama-perplexity's: expf, double sum
                nll += float(tok_nll.sum(dtype=np.float64))
                nll2 += float((tok_nll.astype(np.float64) ** 2).sum())
                count += len(target)
                ppls.append(math.exp(nll / count))
            yield i + 1, n_chunk, ppls[-1]
        if writer is not None:
            writer.commit()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        if base is not None:
            base.close()
    if acc is not None:
        stats = acc.statistics()
        return PerplexityResult(stats["ppl"], stats["ppl_err"], n_chunk, n_ctx, count, ppls,
                                stats)
    mean = nll / count
    var = nll2 / count - mean * mean
    ppl = math.exp(mean)
    err = math.sqrt(var / (count - 1)) * ppl if var > 0 and count > 1 else 0.0
    return PerplexityResult(ppl, err, n_chunk, n_ctx, count, ppls)


def _chunk_logits(model: Model, chunk: list[int], cache, first: int, pieces: list[int],
                  buf: np.ndarray | None = None) -> np.ndarray:
    """The logits of rows first .. n - 2 of `chunk`, evaluated in `pieces` (into `buf`,
    (len(chunk) - first, n_vocab) float32, when given: the next chunk reuses it)."""
    parts, s, row = [], 0, 0
    for size in pieces:
        if s + size > first:
            skip = max(0, first - s)
            rows = None if buf is None else buf[row:row + size - skip]
            parts.append(model.forward(chunk[s:s + size], cache, all_logits=True,
                                       first=skip, out=rows))
            row += size - skip
        else:  # nothing asked of these rows
            model.forward(chunk[s:s + size], cache)
        s += size
    if buf is not None:
        return buf[:-1]
    return np.asarray(np.concatenate(parts)[:-1], np.float32)


# -- KL-divergence as llama-perplexity computes it --------------------------------------


def compare_chunk(logits: np.ndarray, rows: np.ndarray, targets: np.ndarray
                  ) -> tuple[np.ndarray, ...]:
    """One chunk against its base rows, per token: (KLD, Δp, nll, base nll, same top-1), in
    llama-perplexity's float32 arithmetic (sums of the vocabulary in double). The base's
    entries below −16 nats are left out of the KLD sum, as there."""
    x = np.ascontiguousarray(logits, dtype=np.float32)
    r = np.arange(len(x))
    top, total = max_sum_exp(x)
    top_i = x.argmax(-1)
    log_sum = np.log(total).astype(np.float32)
    norm = top + log_sum
    nll = norm - x[r, targets]
    scale, min_log_prob = header(rows)
    nll_base = -(scale * rows[r, 4 + targets].astype(np.float32) + min_log_prob)
    kld, top_base = kld_sums(x, rows, norm)
    same = top_base == top_i
    p_diff = (np.exp((-nll).astype(np.float64)).astype(np.float32)
              - np.exp((-nll_base).astype(np.float64)).astype(np.float32))
    return kld.astype(np.float32), p_diff, nll, nll_base, same


def _mean_and_err(s: float, s2: float, n: int) -> tuple[float, float]:
    """llama-perplexity's mean and its standard error (0 for ten values or fewer)."""
    if n < 1:
        return 0.0, 0.0
    f = s / n
    df = s2 / n - f * f
    return f, (math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)


def _covariance(sa: float, sb: float, sab: float, n: int) -> float:
    if n < 10:
        return 0.0
    return (sab / n - (sa / n) * (sb / n)) / (n - 1)


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama-perplexity's percentile of sorted float32 values: linear between the two
    neighbours of fraction * (n - 1), in float32."""
    v = sorted_values
    f = np.float32(fraction)
    if f <= 0:
        return float(v[0])
    if f >= 1:
        return float(v[-1])
    p = f * np.float32(len(v) - 1)
    ip = int(p)
    p = np.float32(p - np.float32(ip))
    return float((np.float32(1) - p) * v[ip] + p * v[min(ip + 1, len(v) - 1)])


def median(sorted_values: np.ndarray) -> float:
    v, n = sorted_values, len(sorted_values)
    return float(v[n // 2] if n % 2 else np.float32(0.5) * (v[n // 2] + v[n // 2 - 1]))


KLD_PERCENTILES = (("kld_99_9", 0.999), ("kld_99", 0.990), ("kld_95", 0.950),
                   ("kld_90", 0.900), ("kld_10", 0.100), ("kld_5", 0.050), ("kld_1", 0.010),
                   ("kld_0_1", 0.001))
DP_PERCENTILES = (("dp_99_9", 0.999), ("dp_99", 0.990), ("dp_95", 0.950), ("dp_90", 0.900),
                  ("dp_75", 0.750), ("dp_25", 0.250), ("dp_10", 0.100), ("dp_5", 0.050),
                  ("dp_1", 0.010), ("dp_0_1", 0.001))


class _KldAccumulator:
    """Per-token KLD, Δp, nll and base nll (float32, preallocated: a few bytes a token) and
    llama-perplexity's running sums."""

    KEYS = ("nll", "nll2", "nll_base", "nll_base2", "nll_nll_base", "kld", "kld2", "p_diff",
            "p_diff2", "p_diff4")

    def __init__(self, capacity: int):
        self.kld = np.empty(capacity, np.float32)
        self.p_diff = np.empty(capacity, np.float32)
        self.n = 0
        self.same_top = 0
        self.s = dict.fromkeys(self.KEYS, 0.0)

    def add(self, kld, p_diff, nll, nll_base, same) -> None:
        a, b = self.n, self.n + len(kld)
        self.kld[a:b], self.p_diff[a:b] = kld, p_diff
        self.n = b
        self.same_top += int(same.sum())
        d = np.float64
        k, dp2 = kld.astype(d), (p_diff * p_diff).astype(d)  # float products, as there
        for key, v in (("nll", nll.astype(d)), ("nll2", (nll * nll).astype(d)),
                       ("nll_base", nll_base.astype(d)),
                       ("nll_base2", (nll_base * nll_base).astype(d)),
                       ("nll_nll_base", (nll * nll_base).astype(d)), ("kld", k),
                       ("kld2", k * k), ("p_diff", p_diff.astype(d)), ("p_diff2", dp2),
                       ("p_diff4", dp2 * dp2)):
            self.s[key] += float(v.sum())

    def running(self) -> dict:
        """The figures of llama-perplexity's per-chunk KLD line."""
        s, n = self.s, self.n
        lp, lp_err = _mean_and_err(s["nll"], s["nll2"], n)
        lb, lb_err = _mean_and_err(s["nll_base"], s["nll_base2"], n)
        cov = _covariance(s["nll"], s["nll_base"], s["nll_nll_base"], n)
        kl, kl_err = _mean_and_err(s["kld"], s["kld2"], n)
        mse, mse_err = _mean_and_err(s["p_diff2"], s["p_diff4"], n)
        rms = math.sqrt(mse)
        top = self.same_top / n
        return {"ppl": math.exp(lp), "ppl_err": math.exp(lp) * lp_err,
                "ln_ratio": lp - lb,
                "ln_ratio_err": math.sqrt(max(0.0, lp_err ** 2 + lb_err ** 2 - 2 * cov)),
                "mean_kld": kl, "kld_err": kl_err, "rms_dp": rms,
                "rms_dp_err": 0.5 / rms * mse_err if rms > 0 else 0.0,
                "same_top_p": top,
                "same_top_err": math.sqrt(top * (1 - top) / (n - 1)) if n > 1 else 0.0}

    def statistics(self) -> dict:
        return kld_statistics(self.s, self.same_top, self.n, self.kld[:self.n],
                              self.p_diff[:self.n])


def kld_statistics(sums: dict, same_top: int, count: int, kld: np.ndarray,
                   p_diff: np.ndarray) -> dict:
    """llama-perplexity's KL-divergence statistics, same formulas: `sums` are its running
    sums (nll, nll², base nll, ..., see _KldAccumulator.KEYS), `kld`/`p_diff` every token's
    values. Keys: ppl, base_ppl, cor, ln_ratio, ratio, delta_ppl (each with _err but cor),
    mean_kld, kld_err, kld_max/99_9/99/95/90/median/10/5/1/0_1/min, mean_dp, dp_err,
    dp_max/.../dp_min, rms_dp, rms_dp_err, same_top_p, same_top_err."""
    s, n = sums, count
    lp, lp_err = _mean_and_err(s["nll"], s["nll2"], n)
    lb, lb_err = _mean_and_err(s["nll_base"], s["nll_base2"], n)
    ppl, base_ppl = math.exp(lp), math.exp(lb)
    ppl_err, base_err = ppl * lp_err, base_ppl * lb_err
    cov = _covariance(s["nll"], s["nll_base"], s["nll_nll_base"], n)
    ln_ratio = lp - lb
    ln_ratio_err = math.sqrt(max(0.0, lp_err ** 2 + lb_err ** 2 - 2 * cov))
    ratio = math.exp(ln_ratio)
    ppl_cov = ppl * base_ppl * cov
    out = {"ppl": ppl, "ppl_err": ppl_err, "base_ppl": base_ppl, "base_ppl_err": base_err,
           "cor": cov / (lp_err * lb_err) if lp_err * lb_err > 0 else 0.0,
           "ln_ratio": ln_ratio, "ln_ratio_err": ln_ratio_err,
           "ratio": ratio, "ratio_err": ratio * ln_ratio_err,
           "delta_ppl": ppl - base_ppl,
           "delta_ppl_err": math.sqrt(max(0.0, ppl_err ** 2 + base_err ** 2 - 2 * ppl_cov))}
    out["mean_kld"], out["kld_err"] = _mean_and_err(s["kld"], s["kld2"], n)
    k = np.sort(kld)
    out["kld_max"], out["kld_median"], out["kld_min"] = float(k[-1]), median(k), float(k[0])
    out.update((key, percentile(k, f)) for key, f in KLD_PERCENTILES)
    out["mean_dp"], out["dp_err"] = _mean_and_err(s["p_diff"], s["p_diff2"], n)
    d = np.sort(p_diff)
    out["dp_max"], out["dp_median"], out["dp_min"] = float(d[-1]), median(d), float(d[0])
    out.update((key, percentile(d, f)) for key, f in DP_PERCENTILES)
    mse, mse_err = _mean_and_err(s["p_diff2"], s["p_diff4"], n)
    out["rms_dp"] = math.sqrt(mse)
    out["rms_dp_err"] = 0.5 / out["rms_dp"] * mse_err if out["rms_dp"] > 0 else 0.0
    top = same_top / n
    out["same_top_p"] = top
    out["same_top_err"] = math.sqrt(top * (1 - top) / (n - 1)) if n > 1 else 0.0
    return out


# -- llama-perplexity's printouts -------------------------------------------------------


def format_eta(seconds_per_pass: float, n_chunk: int) -> str:
    """`perplexity: 1.23 seconds per pass - ETA 4.50 minutes`, as llama-perplexity says it
    after the first chunk."""
    total = int(seconds_per_pass * n_chunk)
    eta = ""
    if total >= 3600:
        eta, total = f"{total // 3600} hours ", total % 3600
    return (f"perplexity: {seconds_per_pass:.2f} seconds per pass - ETA "
            f"{eta}{total / 60:.2f} minutes")


KLD_CHUNK_HEADER = ("chunk             PPL               ln(PPL(Q)/PPL(base))          "
                    "KL Divergence              Δp RMS            Same top p")


def format_kld_chunk(i: int, r: dict) -> str:
    """One line of llama-perplexity's per-chunk KLD table from the `running` figures of
    `iter_perplexity`."""
    return (f"{i:4d}    {r['ppl']:9.4f} ± {r['ppl_err']:9.4f}"
            f"    {r['ln_ratio']:10.5f} ± {r['ln_ratio_err']:10.5f}"
            f"    {r['mean_kld']:10.5f} ± {r['kld_err']:10.5f}"
            f"    {100 * r['rms_dp']:6.3f} ± {100 * r['rms_dp_err']:6.3f} %"
            f"    {100 * r['same_top_p']:6.3f} ± {100 * r['same_top_err']:6.3f} %")


def format_kld_statistics(k: dict) -> str:
    """llama-perplexity's closing statistics, its labels and layout."""
    pct = [("99.9%  ", "99_9"), ("99.0%  ", "99"), ("95.0%  ", "95"), ("90.0%  ", "90")]
    low = [("10.0%  ", "10"), (" 5.0%  ", "5"), (" 1.0%  ", "1"), (" 0.1%  ", "0_1")]
    lines = ["====== Perplexity statistics ======",
             f"Mean PPL(Q)                   : {k['ppl']:10.6f} ± {k['ppl_err']:10.6f}",
             f"Mean PPL(base)                : {k['base_ppl']:10.6f} ± {k['base_ppl_err']:10.6f}",
             f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * k['cor']:6.2f}%",
             f"Mean ln(PPL(Q)/PPL(base))     : {k['ln_ratio']:10.6f} ± {k['ln_ratio_err']:10.6f}",
             f"Mean PPL(Q)/PPL(base)         : {k['ratio']:10.6f} ± {k['ratio_err']:10.6f}",
             f"Mean PPL(Q)-PPL(base)         : {k['delta_ppl']:10.6f} ± "
             f"{k['delta_ppl_err']:10.6f}",
             "", "====== KL divergence statistics ======",
             f"Mean    KLD: {k['mean_kld']:10.6f} ± {k['kld_err']:10.6f}",
             f"Maximum KLD: {k['kld_max']:10.6f}"]
    lines += [f"{label} KLD: {k['kld_' + key]:10.6f}" for label, key in pct]
    lines.append(f"Median  KLD: {k['kld_median']:10.6f}")
    lines += [f"{label} KLD: {k['kld_' + key]:10.6f}" for label, key in low]
    lines += [f"Minimum KLD: {k['kld_min']:10.6f}", "",
              "====== Token probability statistics ======",
              f"Mean    Δp: {100 * k['mean_dp']:6.3f} ± {100 * k['dp_err']:5.3f} %",
              f"Maximum Δp: {100 * k['dp_max']:6.3f}%"]
    lines += [f"{label} Δp: {100 * k['dp_' + key]:6.3f}%"
              for label, key in [*pct, ("75.0%  ", "75")]]
    lines.append(f"Median  Δp: {100 * k['dp_median']:6.3f}%")
    lines += [f"{label} Δp: {100 * k['dp_' + key]:6.3f}%" for label, key in [("25.0%  ", "25"),
                                                                             *low]]
    lines += [f"Minimum Δp: {100 * k['dp_min']:6.3f}%",
              f"RMS Δp    : {100 * k['rms_dp']:6.3f} ± {100 * k['rms_dp_err']:5.3f} %",
              f"Same top p: {100 * k['same_top_p']:6.3f} ± {100 * k['same_top_err']:5.3f} %"]
    return "\n".join(lines)
