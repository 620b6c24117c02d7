"""The Sweep pane: a sweep's measured rows, sortable, and the size-vs-quality plot."""

from .pane import SweepPane

__all__ = ["SweepPane"]
