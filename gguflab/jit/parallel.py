"""Split a range of rows across a shared thread pool. Compiled kernels release the GIL,
so the pool's threads run them truly in parallel."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


@cache
def _pool(n: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=n, thread_name_prefix="gguflab")


def parallel_rows(
    fn: Callable[[int, int], object], n_rows: int, threads: int | None = None, min_rows: int = 1
) -> None:
    """Call `fn(start, stop)` over [0, n_rows) in at most `threads` contiguous slices of at
    least `min_rows` rows; the calling thread takes the first slice itself."""
    threads = threads or default_threads()
    parts = max(1, min(threads, n_rows // max(1, min_rows)))
    if parts == 1:
        fn(0, n_rows)
        return
    bounds = [n_rows * k // parts for k in range(parts + 1)]
    futures = [_pool(threads).submit(fn, bounds[k], bounds[k + 1]) for k in range(1, parts)]
    fn(bounds[0], bounds[1])
    for f in futures:
        f.result()
