"""How sizes, counts and durations read to a person (shared by the CLI and the TUI)."""

from __future__ import annotations


def size(n: float) -> str:
    """Bytes as llama.cpp prints them: MiB below a GiB, GiB above."""
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.2f} MiB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.2f} KiB"
    return f"{int(n)} B"


def count(n: float) -> str:
    """Parameter counts the way model names say them: 135M, 1.1B."""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            v = n / div
            return f"{v:.0f}{unit}" if v >= 100 else f"{v:.1f}{unit}".replace(".0", "")
    return str(int(n))


def duration(seconds: float) -> str:
    """h:mm:ss, as the TUI and progress bars show every time."""
    s = max(0, int(round(seconds)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"
