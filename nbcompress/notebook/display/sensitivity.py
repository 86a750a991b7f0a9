"""Sensitivity curves and heat maps as matplotlib figures (see :mod:`.figures`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

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
    ax.set_xlim(0, 1)
    ax.set_title(_title(result))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="lower left" if result.higher_is_better else "upper left")
    return fig


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
    image = ax.imshow(np.ma.masked_invalid(drop), aspect="auto", cmap="magma_r", vmin=0)
    ax.set_xticks(range(len(result.ratios)), [f"{r:.0%}" for r in result.ratios])
    ax.set_yticks(range(len(result.layers)), result.layers, fontsize="small")
    ax.set_xlabel(_xlabel(result))
    ax.set_title(_title(result))
    bar = fig.colorbar(image, ax=ax)
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
