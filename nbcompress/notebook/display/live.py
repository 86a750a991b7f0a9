"""The live view of a running sensitivity sweep: its plot and a progress bar, redrawn in place."""

from __future__ import annotations

import contextlib
import html
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nbcompress.engine.sensitivity.result import SensitivityResult

__all__ = ["LiveView", "closing"]


class LiveView:
    """Live plot and progress bar of a running sweep in one updatable display."""

    def __init__(self, total: int, *, min_interval: float = 0.5) -> None:
        from IPython.display import HTML, display

        self.total, self.min_interval, self._last = total, min_interval, 0.0
        self._html = HTML
        self.handle = display(HTML("<i>sensitivity sweep starting…</i>"), display_id=True)
        self.updates = 0

    def __call__(self, result: SensitivityResult, layer: str, ratio: float) -> None:
        """Callback of the sweep: redraw at most every ``min_interval`` seconds."""
        done = result.evaluations - 1
        if done < self.total and time.monotonic() - self._last < self.min_interval:
            return
        self.show(result, f"{layer} at {ratio:.0%}")

    def show(self, result: SensitivityResult, where: str = "", *, plot: bool = True) -> None:
        """Redraw the progress bar, and the plot unless ``plot=False``.

        The last redraw of a sweep whose explorer follows leaves the plot out: the explorer
        draws the same curves, and a notebook should show them once.
        """
        from nbcompress.notebook.display.figures import figure_html

        done = result.evaluations - 1
        bar = (
            f"<progress value='{done}' max='{self.total}' style='width:30em'></progress> "
            f"{done}/{self.total} evaluations, {result.seconds:.1f} s {html.escape(where)}"
        )
        figure = figure_html(result.plot("auto"), alt="sensitivity plot") if plot else ""
        self.handle.update(self._html(f"<div>{bar}</div>{figure}"))
        self._last = time.monotonic()
        self.updates += 1

    def stopped(self) -> None:
        """The sweep raised: say so under what it drew; before any point, show nothing.

        A sweep refused before its first evaluation (no --eval, a bad layer pattern) has
        only the error to show: a second line about it would be noise.
        """
        text = "<i>sensitivity sweep stopped: see the error.</i>" if self.updates else ""
        self.handle.update(self._html(text))


@contextlib.contextmanager
def closing(live: LiveView | None) -> Iterator[None]:
    """Mark ``live`` as stopped if the block raises (an error or Ctrl-C), then re-raise."""
    try:
        yield
    except BaseException:
        if live is not None:
            live.stopped()
        raise
