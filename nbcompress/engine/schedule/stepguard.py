"""Ctrl-C between training steps, never inside one, at the cost of a flag per step.

:func:`nbcompress.engine.core.interrupts.deferred_interrupts` swaps the SIGINT handler on
entry and exit of each section: right for a rare edit, but two ``signal.signal`` calls per
optimizer step cost ~4% of a small model's epoch. :class:`StepGuard` installs its handler
once for the whole run; each step only sets and clears a flag. A SIGINT outside a step is
handed to the previous handler at once (a forward can be interrupted); one inside a step is
held back and handed over as the step ends.
"""

from __future__ import annotations

import signal
import threading
from types import TracebackType
from typing import Any

__all__ = ["StepGuard"]


class StepGuard:
    """Installed for a training run (``with StepGuard() as guard``); ``with guard.step():``.

    Off the main thread, or when the SIGINT handler is not Python's to replace, it does
    nothing (signals are then never delivered to this code anyway).
    """

    def __init__(self) -> None:
        self.inside, self.pending, self.previous = False, False, None
        self.active = False

    def _handler(self, signum: int, frame: Any) -> None:
        if self.inside:
            self.pending = True
        else:
            self.deliver()

    def deliver(self) -> None:
        """Hand a SIGINT to the handler that was installed before the run."""
        previous = self.previous
        if callable(previous):
            previous(signal.SIGINT, None)  # default_int_handler raises KeyboardInterrupt
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt

    def __enter__(self) -> StepGuard:
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if previous is not None:  # None: installed outside Python, cannot restore it
                try:
                    self.previous = signal.signal(signal.SIGINT, self._handler)
                    self.active = True
                except ValueError:  # not the main interpreter
                    pass
        return self

    def __exit__(
        self, kind: type | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.active:
            signal.signal(signal.SIGINT, self.previous)
            self.active = False

    def step(self) -> _Step:
        """The context of one step: a SIGINT during it is delivered when it ends."""
        return _Step(self)


class _Step:
    """One guarded step (a plain class: cheaper than a generator context manager)."""

    __slots__ = ("guard",)

    def __init__(self, guard: StepGuard) -> None:
        self.guard = guard

    def __enter__(self) -> None:
        self.guard.inside = True

    def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
        guard = self.guard
        guard.inside = False
        if guard.pending:
            guard.pending = False
            guard.deliver()
