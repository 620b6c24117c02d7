"""Perplexity and KL-divergence the way llama-perplexity computes them, so the numbers are
comparable: the text is cut into chunks of n_ctx tokens, each chunk's first token becomes
BOS when the model adds one, and only the second half of each chunk is scored."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError
from .model import Model


@dataclass
class PerplexityResult:
    ppl: float
    ppl_err: float
    n_chunks: int
    n_ctx: int
    count: int  # scored tokens
    chunk_ppl: list[float] = field(default_factory=list)  # running estimate after each chunk
    kld: dict | None = None  # with a base: mean KLD, top-1 agreement, delta ppl


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def chunks_of(tokens: list[int], n_ctx: int, n_chunks: int | None) -> int:
    if n_ctx < 8:
        raise UserError(f"--ctx-size {n_ctx} is too small for perplexity (use 128 or more)")
    if len(tokens) < 2 * n_ctx:
        raise UserError(f"you need at least {2 * n_ctx} tokens to evaluate perplexity with a "
                        f"context of {n_ctx}; the text has {len(tokens)}")
    n = len(tokens) // n_ctx
    return n if n_chunks is None or n_chunks < 0 else min(n, n_chunks)


def perplexity(model: Model, tokens: list[int], n_ctx: int, *, add_bos: bool,
               bos_id: int | None, n_chunks: int | None = None,
               base_path: str | None = None, save_base: str | None = None,
               on_chunk: Callable[[int, int, float], None] | None = None) -> PerplexityResult:
    """`base_path`: compare against saved base log-probs (KL-divergence); `save_base`: save
    this model's log-probs there for a later comparison. `on_chunk(i, n, ppl)` after each
    chunk with the running estimate."""
    steps = iter_perplexity(model, tokens, n_ctx, add_bos=add_bos, bos_id=bos_id,
                            n_chunks=n_chunks, base_path=base_path, save_base=save_base)
    while True:
        try:
            i, n, ppl = next(steps)
        except StopIteration as stop:
            return stop.value
        if on_chunk:
            on_chunk(i, n, ppl)


def iter_perplexity(model: Model, tokens: list[int], n_ctx: int, *, add_bos: bool,
                    bos_id: int | None, n_chunks: int | None = None,
                    base_path: str | None = None, save_base: str | None = None
                    ) -> Generator[tuple[int, int, float], None, PerplexityResult]:
    """`perplexity` one chunk at a time: yields (chunk, chunks, running ppl) and returns the
    result, so that a job can report progress and stop between chunks."""
    n_chunk = chunks_of(tokens, n_ctx, n_chunks)
    first = n_ctx // 2
    base, base_tok_nll = (_load_base(base_path, tokens, n_ctx, n_chunk) if base_path
                          else (None, None))
    saved = [] if save_base else None  # log-probs in F16, as llama.cpp also stores them small
    saved_nll = []
    nll = nll2 = 0.0
    count = 0
    kl = []
    same_top = 0
    base_nll = 0.0
    running = []
    for i in range(n_chunk):
        chunk = list(tokens[i * n_ctx:(i + 1) * n_ctx])
        if add_bos and bos_id is not None:
            chunk[0] = bos_id
        cache = model.new_cache(n_ctx)
        logits = model.forward(chunk, cache, all_logits=True)
        lp = log_softmax(logits[first:n_ctx - 1])
        target = np.asarray(tokens[i * n_ctx + first + 1:(i + 1) * n_ctx])
        tok_lp = lp[np.arange(len(target)), target]
        nll += float(-tok_lp.sum())
        nll2 += float((tok_lp ** 2).sum())
        count += len(target)
        if saved is not None:
            saved.append(lp.astype(np.float16))
            saved_nll.append(-tok_lp)
        if base is not None:
            b = base[i].astype(np.float64)
            pb = np.exp(b)
            kl.append((pb * (b - lp)).sum(-1))
            same_top += int((b.argmax(-1) == lp.argmax(-1)).sum())
            base_nll += float(base_tok_nll[i].sum())
        running.append(math.exp(nll / count))
        yield i + 1, n_chunk, running[-1]
    mean = nll / count
    var = nll2 / count - mean * mean
    ppl = math.exp(mean)
    err = math.sqrt(var / (count - 1)) * ppl if var > 0 and count > 1 else 0.0
    result = PerplexityResult(ppl, err, n_chunk, n_ctx, count, running)
    if saved is not None:
        _save_base(save_base, tokens, n_ctx, n_chunk, saved, saved_nll)
    if base is not None:
        k = np.concatenate(kl)
        base_ppl = math.exp(base_nll / count)
        result.kld = {"mean_kld": float(k.mean()),
                      "kld_err": float(k.std(ddof=1) / math.sqrt(len(k))) if len(k) > 1 else 0.0,
                      "same_top_p": same_top / count, "base_ppl": base_ppl,
                      "delta_ppl": ppl - base_ppl}
    return result


def _save_base(path: str, tokens: list[int], n_ctx: int, n_chunk: int,
               logprobs: list[np.ndarray], nll: list[np.ndarray]) -> None:
    tmp = path + ".partial"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, tokens=np.asarray(tokens[: n_chunk * n_ctx], np.int32), n_ctx=n_ctx,
                     logprobs=np.stack(logprobs), nll=np.stack(nll))
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"{path}: cannot write: {e.strerror}") from None


def _load_base(path: str, tokens: list[int], n_ctx: int,
               n_chunk: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path) as z:
            base_tokens, base_ctx, lp, nll = (z["tokens"], int(z["n_ctx"]), z["logprobs"],
                                              z["nll"])
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"{path}: not a gguflab KL-divergence base file ({e})") from None
    if base_ctx != n_ctx:
        raise UserError(f"{path}: saved with --ctx-size {base_ctx}, not {n_ctx}")
    if len(lp) < n_chunk or not np.array_equal(base_tokens[: n_chunk * n_ctx],
                                               np.asarray(tokens[: n_chunk * n_ctx])):
        raise UserError(f"{path}: saved for another text or tokenizer")
    return lp, nll
