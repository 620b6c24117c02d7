"""Small character plots for the terminal (the CLI prints them, the TUI shows the same
string), so that a sweep's size/quality trade-off can be seen without leaving the shell."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Point:
    x: float
    y: float
    label: str
    marked: bool | None = None  # drawn '*' when True, 'o' when False, '+' when unknown


MARKS = {True: "*", False: "o", None: "+"}


def _ticks(lo: float, hi: float, log: bool) -> tuple[float, float]:
    """Axis range with a little room, so points never sit on the frame."""
    if log:
        lo, hi = math.log10(lo), math.log10(hi)
    if hi - lo < 1e-12:
        lo, hi = lo - 1.0, hi + 1.0
    pad = 0.05 * (hi - lo)
    return lo - pad, hi + pad


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e5 or abs(v) < 1e-3:
        return f"{v:.2g}"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.4g}"


def scatter(points: list[Point], x_label: str, y_label: str, width: int = 64,
            height: int = 16, log_y: bool = False) -> str:
    """A labelled scatter plot as plain text: y axis on the left, x axis below, each point a
    mark followed by its label where there is room. `log_y` needs every y > 0."""
    pts = [p for p in points if math.isfinite(p.x) and math.isfinite(p.y)
           and (p.y > 0 or not log_y)]
    if not pts:
        return f"(nothing to plot: no {y_label} values)"
    x0, x1 = _ticks(min(p.x for p in pts), max(p.x for p in pts), False)
    y0, y1 = _ticks(min(p.y for p in pts), max(p.y for p in pts), log_y)
    grid = [[" "] * width for _ in range(height)]

    def col(x: float) -> int:
        return min(width - 1, max(0, round((x - x0) / (x1 - x0) * (width - 1))))

    def row(y: float) -> int:
        v = math.log10(y) if log_y else y
        return min(height - 1, max(0, round((y1 - v) / (y1 - y0) * (height - 1))))

    placed = [(row(p.y), col(p.x), p) for p in sorted(pts, key=lambda p: p.x)]
    for r, c, p in placed:  # marks first, so that no label hides a point
        grid[r][c] = MARKS[p.marked]
    crowded = []  # points whose label found no room beside them
    for r, c, p in placed:  # then each label right of its mark, else left
        for start, text in ((c + 1, " " + p.label), (c - len(p.label) - 1, p.label + " ")):
            end = start + len(text)
            if start >= 0 and end <= width and all(ch == " " for ch in grid[r][start:end]):
                grid[r][start:end] = list(text)
                break
        else:
            crowded.append(f"{MARKS[p.marked]} {p.label} ({_fmt(p.x)}, {_fmt(p.y)})")

    def y_at(r: int) -> float:
        v = y1 - r * (y1 - y0) / (height - 1)
        return 10 ** v if log_y else v

    labels = {0: _fmt(y_at(0)), height // 2: _fmt(y_at(height // 2)),
              height - 1: _fmt(y_at(height - 1))}
    margin = max(len(s) for s in labels.values()) + 1
    lines = [f"{y_label}{' (log scale)' if log_y else ''}"]
    for r in range(height):
        lines.append(f"{labels.get(r, ''):>{margin}}|" + "".join(grid[r]).rstrip())
    lines.append(" " * margin + "+" + "-" * width)
    left, right = _fmt(x0), _fmt(x1)
    lines.append(" " * (margin + 1) + left + right.rjust(width - len(left)))
    lines.append(" " * (margin + 1) + x_label.center(width).rstrip())
    if crowded:
        lines.append(" " * (margin + 1) + "not labelled above: " + ", ".join(crowded))
    return "\n".join(lines)
