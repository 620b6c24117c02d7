"""Generation: prompt processing in one batch, then one token at a time, streaming text
pieces that are valid UTF-8, stopping on end-of-generation tokens and stop strings."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..errors import UserError
from .model import KVCache, Model
from .sampling import Sampler
from .tokenizer import StreamDecoder, Tokenizer


@dataclass
class Timings:
    n_prompt: int = 0
    prompt_s: float = 0.0
    n_gen: int = 0
    gen_s: float = 0.0
    stop_reason: str = ""

    @property
    def prompt_tps(self) -> float:
        return self.n_prompt / self.prompt_s if self.prompt_s > 0 else 0.0

    @property
    def gen_tps(self) -> float:
        return self.n_gen / self.gen_s if self.gen_s > 0 else 0.0

    def line(self) -> str:
        return (f"prompt: {self.n_prompt} tokens, {self.prompt_tps:.1f} tok/s | "
                f"generation: {self.n_gen} tokens, {self.gen_tps:.1f} tok/s")


@dataclass
class Generation:
    model: Model
    tokenizer: Tokenizer
    cache: KVCache
    history: list[int] = field(default_factory=list)

    @classmethod
    def start(cls, model: Model, tokenizer: Tokenizer, n_ctx: int) -> Generation:
        return cls(model, tokenizer, model.new_cache(n_ctx))

    def stream(self, prompt: list[int], sampler: Sampler, n_predict: int = -1,
               stop: list[str] | None = None, timings: Timings | None = None) -> Iterator[str]:
        """Feed `prompt` after what the cache holds, then sample up to `n_predict` tokens
        (-1: until end of generation or a full context), yielding text as it completes."""
        t = timings if timings is not None else Timings()
        if not prompt:
            raise UserError("empty prompt")
        room = self.cache.n_ctx - self.cache.n
        if len(prompt) >= room:
            raise UserError(f"the prompt ({len(prompt)} tokens) does not fit in the context "
                            f"({room} of --ctx-size {self.cache.n_ctx} left)")
        t0 = time.perf_counter()
        logits = self.model.forward(prompt, self.cache)
        t.prompt_s += time.perf_counter() - t0
        t.n_prompt += len(prompt)
        self.history += list(prompt)
        dec = StreamDecoder(self.tokenizer)
        held = ""  # text that may be the start of a stop string: not shown until it is not
        stop = [s for s in (stop or []) if s]
        t0 = time.perf_counter()
        n = 0
        while n_predict < 0 or n < n_predict:
            tok = sampler(logits, self.history)
            n += 1
            self.history.append(tok)
            if self.tokenizer.is_eog(tok):
                t.stop_reason = "eos"
                break
            held += dec.push(tok)
            if stop:
                hits = [held.index(s) for s in stop if s in held]
                if hits:
                    held = held[: min(hits)]
                    t.stop_reason = "stop string"
                    break
                keep = _stop_prefix(held, stop)
                if len(held) > keep:
                    yield held[: len(held) - keep]
                    held = held[len(held) - keep:]
            elif held:
                yield held
                held = ""
            if self.cache.n >= self.cache.n_ctx:
                t.stop_reason = "context full"
                break
            logits = self.model.forward([tok], self.cache)
        else:
            t.stop_reason = "n_predict"
        if t.stop_reason != "stop string":
            held += dec.flush()
        if held:
            yield held
        t.n_gen += n
        t.gen_s += time.perf_counter() - t0


def _stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that begins one of `stops`."""
    for k in range(min(len(text), max(map(len, stops)) - 1), 0, -1):
        if any(s.startswith(text[-k:]) for s in stops):
            return k
    return 0
