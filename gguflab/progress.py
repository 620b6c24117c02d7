"""A terminal progress bar with ETA for the CLI (the TUI draws its own)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from . import fmt


class ProgressBar:
    """Redraws one line on a TTY; prints nothing when the stream is not a terminal."""

    def __init__(self, total_bytes: int, label: str = "", stream: TextIO | None = None,
                 width: int = 30):
        self.total = max(1, total_bytes)
        self.label = label
        self.stream = stream or sys.stderr
        self.width = width
        self.enabled = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.shown = False

    def update(self, done_bytes: int, note: str = "") -> None:
        if not self.enabled:
            return
        frac = min(1.0, done_bytes / self.total)
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        fill = int(frac * self.width)
        bar = "█" * fill + "░" * (self.width - fill)
        rate = done_bytes / elapsed / (1 << 20) if elapsed > 0 else 0.0
        line = (f"\r{self.label}{bar} {100 * frac:5.1f}% {fmt.duration(elapsed)} "
                f"ETA {fmt.duration(eta)} {rate:7.1f} MiB/s {note}")
        self.stream.write(line[:160].ljust(100))
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        """Erase the bar so that a normal line can be printed in its place."""
        if self.shown:
            self.stream.write("\r" + " " * 160 + "\r")
            self.stream.flush()
            self.shown = False
