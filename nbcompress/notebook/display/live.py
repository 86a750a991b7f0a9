"""The live view of a running sensitivity sweep: its plot and a progress bar, redrawn in place."""

from __future__ import annotations

import contextlib
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

        from nbcompress.progress import Progress

        self.total, self.min_interval, self._last = total, min_interval, 0.0
        self._html = HTML
        # Rate and ETA as every other long step shows them; drawn here, above the plot.
        self.progress = Progress(total, "sensitivity", "evaluation", enabled=False)
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

        self.progress.done, self.progress.note = result.evaluations - 1, where
        figure = figure_html(result.plot("auto"), alt="sensitivity plot") if plot else ""
        self.handle.update(self._html(f"{self.progress.html()}{figure}"))
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
