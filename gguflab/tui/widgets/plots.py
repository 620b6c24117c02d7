"""Character plots for the jobs pane: pure functions returning lines of text, so they render
the same in any terminal (256 colours or fewer, no mouse) and are tested without Textual."""

from __future__ import annotations

from collections.abc import Sequence

BLOCKS = " ▁▂▃▄▅▆▇█"  # eighths of a cell, from empty to full


def bucket_max(values: Sequence[float], n: int) -> list[float]:
    """`values` squeezed into at most `n` columns, each the max of its share: a spike (a tensor
    that loses much) stays visible however many tensors share a column."""
    if len(values) <= n:
        return list(values)
    out = []
    for i in range(n):
        a, b = i * len(values) // n, (i + 1) * len(values) // n
        out.append(max(values[a:max(b, a + 1)]))
    return out


def vbars(values: Sequence[float], width: int, height: int) -> list[str]:
    """Vertical bars, tallest value = full height, in eighths of a cell; each value gets an
    equal share of `width` columns (at least one; more values than columns are bucketed)."""
    if width <= 0 or height <= 0:
        return []
    vals = [max(0.0, float(v)) for v in bucket_max(values, width)]
    if not vals:
        return [" " * width] * height
    top = max(vals)
    span = max(1, width // len(vals))
    eighths = [round(v / top * height * 8) if top > 0 else 0 for v in vals]
    lines = []
    for r in range(height, 0, -1):  # top row first
        floor = (r - 1) * 8
        cells = "".join(BLOCKS[min(8, max(0, e - floor))] * span for e in eighths)
        lines.append(cells.ljust(width))
    return lines


def progress_bar(fraction: float, width: int) -> str:
    """A bar of `width` cells filled to `fraction` in eighths, then the percentage."""
    f = min(1.0, max(0.0, fraction))
    n = round(f * width * 8)
    full, part = divmod(n, 8)
    bar = "█" * full + (BLOCKS[part] if part else "")
    return f"{bar.ljust(width, '·')} {f * 100:3.0f}%"


def worst(pairs: Sequence[tuple[str, float]], n: int) -> list[tuple[str, float]]:
    """The `n` (name, value) pairs with the highest values, highest first."""
    return sorted(pairs, key=lambda p: p[1], reverse=True)[:n]
