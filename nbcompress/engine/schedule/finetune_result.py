"""What a fine-tuning run returns: per-epoch loss, metric, sparsity and time, and its curve."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nbcompress.engine.core.report import Table, TableReport, fmt_pct

__all__ = ["FinetuneResult"]


def _fmt(value: float | None, pattern: str = "{:.4f}") -> str:
    return "—" if value is None else pattern.format(value)


@dataclass(repr=False)
class FinetuneResult(TableReport):
    """The history of one :func:`~nbcompress.engine.schedule.finetune.finetune` run.

    Shown as the shared result table (text in a terminal, HTML in a notebook).

    Attributes:
        loss: Mean training loss of each finished epoch (the data loss, without the L1 term).
        metric: Validation metric after each finished epoch (``None`` without ``val``).
        sparsity: Fraction of zero weights of the prunable layers after each epoch (measured).
        seconds: Wall time of each epoch's training (validation not included).
        steps: Optimizer steps finished (the model is as after the last of them).
        epochs: Epochs asked for.
        interrupted: Ctrl-C stopped the run early.
        metric_name: What ``metric`` measures (``"accuracy"`` for ``val=(x, y)``).
        curve: ``(step, loss, sparsity)`` points at each progress update: the loss is the
            mean over the steps since the previous point; the sparsity the pruner's
            (``None`` without one).
    """

    loss: list[float] = field(default_factory=list)
    metric: list[float | None] = field(default_factory=list)
    sparsity: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    steps: int = 0
    epochs: int = 0
    interrupted: bool = False
    metric_name: str = "metric"
    curve: list[tuple[int, float, float | None]] = field(default_factory=list)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One plain dict per finished epoch: epoch, loss, metric, sparsity, seconds."""
        return [
            {
                "epoch": i + 1,
                "loss": self.loss[i],
                self.metric_name: self.metric[i],
                "sparsity": self.sparsity[i],
                "seconds": self.seconds[i],
            }
            for i in range(len(self.loss))
        ]

    def _status(self) -> str:
        done = len(self.loss)
        stop = f", interrupted after step {self.steps}" if self.interrupted else ""
        return f"finetune: {done}/{self.epochs} epochs, {self.steps} steps{stop}"

    def _table(self) -> Table:
        columns = {
            "epoch": None,
            "loss": "{:.4f}".format,
            self.metric_name: _fmt,
            "sparsity": fmt_pct,
            "seconds": "{:.2f}".format,
        }
        return Table(self.rows, columns, self._status())

    def plot(self) -> Any:
        """A matplotlib Figure of the loss and sparsity curves over the steps."""
        from nbcompress.notebook.display.training import training_figure

        return training_figure(self)
