"""SIGTERM and SIGHUP taken the way Ctrl-C is: `kill`, a closed terminal or a dropped SSH
session raise KeyboardInterrupt in the main thread, so every writer's cleanup (the partial
file removed, an existing target left as it was) runs for them as it does for Ctrl-C.

A SIGHUP that is ignored when the process starts (`nohup gguflab ...`) stays ignored."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

HANDLED = (signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A KeyboardInterrupt raised by SIGTERM or SIGHUP; `signum` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_raised = False


def _raise_interrupted(signum: int, frame: object) -> None:
    # once only: a second signal must not break into the cleanup the first one started
    global _raised
    if not _raised:
        _raised = True
        raise Interrupted(signum)


def install() -> bool:
    """Make SIGTERM and SIGHUP raise `Interrupted` in the main thread (a no-op elsewhere).
    True when installed."""
    global _raised
    if threading.current_thread() is not threading.main_thread():
        return False
    _raised = False
    for s in HANDLED:
        if signal.getsignal(s) == signal.SIG_IGN:  # nohup: the user asked to survive a hangup
            continue
        signal.signal(s, _raise_interrupted)
    return True


@contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """`install()` for the time of a block, then the handlers as they were (main() runs
    inside test processes too)."""
    saved = {s: signal.getsignal(s) for s in HANDLED}
    installed = install()
    try:
        yield
    finally:
        if installed:
            for s, h in saved.items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)


def signal_name(e: BaseException) -> str | None:
    """"SIGTERM" / "SIGHUP" for an interrupt raised by those, else None (Ctrl-C)."""
    return signal.Signals(e.signum).name if isinstance(e, Interrupted) else None


def exit_code(e: KeyboardInterrupt) -> int:
    """The shell's convention: 128 + the signal's number (130 for Ctrl-C)."""
    return 128 + (e.signum if isinstance(e, Interrupted) else signal.SIGINT)
