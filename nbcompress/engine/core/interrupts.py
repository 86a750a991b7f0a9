"""Critical sections that Ctrl-C cannot cut in half.

Recording a history step, rolling an edit back and undoing a step must each finish once
started: a ``KeyboardInterrupt`` half-way would leave a model that is neither the old one nor
the new one. :func:`deferred_interrupts` holds SIGINT back for the length of such a section
and delivers it right after.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["deferred_interrupts"]

# Main-thread state: nesting depth and the signals received while deferred.
_STATE: dict[str, Any] = {"depth": 0, "pending": []}


def _record(signum: int, frame: Any) -> None:
    _STATE["pending"].append(signum)


def _deliver(previous: Any) -> None:
    """Hand a deferred SIGINT to the handler that was installed before the section."""
    if callable(previous):
        previous(signal.SIGINT, None)  # default_int_handler raises KeyboardInterrupt
    elif previous != signal.SIG_IGN:
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT (Ctrl-C) back while the block runs; deliver it when the block ends.

    On the main thread a handler that only notes the signal replaces the current one for
    the block; on exit the previous handler is put back and, if a SIGINT arrived, called
    (Python's default raises ``KeyboardInterrupt`` there). Nested blocks defer to the
    outermost one. Off the main thread (where signals are never delivered) it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _STATE["depth"]:
        _STATE["depth"] += 1
        try:
            yield
        finally:
            _STATE["depth"] -= 1
        return
    if signal.getsignal(signal.SIGINT) is None:  # installed outside Python: cannot restore it
        yield
        return
    try:
        previous = signal.signal(signal.SIGINT, _record)
    except ValueError:  # not the main interpreter: signals are not ours to handle
        yield
        return
    _STATE["depth"], _STATE["pending"] = 1, []
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _STATE["depth"] = 0
        if _STATE["pending"]:
            _STATE["pending"] = []
            _deliver(previous)
