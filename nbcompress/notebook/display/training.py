"""The loss and sparsity curves of a fine-tuning run, drawn live in the notebook."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from matplotlib.figure import Figure

if TYPE_CHECKING:
    from nbcompress.engine.schedule.finetune_result import FinetuneResult

__all__ = ["LiveTrainingPlot", "training_figure"]


def training_figure(result: FinetuneResult) -> Figure:
    """Loss over the steps (left axis) and the pruner's sparsity (right axis, if any)."""
    fig = Figure(figsize=(6.4, 3.0), layout="constrained")
    ax = fig.add_subplot()
    steps = [p[0] for p in result.curve]
    ax.plot(steps, [p[1] for p in result.curve], color="tab:blue", label="training loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss", color="tab:blue")
    sparse = [(s, p) for s, _, p in result.curve if p is not None]
    if sparse:
        right = ax.twinx()
        right.plot([s for s, _ in sparse], [p for _, p in sparse], color="tab:red")
        right.set_ylabel("sparsity", color="tab:red")
        right.set_ylim(0, 1)
    state = "interrupted" if result.interrupted else f"{len(result.loss)}/{result.epochs} epochs"
    ax.set_title(f"finetune: {state}, {result.steps} steps", fontsize="medium")
    return fig


class LiveTrainingPlot:
    """A callback of ``finetune``: redraws the curves in one display, at most every second."""

    def __init__(self, *, min_interval: float = 1.0) -> None:
        self.min_interval, self._last, self.handle, self.updates = min_interval, 0.0, None, 0
        self._epochs = 0

    def __call__(self, result: FinetuneResult) -> None:
        """Redraw if ``min_interval`` passed, and always first and at an epoch's end."""
        due = self.handle is None or self._epochs != len(result.loss)
        if not due and time.monotonic() - self._last < self.min_interval:
            return
        self.show(result)

    def show(self, result: FinetuneResult) -> None:
        """Redraw now."""
        from IPython.display import Image, display

        from nbcompress.notebook.display.figures import png_bytes

        image = Image(png_bytes(training_figure(result)))
        if self.handle is None:
            self.handle = display(image, display_id=True)
        else:
            self.handle.update(image)
        self._epochs, self._last = len(result.loss), time.monotonic()
        self.updates += 1
