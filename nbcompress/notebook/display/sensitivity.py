"""Sensitivity curves and heat maps as matplotlib figures (see :mod:`.figures`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

from nbcompress.notebook.display.figures import show_figures_in_notebooks

if TYPE_CHECKING:
    from nbcompress.engine.sensitivity.result import SensitivityResult

__all__ = ["MAX_CURVES", "curves_figure", "heatmap_figure", "sensitivity_figure"]

#: Above this many layers "auto" draws a heat map: more lines than that are unreadable.
MAX_CURVES = 12
_KINDS = ("auto", "curves", "heatmap")


def _ylabel(result: SensitivityResult) -> str:
    label = f"{result.metric} (proxy)" if result.proxy else result.metric
    return label + ("" if result.higher_is_better else " — lower is better")


def _xlabel(result: SensitivityResult) -> str:
    if result.remove:
        return "fraction of the group's channels removed"
    return "fraction of the layer's weights pruned"


def _title(result: SensitivityResult) -> str:
    state = "" if result.complete else " (incomplete)"
    if result.remove:
        return f"Sensitivity to removing coupled channel groups{state}"
    return f"Sensitivity to {result.granularity} L1 pruning{state}"


def curves_figure(
    result: SensitivityResult,
    *,
    highlight: dict[str, float] | None = None,
    width: float = 7.0,
    height: float = 4.2,
) -> Figure:
    """Metric vs pruning ratio, one line per layer (Distiller-style).

    Args:
        result: A (possibly partial) sensitivity result.
        highlight: Layer → ratio to mark with a dot (e.g. the current suggestion).
        width: Figure width in inches.
        height: Figure height in inches.

    Returns:
        The figure.
    """
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.add_subplot()
    ax.axhline(result.baseline, color="0.5", linestyle="--", linewidth=1, label="unpruned")
    for i, layer in enumerate(result.layers):
        pts = [(0.0, result.baseline)]
        pts += [
            (r, v)
            for r, v in zip(result.ratios, result.curves[layer], strict=True)
            if v is not None
        ]
        x, y = zip(*pts, strict=True)
        (line,) = ax.plot(
            x, y, marker="o", markersize=3, linewidth=1.4, label=layer, color=f"C{i % 10}"
        )
        filled = set(result.filled.get(layer, ()))
        hollow = [(r, v) for j, (r, v) in enumerate(zip(result.ratios, result.curves[layer]))
                  if j in filled and v is not None]  # fmt: skip
        if hollow:  # filled in after the layer collapsed, not evaluated: drawn hollow
            hx, hy = zip(*hollow, strict=True)
            ax.plot(hx, hy, "o", markersize=5, markerfacecolor="white", color=line.get_color())
        if highlight and highlight.get(layer):
            r = highlight[layer]
            ax.plot([r], [np.interp(r, x, y)], "o", markersize=8, color=line.get_color(), alpha=0.5)
    ax.set_xlabel(_xlabel(result))
    ax.set_ylabel(_ylabel(result))
    # The axis ends where the measurements end (a sweep up to 90% leaves no blank to 100%).
    ax.set_xlim(0, max(result.ratios, default=1.0) + 0.01)
    _readable_y(ax, result)
    ax.set_title(_title(result))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="lower left" if result.higher_is_better else "upper left")
    return fig


#: A y axis spans at least this fraction of the baseline: curves within a hair of it (the
#: proxy on an untrained model: 0.99998) read as flat, not as a dramatic fall.
MIN_SPAN = 0.01


def _readable_y(ax: Axes, result: SensitivityResult) -> None:
    """Plain tick labels (no ``+9.999e−1`` offset) and a y range not narrower than MIN_SPAN."""
    ax.yaxis.set_major_formatter(ScalarFormatter(useOffset=False))
    values = [result.baseline] + [
        v for curve in result.curves.values() for v in curve if v is not None and math.isfinite(v)
    ]
    low, high = min(values), max(values)
    span = MIN_SPAN * max(abs(result.baseline), 1e-12) if result.baseline else MIN_SPAN
    if high - low < span:
        # Anchored at the unpruned end, so the (small) drops still read as drops.
        if result.higher_is_better:
            ax.set_ylim(high - span, high + 0.05 * span)
        else:
            ax.set_ylim(low - 0.05 * span, low + span)


def heatmap_figure(result: SensitivityResult, *, width: float = 7.0) -> Figure:
    """Layers × ratios heat map of the metric drop, for models with many layers.

    Args:
        result: A (possibly partial) sensitivity result.
        width: Figure width in inches (the height grows with the number of layers).

    Returns:
        The figure; unevaluated cells are blank.
    """
    sign = 1.0 if result.higher_is_better else -1.0
    drop = np.array(
        [
            [math.nan if v is None else sign * (result.baseline - v) for v in result.curves[n]]
            for n in result.layers
        ],
        dtype=float,
    ).reshape(len(result.layers), len(result.ratios))
    height = min(2.0 + 0.22 * len(result.layers), 40.0)
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.add_subplot()
    # As the curves' y range: drops far below MIN_SPAN of the baseline stay pale.
    floor = MIN_SPAN * (abs(result.baseline) or 1.0)
    top = max(float(np.nanmax(drop)) if np.isfinite(drop).any() else 0.0, floor)
    image = ax.imshow(np.ma.masked_invalid(drop), aspect="auto", cmap="magma_r", vmin=0, vmax=top)
    ax.set_xticks(range(len(result.ratios)), [f"{r:.0%}" for r in result.ratios])
    ax.set_yticks(range(len(result.layers)), result.layers, fontsize="small")
    ax.set_xlabel(_xlabel(result))
    ax.set_title(_title(result))
    bar = fig.colorbar(image, ax=ax)
    bar.formatter = ScalarFormatter(useOffset=False)  # tiny drops: plain numbers
    bar.formatter.set_scientific(False)
    bar.update_ticks()
    bar.set_label(f"drop in {_ylabel(result)}")
    return fig


def sensitivity_figure(result: SensitivityResult, kind: str = "auto") -> Figure:
    """The figure behind ``SensitivityResult.plot``.

    Args:
        result: A sensitivity result.
        kind: ``"curves"``, ``"heatmap"`` or ``"auto"`` (heat map above
            :data:`MAX_CURVES` layers).

    Returns:
        The figure.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind: {kind!r} is unknown; choose one of {_KINDS}.")
    if kind == "auto":
        kind = "heatmap" if len(result.layers) > MAX_CURVES else "curves"
    show_figures_in_notebooks()
    return curves_figure(result) if kind == "curves" else heatmap_figure(result)
