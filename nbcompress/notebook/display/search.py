"""The trials of a search drawn as metric vs sparsity, the Pareto front highlighted.

One drawing function serves ``SearchResult.plot()`` and the live view of ``%search`` (which
calls it on the trials finished so far, and with the point chosen in its selector).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

if TYPE_CHECKING:
    from nbcompress.engine.search.result import SearchResult, SearchTrial

__all__ = ["search_figure"]


def search_figure(result: SearchResult, *, selected: SearchTrial | None = None) -> Figure:
    """Every completed trial as a point; the deduplicated front as a connected line.

    Args:
        result: The search (or the part of it finished so far).
        selected: A trial to ring (the live view's chosen front point), or ``None``.

    Returns:
        A fresh ``Figure`` (no pyplot state is touched).
    """
    fig = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = fig.add_subplot()
    done = result.completed()
    failed = len(result.trials) - len(done)
    ax.scatter(
        [t.sparsity for t in done], [t.metric for t in done], s=14, color="tab:gray",
        alpha=0.6, label=f"trials ({len(done)}" + (f"; {failed} failed)" if failed else ")"),
    )  # fmt: skip
    front = result.pareto()
    ax.plot(
        [t.sparsity for t in front], [t.metric for t in front], "o-", color="tab:red",
        label=f"Pareto front ({len(front)})",
    )  # fmt: skip
    if selected is not None and selected.ok:
        ax.scatter(
            [selected.sparsity], [selected.metric], s=160, facecolor="none", edgecolor="black",
            linewidth=1.6, zorder=5, label=f"chosen (#{selected.number})",
        )  # fmt: skip
    if result.target_sparsity is not None:
        ax.axvline(result.target_sparsity, color="tab:blue", linestyle=":", label="target")
    ax.set_xlabel("sparsity of the searched layers")
    ax.xaxis.set_major_formatter(PercentFormatter(xmax=1.0))  # as the tables: 90.0%
    ax.set_ylabel("metric")
    ax.set_title(result.title(), fontsize="medium")
    ax.legend(loc="best", fontsize="small")
    return fig
