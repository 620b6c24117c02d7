"""Token sampling with llama.cpp's knobs and its default chain order: repeat penalty ->
top-k -> top-p -> min-p -> temperature -> draw (greedy when the temperature is 0)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SamplerParams:
    temp: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0  # 1.0 = off (llama.cpp's default)
    repeat_last_n: int = 64
    seed: int | None = None  # None: a random seed


class Sampler:
    def __init__(self, params: SamplerParams | None = None):
        self.p = params or SamplerParams()
        self.rng = np.random.default_rng(self.p.seed)

    def __call__(self, logits: np.ndarray, history: list[int] | None = None) -> int:
        p = self.p
        logits = np.asarray(logits, np.float64).copy()
        if p.repeat_penalty != 1.0 and history and p.repeat_last_n != 0:
            recent = history[-p.repeat_last_n:] if p.repeat_last_n > 0 else history
            ids = np.unique(np.asarray(recent, np.int64))
            ids = ids[(ids >= 0) & (ids < len(logits))]
            seen = logits[ids]
            logits[ids] = np.where(seen > 0, seen / p.repeat_penalty, seen * p.repeat_penalty)
        if p.temp <= 0:
            return int(np.argmax(logits))
        order = np.argsort(-logits, kind="stable")
        if p.top_k > 0:
            order = order[: p.top_k]
        cand = logits[order]
        probs = softmax(cand)
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            order, cand = order[:keep], cand[:keep]
            probs = softmax(cand)
        if p.min_p > 0:
            keep = probs >= p.min_p * probs[0]
            order, cand = order[keep], cand[keep]
        probs = softmax(cand / p.temp)
        return int(order[self.rng.choice(len(order), p=probs)])


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()
