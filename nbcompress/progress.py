"""One progress reporter for every long step: a live bar in a notebook, lines on stdout elsewhere.

Like ``tqdm.notebook``, only the display depends on where it runs. In a Jupyter kernel with a
frontend it is one updatable HTML display (a ``<progress>`` bar, done/total, rate, elapsed
and ETA), redrawn at most twice a second. Anywhere else it prints one line to **stdout**
every few seconds: progress is normal output, never the stderr (error) box. Both end with
one line holding the total time. IPython is only used if it is already imported and runs
a kernel, so the engine can report progress without depending on the notebook layer.

Example::

    with Progress(8, "train", unit="epoch") as bar:
        for epoch in range(8):
            ...
            bar.update(note=f"loss {loss:.4f}")
"""

from __future__ import annotations

import html
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

__all__ = ["Progress", "clock", "in_notebook", "plural"]

#: Seconds between redraws of the notebook display (at most ~2 per second).
HTML_INTERVAL = 0.5
#: Seconds between two progress lines in a terminal or a log.
LINE_INTERVAL = 5.0


def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (rich output is shown), IPython not imported."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return getattr(shell, "kernel", None) is not None


def clock(seconds: float) -> str:
    """A duration for a person: ``"0.4 s"``, ``"12 s"``, ``"2 min 05 s"``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest:02d} s"


def plural(unit: str) -> str:
    """``"epoch"`` → ``"epochs"``, ``"batch"`` → ``"batches"``."""
    return unit + ("es" if unit.endswith(("s", "x", "sh", "tch")) else "s")


def _print(text: str) -> None:
    print(text, flush=True)  # flushed: a line must show before the next long stretch


class Progress:
    """Where a long step stands: done/total, rate, elapsed and ETA, then the total time.

    Attributes:
        total: Units in all (``None``: unknown, no ETA).
        desc: What runs, e.g. ``"train"``; starts every line.
        unit: The unit counted, e.g. ``"epoch"`` (pluralised with an ``s``).
        done: Units done so far.
        note: Free text shown after the figures (the latest loss, the current layer).
        shown: Number of redraws or lines so far (0: nothing was shown).
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "step",
        *,
        delay: float = 0.0,
        enabled: bool = True,
        notebook: bool | None = None,
        write: Callable[[str], None] | None = None,
        every: float | None = None,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        """Start the clock (nothing is shown before ``delay`` seconds have passed).

        Args:
            total: Units in all, or ``None`` if unknown.
            desc: What runs; starts every line.
            unit: The unit counted.
            delay: Show nothing for a step shorter than this (seconds), final line included.
            enabled: ``False`` shows nothing at all.
            notebook: Force the HTML display (``True``) or lines (``False``); ``None``
                picks the display when running in a Jupyter kernel.
            write: Where lines go (default: ``print`` to stdout, flushed).
            every: Seconds between redraws (default 0.5 in a notebook, 5 elsewhere).
            timer: The clock (injectable for tests).
        """
        self.total, self.desc, self.unit = total, desc, unit
        self.done, self.note, self.shown = 0, "", 0
        self.enabled, self.delay = enabled, delay
        self._timer = timer
        self._start = self._last = timer()
        self._html = in_notebook() if notebook is None else notebook
        self._every = (
            every if every is not None else (HTML_INTERVAL if self._html else LINE_INTERVAL)
        )
        self._write = write or _print
        self._handle: Any = None
        self._closed = False
        if enabled and delay <= 0:
            self._show()

    @property
    def elapsed(self) -> float:
        """Seconds since the reporter was created."""
        return self._timer() - self._start

    def update(self, n: int = 1, note: str | None = None) -> None:
        """Count ``n`` more units done (and replace the note); redraw if it is time to."""
        self.done += n
        if note is not None:
            self.note = note
        if not self.enabled:
            return
        now = self._timer()
        if now - self._start < self.delay:
            return
        if not self.shown or now - self._last >= self._every:
            self._show()

    def status(self) -> str:
        """``"train: 12/40 batches, 9.1 batches/s, 1.3 s elapsed, ETA 3.1 s — loss 0.41"``."""
        elapsed = self.elapsed
        units = plural(self.unit)
        count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        parts = [f"{self.desc}: {count} {units}"]
        if self.done and elapsed > 0:
            rate = self.done / elapsed
            parts.append(f"{rate:.3g} {units}/s" if rate >= 1 else f"{1 / rate:.3g} s/{self.unit}")
        parts.append(f"{clock(elapsed)} elapsed")
        if self.total is not None:
            left = max(0, self.total - self.done)
            parts.append("ETA " + (clock(elapsed / self.done * left) if self.done else "—"))
        return ", ".join(parts) + (f" — {self.note}" if self.note else "")

    def close(self, note: str | None = None) -> None:
        """The final line: units done and the total time (only if anything was shown)."""
        if self._closed:
            return
        self._closed = True
        if note is not None:
            self.note = note
        if not self.enabled or (not self.shown and self.elapsed < self.delay):
            return
        short = self.total is not None and self.done < self.total
        count = f"{self.done} of {self.total}" if short else f"{self.done}"
        text = f"{self.desc}: {count} {plural(self.unit)} in {clock(self.elapsed)}"
        text += " (stopped early)" if short else " (done)"
        self._render(text + (f" — {self.note}" if self.note else ""))

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    def _show(self) -> None:
        self._last = self._timer()
        self._render(self.status())

    def html(self, text: str | None = None) -> str:
        """The bar and ``text`` (default :meth:`status`) as HTML, for a caller's own display.

        A live view that redraws more than progress (the sensitivity sweep's plot) can
        put this above its content and keep one display.
        """
        text = self.status() if text is None else text
        total = self.total if self.total else max(self.done, 1)
        value = min(self.done, total)
        bar = f"<progress value='{value}' max='{total}' style='width:20em'></progress> "
        return f"<div class='nbcompress-progress'>{bar}{html.escape(text)}</div>"

    def _render(self, text: str) -> None:
        self.shown += 1
        if not self._html:
            self._write(text)
            return
        from IPython.display import HTML, display  # only reached inside a running kernel

        body = HTML(self.html(text))
        if self._handle is None:
            self._handle = display(body, display_id=True)
        else:
            self._handle.update(body)
