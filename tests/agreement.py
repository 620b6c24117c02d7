"""How two backends' logits are compared: to a stated noise bound, never to the bit.

Two implementations that sum floats in different orders (ours and llama.cpp, the CPU and
the GPU path, a batch and one token at a time) agree to a bound. A top-1 token is only
determined where the top two logits are further apart than that bound can move their gap:
closer, either answer is right, and a test that demands one would flip with the machine.
"""

from __future__ import annotations

import numpy as np


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def kld(ref: np.ndarray, ours: np.ndarray) -> np.ndarray:
    """KL(ref || ours) per row of logits."""
    lp, lq = log_softmax(ref), log_softmax(ours)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def margins(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 logit per row."""
    top2 = np.sort(np.asarray(logits, np.float64), axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def gap_change(ref: np.ndarray, other: np.ndarray, runners_up: int = 4) -> float:
    """How far `other` moves the gaps that decide a top-1: max over rows of the change of
    (ref's top-1 logit - each of ref's next `runners_up`). Far smaller than the largest
    logit difference, which sits anywhere in the vocabulary."""
    ref, other = np.asarray(ref, np.float64), np.asarray(other, np.float64)
    order = np.argsort(ref, axis=-1)[:, -1 - runners_up:]
    rows = np.arange(len(ref))[:, None]
    g_ref = ref[rows, order[:, -1:]] - ref[rows, order[:, :-1]]
    g_other = other[rows, order[:, -1:]] - other[rows, order[:, :-1]]
    return float(np.abs(g_ref - g_other).max()) if len(ref) else 0.0


def assert_same_top1_where_clear(ref: np.ndarray, ours: np.ndarray, noise: float) -> None:
    """ours is within `noise` of ref at every logit (asserted), and picks ref's top-1 wherever
    that is decided by more than 2 * noise (the most two logits `noise` off can close a gap)."""
    ref, ours = np.asarray(ref, np.float64), np.asarray(ours, np.float64)
    diff = float(np.abs(ours - ref).max())
    assert diff <= noise, f"logits {diff:.3g} apart, bound {noise:.3g}"
    bad = np.flatnonzero((margins(ref) > 2 * noise) & (ours.argmax(-1) != ref.argmax(-1)))
    assert bad.size == 0, f"top-1 differs at rows {bad[:8]} decided beyond {2 * noise:.3g}"


def decided(step_logits: np.ndarray, gap_noise: float) -> int:
    """How many leading greedy steps (each row the logits that chose the next token) are
    decided by more than `gap_noise`: a greedy text is compared up to the first near-tie."""
    close = np.flatnonzero(margins(step_logits) <= gap_noise)
    return int(close[0]) if close.size else len(step_logits)
