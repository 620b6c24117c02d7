"""Files written beside their target as `NAME.partial` and renamed over it only when whole:
a write error, Ctrl-C or a kill (signals.py turns SIGTERM and SIGHUP into exceptions) leaves
the target as it was and no partial file behind, at any point of the write or the rename."""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import IO, Any

PARTIAL_SUFFIX = ".partial"

_open: weakref.WeakSet = weakref.WeakSet()  # every PartialFile not yet committed or aborted
_open_lock = threading.Lock()


class PartialFile:
    """`file` is open on PATH.partial; `commit()` renames it over PATH, `abort()` removes
    it. As a context manager: commit on success, abort on any exception. Write errors
    become `fail(cause)` (the caller's own error type, naming the path)."""

    def __init__(self, path: str | os.PathLike, fail: Callable[[str], Exception],
                 mode: str = "wb"):
        self.path = os.fspath(path)
        self.partial = self.path + PARTIAL_SUFFIX
        self.fail = fail
        self.file: IO[Any] | None = None
        try:
            self.file = open(self.partial, mode, **({} if "b" in mode else {"encoding": "utf-8"}))
        except OSError as e:
            raise fail(f"cannot write: {e.strerror or e}") from None
        with _open_lock:
            _open.add(self)

    def write(self, data: bytes | str) -> None:
        self.guarded(self.file.write, data)

    def guarded(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args), aborting on any exception (an OSError raised as `fail`)."""
        try:
            return fn(*args)
        except BaseException as e:
            self.abort()
            if isinstance(e, OSError):
                raise self.fail(f"cannot write: {e.strerror or e}") from None
            raise

    def commit(self) -> None:
        def close_and_rename() -> None:
            self.file.close()
            os.replace(self.partial, self.path)

        self.guarded(close_and_rename)
        with _open_lock:
            _open.discard(self)

    def abort(self) -> None:
        with _open_lock:
            _open.discard(self)
        try:  # first, so that even a second signal during the close leaves nothing
            os.unlink(self.partial)
        except FileNotFoundError:
            pass
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass

    def __enter__(self) -> PartialFile:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()


def abort_all() -> None:
    """Abort every partial file still open: what an interrupted command does last, so that
    a writer on another thread that has not reached its own cleanup leaves nothing."""
    with _open_lock:
        pending = list(_open)
    for f in pending:
        f.abort()


def write_whole(path: str | os.PathLike, data: bytes | str,
                fail: Callable[[str], Exception]) -> None:
    """`data` into `path` through a partial file (text as UTF-8)."""
    with PartialFile(path, fail, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
