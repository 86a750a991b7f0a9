"""Per-layer speedup bars as a matplotlib figure (see :mod:`.figures`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

from nbcompress.notebook.display.figures import show_figures_in_notebooks

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from nbcompress.engine.speedup.speedup import SpeedupReport

__all__ = ["speedup_figure"]


def speedup_figure(report: SpeedupReport, ax: Axes | None = None) -> Figure:
    """The figure behind ``SpeedupReport.plot``: per-layer time of each path, log scale.

    Args:
        report: A speedup report.
        ax: Axes to draw into (e.g. one panel of the caller's figure); ``None`` builds a
            fresh figure sized to the number of layers.

    Returns:
        The figure holding the bars.
    """
    if ax is None:
        fig = Figure(figsize=(max(6, 1.2 * len(report.rows) + 2), 3.5), layout="constrained")
        ax = fig.add_subplot()
        show_figures_in_notebooks()
    paths = report.paths
    width = 0.8 / max(1, len(paths))
    xs = np.arange(len(report.rows))
    for k, path in enumerate(paths):
        values = [1e3 * (r.get(path) or 0.0) for r in report.rows]
        ax.bar(xs + k * width, values, width, label=path)
    ax.set_xticks(xs + width * (len(paths) - 1) / 2, [r["layer"] for r in report.rows])
    ax.set_ylabel("time per call (ms)")
    ax.set_yscale("log")
    speedup = "—" if report.speedup is None else f"{report.speedup:.2f}×"
    ax.set_title(f"measured per-layer time; end to end {speedup}")
    ax.legend(fontsize=8)
    if ax.figure.get_layout_engine() is None:
        ax.figure.tight_layout()  # a caller's figure without a layout of its own
    return ax.figure
