"""Per-layer speedup bars as a matplotlib figure (see :mod:`.figures`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator

from nbcompress.notebook.display.figures import show_figures_in_notebooks

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from nbcompress.engine.speedup.speedup import SpeedupReport

__all__ = ["layer_label", "ms_label", "speedup_figure"]

#: A log axis only when the bars span more than this factor (else linear reads better).
LOG_SPAN = 20


def ms_label(value: float, _: Any = None) -> str:
    """A tick in milliseconds without offset or exponent notation: ``0.05``, ``2``, ``150``."""
    if value <= 0:
        return "0"
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}" if value >= 0.01 else f"{value:.1g}"


def layer_label(row: dict[str, Any]) -> str:
    """The layer's name, with its type below it when the name is a bare index such as ``3``."""
    name, kind = row["layer"], row.get("type")
    last = name.rsplit(".", 1)[-1]
    return f"{name}\n{kind}" if kind and last.isdigit() else name


def speedup_figure(report: SpeedupReport, ax: Axes | None = None) -> Figure:
    """The figure behind ``SpeedupReport.plot``: per-layer time of each path, in ms.

    Args:
        report: A speedup report.
        ax: Axes to draw into (e.g. one panel of the caller's figure); ``None`` builds a
            fresh figure sized to the number of layers.

    Returns:
        The figure holding the bars.
    """
    if ax is None:
        fig = Figure(figsize=(max(6, 1.2 * len(report.rows) + 2), 3.8), layout="constrained")
        ax = fig.add_subplot()
        show_figures_in_notebooks()
    paths = report.paths
    width = 0.8 / max(1, len(paths))
    xs = np.arange(len(report.rows))
    shown = []
    for k, path in enumerate(paths):
        values = [1e3 * (r.get(path) or 0.0) for r in report.rows]
        ax.bar(xs + k * width, values, width, label=path)
        shown += [v for v in values if v > 0]
    labels = [layer_label(r) for r in report.rows]
    rotate = len(labels) > 8 or max((len(x) for x in labels), default=0) > 12
    ax.set_xticks(
        xs + width * (len(paths) - 1) / 2,
        labels,
        rotation=45 if rotate else 0,
        ha="right" if rotate else "center",
        fontsize=8,
    )
    _time_axis(ax, shown)
    speedup = "—" if report.speedup is None else f"{report.speedup:.2f}×"
    reused = sum(bool(r.get("recorded")) for r in report.rows)
    # Decisions reused from the tuning record have no bars: say so rather than show gaps.
    note = f" ({reused} layer(s) recorded earlier, not timed now)" if reused else ""
    ax.set_title(f"measured time per layer call; end to end {speedup}{note}")
    if paths:  # none when every layer was recorded earlier: no bars to name
        ax.legend(fontsize=8)
    if ax.figure.get_layout_engine() is None:
        ax.figure.tight_layout()  # a caller's figure without a layout of its own
    return ax.figure


def _time_axis(ax: Axes, values: list[float]) -> None:
    """Milliseconds on a linear axis, or a log axis with 1-2-5 ticks if they span decades."""
    ax.set_ylabel("time per call (ms)")
    if values and max(values) / min(values) > LOG_SPAN:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda *_: ""))
    else:
        ax.yaxis.set_major_locator(MaxNLocator(nbins=6))
    ax.yaxis.set_major_formatter(FuncFormatter(ms_label))
    ax.grid(axis="y", alpha=0.3)
