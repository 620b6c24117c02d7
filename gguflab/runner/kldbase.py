"""llama-perplexity's `--kl-divergence-base` file, read and written chunk by chunk.

Layout (little-endian), as llama-perplexity writes it:

    "_logits_"                       8 bytes
    n_ctx, n_vocab, n_chunk          uint32, int32, int32
    tokens                           int32 x n_chunk * n_ctx (the text, before BOS)
    per chunk, per scored token      (n_ctx - 1 - n_ctx // 2 tokens a chunk)
        scale, min_log_prob          2 x float32
        q                            uint16 x n_vocab, padded with zeros to an even count

A token's log-prob of vocab entry i is `scale * q[i] + min_log_prob`; the range kept is the
16 nats below the top logit (anything lower is stored as 0, the bottom of the range).

The writer appends one chunk at a time to `PATH.partial` and renames it on success; the
reader memory-maps the file, so neither holds more than one chunk whatever the length."""

from __future__ import annotations

import mmap
import os
from types import TracebackType

import numpy as np

from ..errors import UserError
from ..partial import PartialFile
from .ops import kld_codes, max_sum_exp, row_width

MAGIC = b"_logits_"
HEADER_BYTES = len(MAGIC) + 3 * 4
LOG_RANGE = 16.0  # nats below the top logit that the 16-bit codes span
LEVELS = 65535.0


def scored_per_chunk(n_ctx: int) -> int:
    """Tokens scored in each chunk: the second half of it but the last position."""
    return n_ctx - 1 - n_ctx // 2


def encode(logits: np.ndarray) -> np.ndarray:
    """Rows of float32 logits -> rows of `row_width` uint16 words, as llama-perplexity
    compresses them (all float32 arithmetic, round-to-nearest-even codes)."""
    x = np.ascontiguousarray(logits, dtype=np.float32)
    n, n_vocab = x.shape
    top, total = max_sum_exp(x)
    low = np.maximum(x.min(-1), top - np.float32(LOG_RANGE))
    log_sum = np.log(total).astype(np.float32)
    min_log_prob = (low - top) - log_sum
    scale = (top - low) / np.float32(LEVELS)
    out = np.zeros((n, row_width(n_vocab)), np.uint16)
    out[:, :4] = np.stack([scale, min_log_prob], -1).astype(np.float32).view(np.uint16)
    nz = scale != 0  # a row of equal logits has all its codes 0
    inv = np.zeros_like(scale)
    inv[nz] = np.float32(1) / scale[nz]
    kld_codes(x, low, inv, out)
    return out


def header(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scale, min_log_prob) of each encoded row, float32."""
    f = np.ascontiguousarray(rows[:, :4]).view(np.float32)
    return f[:, 0], f[:, 1]


def decode(rows: np.ndarray, n_vocab: int) -> np.ndarray:
    """Encoded rows -> float32 log-probs (n, n_vocab), as llama-perplexity reads them back."""
    scale, min_log_prob = header(rows)
    q = rows[:, 4:4 + n_vocab].astype(np.float32)
    return scale[:, None] * q + min_log_prob[:, None]


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """−log p(target) per row in float32, the way llama-perplexity sums it while writing a
    base: top + log Σ exp − logit[target]."""
    x = np.ascontiguousarray(logits, dtype=np.float32)
    top, total = max_sum_exp(x)
    log_sum = np.log(total).astype(np.float32)
    return (top + log_sum) - x[np.arange(len(x)), targets]


class BaseWriter:
    """Writes a base chunk by chunk to `path.partial`; `commit()` renames it over `path`,
    `abort()` (or leaving a `with` block by an exception) removes it and leaves `path` as it
    was. The header is written with the first chunk, when n_vocab is known."""

    def __init__(self, path: str, tokens: np.ndarray | list[int], n_ctx: int, n_chunk: int):
        self.path = path
        self.n_ctx, self.n_chunk = n_ctx, n_chunk
        self.tokens = np.asarray(tokens[:n_chunk * n_ctx], np.int32)
        if len(self.tokens) != n_chunk * n_ctx:
            raise UserError(f"{path}: {n_chunk} chunks of {n_ctx} need {n_chunk * n_ctx} "
                            f"tokens, the text has {len(self.tokens)}")
        self.n_vocab: int | None = None
        self.written = 0
        self.out = PartialFile(path, lambda cause: UserError(f"{path}: {cause}"))

    def write_chunk(self, logits: np.ndarray) -> None:
        """The scored rows of one chunk (n_ctx - 1 - n_ctx//2, n_vocab) as float32 logits."""
        if logits.shape[0] != scored_per_chunk(self.n_ctx):
            raise ValueError(f"a chunk has {scored_per_chunk(self.n_ctx)} scored rows, "
                             f"not {logits.shape[0]}")
        if self.written >= self.n_chunk:
            raise ValueError("more chunks than the header says")
        if self.n_vocab is None:
            self.n_vocab = int(logits.shape[1])
            self.out.write(MAGIC + np.array([self.n_ctx], "<u4").tobytes()
                           + np.array([self.n_vocab, self.n_chunk], "<i4").tobytes()
                           + self.tokens.astype("<i4").tobytes())
        elif logits.shape[1] != self.n_vocab:
            raise ValueError("n_vocab changed between chunks")
        self.out.write(encode(logits).astype("<u2").tobytes())
        self.written += 1

    def commit(self) -> None:
        if self.written != self.n_chunk:
            self.abort()
            raise ValueError(f"{self.written} of {self.n_chunk} chunks written")
        self.out.commit()

    def abort(self) -> None:
        self.out.abort()

    def __enter__(self) -> BaseWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()


class BaseReader:
    """A base file as memory maps: `tokens` (int32) and `chunk(i)`, the encoded rows of chunk
    i (a view, read from disk as it is touched)."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(HEADER_BYTES)
        except OSError as e:
            raise UserError(f"{path}: cannot read: {e.strerror}") from None
        if len(head) < len(MAGIC) or head[:len(MAGIC)] != MAGIC:
            raise UserError(f"{path}: not a KL-divergence base file (llama-perplexity's "
                            "--kl-divergence-base format)")
        if len(head) < HEADER_BYTES:
            raise UserError(f"{path}: truncated KL-divergence base (no header)")
        self.n_ctx = int(np.frombuffer(head, "<u4", 1, len(MAGIC))[0])
        self.n_vocab, self.n_chunk = map(int, np.frombuffer(head, "<i4", 2, len(MAGIC) + 4))
        if self.n_ctx < 2 or self.n_vocab < 1 or self.n_chunk < 1:
            raise UserError(f"{path}: not a KL-divergence base file (n_ctx {self.n_ctx}, "
                            f"n_vocab {self.n_vocab}, {self.n_chunk} chunks)")
        self.n_scored = scored_per_chunk(self.n_ctx)
        self.width = row_width(self.n_vocab)
        n_tok = self.n_chunk * self.n_ctx
        data_at = HEADER_BYTES + 4 * n_tok
        need = data_at + 2 * self.n_chunk * self.n_scored * self.width
        if size < need:
            have = max(0, size - data_at) // (2 * self.n_scored * self.width)
            raise UserError(f"{path}: truncated KL-divergence base ({size} bytes, the header "
                            f"says {need}: {have} of {self.n_chunk} chunks)")
        self.tokens = np.memmap(path, "<i4", "r", HEADER_BYTES, (n_tok,))
        self._rows = np.memmap(path, "<u2", "r", data_at,
                               (self.n_chunk, self.n_scored, self.width))

    def chunk(self, i: int) -> np.ndarray:
        return self._rows[i]

    def release(self, i: int) -> None:
        """Done with chunk i: drop its pages from this process (the kernel reads them again
        if they are touched), so that the resident size stays flat over a long base."""
        m = getattr(self._rows, "_mmap", None)
        if m is None or not hasattr(m, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        n = self._rows[i].nbytes
        start = self._rows.offset % mmap.ALLOCATIONGRANULARITY + i * n  # within the map
        page = start - start % mmap.PAGESIZE
        try:
            m.madvise(mmap.MADV_DONTNEED, page, min(start + n, len(m)) - page)
        except (OSError, ValueError):  # only a hint
            pass

    def check(self, tokens: list[int] | np.ndarray, n_ctx: int, n_vocab: int | None,
              n_chunk: int) -> None:
        """UserError unless this base was made with this context, vocab and text."""
        if self.n_ctx != n_ctx:
            raise UserError(f"{self.path}: the base was computed with --ctx-size {self.n_ctx}, "
                            f"not {n_ctx}")
        if n_vocab is not None and self.n_vocab != n_vocab:
            raise UserError(f"{self.path}: the base has a vocabulary of {self.n_vocab} tokens, "
                            f"the model {n_vocab}")
        if n_chunk > self.n_chunk:
            raise UserError(f"{self.path}: the base has {self.n_chunk} chunks, not {n_chunk}")
        n = n_chunk * n_ctx
        ours = np.asarray(tokens[:n], np.int32)
        if len(ours) < n or not np.array_equal(np.asarray(self.tokens[:n]), ours):
            raise UserError(f"{self.path}: the base was computed on another text or tokenizer "
                            "(its tokens differ)")

    def close(self) -> None:
        """Drop the maps (the OS unmaps the file once no chunk view is left)."""
        self.tokens = self._rows = None
