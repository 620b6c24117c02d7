"""Sizes and times as the CLI and the TUI print them."""

from __future__ import annotations

from gguflab.fmt import duration


def test_duration_is_h_mm_ss():
    assert duration(0) == "0:00:00"
    assert duration(59.4) == "0:00:59"
    assert duration(61) == "0:01:01"
    assert duration(2 * 3600 + 3 * 60 + 4.6) == "2:03:05"
    assert duration(-3) == "0:00:00"
