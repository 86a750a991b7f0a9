"""The trials of a search drawn as metric vs sparsity, the Pareto front highlighted."""

from __future__ import annotations

from typing import TYPE_CHECKING

from matplotlib.figure import Figure

if TYPE_CHECKING:
    from nbcompress.engine.search.result import SearchResult

__all__ = ["search_figure"]


def search_figure(result: SearchResult) -> Figure:
    """Every completed trial as a point; the deduplicated front as a connected line."""
    fig = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = fig.add_subplot()
    done = result.completed()
    ax.scatter(
        [t.sparsity for t in done], [t.metric for t in done], s=14, color="tab:gray",
        alpha=0.6, label=f"trials ({len(done)})",
    )  # fmt: skip
    front = result.pareto()
    ax.plot(
        [t.sparsity for t in front], [t.metric for t in front], "o-", color="tab:red",
        label=f"Pareto front ({len(front)})",
    )  # fmt: skip
    if result.target_sparsity is not None:
        ax.axvline(result.target_sparsity, color="tab:blue", linestyle=":", label="target")
    ax.set_xlabel("sparsity of the searched layers")
    ax.set_ylabel("metric")
    ax.set_title(result.title(), fontsize="medium")
    ax.legend(loc="best", fontsize="small")
    return fig
