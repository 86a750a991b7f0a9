"""The demo's output: a numbered line per step with the time elapsed, indented details."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

__all__ = ["StepLog"]


class StepLog:
    """Prints ``[3/7 · 12.4 s] title …`` when a step starts and its duration when it ends.

    Every line goes to stdout and is flushed at once, so that a long step shows its heading
    before it starts working; the package's own progress (sweep lines, the fine-tuning
    bar) appears under that heading.

    Attributes:
        total: Number of steps announced in each heading.
        times: Step title → seconds it took, in order.
    """

    def __init__(self, total: int, write: Callable[[str], None] | None = None) -> None:
        self.total = total
        self.times: dict[str, float] = {}
        self._write = write or _print
        self._start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        """Seconds since the log was created."""
        return time.perf_counter() - self._start

    def say(self, text: str = "", indent: int = 2) -> None:
        """Print ``text`` (each line indented under the current step)."""
        pad = " " * indent
        self._write("\n".join(pad + line if line else line for line in text.split("\n")))

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        """Announce a step, run the body, then print how long it took."""
        number = len(self.times) + 1
        self._write(f"\n[{number}/{self.total} · {self.elapsed:.1f} s] {title} …")
        start = time.perf_counter()
        yield
        self.times[title] = seconds = time.perf_counter() - start
        self.say(f"({seconds:.1f} s)")


def _print(text: str) -> None:
    # Progress bars of the package write to stderr: flush both so that lines stay in order.
    sys.stderr.flush()
    print(text, flush=True)
