"""Pure drawing and text for the explorer: figures and HTML from a result and a setting.

Nothing here touches a widget, so all of it is testable with ``MPLBACKEND=Agg`` and no
kernel; the explorer only puts the returned PNG and HTML into its widgets.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from nbcompress.engine.core.report import fmt_bytes, fmt_count, fmt_pct
from nbcompress.engine.sensitivity.setting import Footprint
from nbcompress.notebook.display import sensitivity as plots
from nbcompress.notebook.widgets._text import CAPTION, ERROR, SUCCESS, metric_text

__all__ = [
    "MarkedFigure",
    "png_output",
    "fmt_metric",
    "group_layers",
    "header_html",
    "layer_info_html",
    "model_text",
    "readout_html",
    "render",
    "target_of",
    "warning_html",
]


def fmt_metric(value: float | None) -> str:
    """Format a metric value with five significant digits."""
    # Five significant digits: proxy metrics sit near 1 and differ in the 4th–5th digit.
    return "—" if value is None else f"{value:.5g}"


class MarkedFigure:
    """The sweep's figure, drawn once, with markers that move to the current ratios.

    A slider move must stay cheap even for a tall heat map, so the figure is laid out and
    rendered once as a background; :meth:`png` restores it and draws only the markers
    (Agg blitting, ~10× faster than saving the whole figure again).

    Args:
        result: A ``SensitivityResult``.
        dpi: Resolution of the PNGs.
    """

    def __init__(self, result: Any, dpi: int = 90) -> None:
        self.result = result
        self.heatmap = len(result.layers) > plots.MAX_CURVES  # as result.plot() chooses
        self.figure = (plots.heatmap_figure if self.heatmap else plots.curves_figure)(result)
        self.figure.set_dpi(dpi)
        self.canvas = FigureCanvasAgg(self.figure)
        self.canvas.draw()
        # Freeze layout and limits so that markers added later land where they belong
        # on the background rendered now.
        self.figure.set_layout_engine("none")
        for ax in self.figure.axes:
            ax.set_autoscale_on(False)
        self._background = self.canvas.copy_from_bbox(self.figure.bbox)
        self._marks: list[Any] = []

    def _place(self, ratios: Mapping[str, float]) -> list[Any]:
        for artist in self._marks:
            artist.remove()
        ax = self.figure.axes[0]
        if self.heatmap:
            self._marks = _mark_heatmap(ax, self.result, ratios)
        else:
            self._marks = _mark_curves(ax, ratios)
        return self._marks

    def mark(self, ratios: Mapping[str, float]) -> Figure:
        """Move the markers to ``ratios`` (layers at 0 are not marked); return the figure."""
        self._place(ratios)
        return self.figure

    def png(self, ratios: Mapping[str, float]) -> bytes:
        """PNG of the figure with the markers at ``ratios``."""
        self.canvas.restore_region(self._background)
        for artist in self._place(ratios):
            artist.axes.draw_artist(artist)
        buf = io.BytesIO()
        Image.fromarray(np.asarray(self.canvas.buffer_rgba())).save(
            buf, format="png", compress_level=1
        )
        return buf.getvalue()


def render(result: Any, ratios: Mapping[str, float]) -> Figure:
    """The sweep's figure with the current ratio of every layer marked on it.

    Args:
        result: A ``SensitivityResult``.
        ratios: Layer name → current slider ratio (layers at 0 are not marked).

    Returns:
        Curves with a dot per layer at its ratio (up to ``plots.MAX_CURVES`` layers, as
        ``result.plot()`` chooses), else the heat map with a diamond on each layer's row.
    """
    return MarkedFigure(result).mark(ratios)


def _mark_curves(ax: Any, ratios: Mapping[str, float]) -> list[Any]:
    # A solid dot with a dark edge on each layer's own drawn line, so it reads at a glance
    # which point of which curve the slider stands on.
    lines = {line.get_label(): line for line in ax.get_lines()}
    marks = []
    for name, ratio in ratios.items():
        line = lines.get(name)
        if line is None or ratio <= 0:
            continue
        y = np.interp(ratio, line.get_xdata(), line.get_ydata())
        marks += ax.plot(
            [ratio], [y], "o", markersize=9, color=line.get_color(), markeredgecolor="black",
            markeredgewidth=1.2, zorder=5, label="_nolegend_",
        )  # fmt: skip
    return marks


def _mark_heatmap(ax: Any, result: Any, ratios: Mapping[str, float]) -> list[Any]:
    # The heat map's columns are the swept ratios in order and its rows the layers.
    columns = np.arange(len(result.ratios))
    rows = {name: i for i, name in enumerate(result.layers)}
    marked = [(n, r) for n, r in ratios.items() if r > 0 and n in rows]
    xs = [float(np.interp(r, result.ratios, columns)) for _, r in marked]
    ys = [rows[n] for n, _ in marked]
    return [ax.scatter(xs, ys, marker="D", s=28, facecolor="white", edgecolor="black", zorder=5)]


def png_output(png: bytes) -> dict[str, Any]:
    """A ``display_data`` output dict for an ``Output`` widget's ``outputs`` trait.

    Setting ``outputs`` to this, instead of displaying through the notebook's matplotlib
    backend, gives the same picture in a kernel, under nbclient and in plain pytest.
    """
    return {
        "output_type": "display_data",
        "data": {
            "image/png": base64.b64encode(png).decode("ascii"),
            "text/plain": "<sensitivity plot>",
        },
        "metadata": {},
    }


def group_layers(names: list[str], max_groups: int = 12) -> dict[str, list[str]]:
    """Group qualified layer names by a shared module prefix, for headings over sliders.

    The deepest prefix length that still gives at most ``max_groups`` groups is used, so
    a transformer groups by block (``encoder.layer.3``) rather than by top-level module.

    Args:
        names: Qualified layer names in model order.
        max_groups: Upper bound on the number of groups.

    Returns:
        Prefix → names in model order; a single group means grouping does not help.
    """
    best: dict[str, list[str]] = {"": list(names)}
    depth = max((n.count(".") for n in names), default=0)
    for d in range(1, depth + 1):
        groups: dict[str, list[str]] = {}
        for name in names:
            parts = name.split(".")
            groups.setdefault(".".join(parts[: min(d, len(parts) - 1)]), []).append(name)
        if len(groups) > max_groups:
            break
        best = groups
    return best


def readout_html(
    result: Any, ratios: Mapping[str, float], setting: Footprint | None, now: Footprint
) -> str:
    """The readout row: sparsity, parameters, size and predicted metric of a setting.

    Args:
        result: The ``SensitivityResult`` (curves, baseline, metric name).
        ratios: The slider setting.
        setting: Footprint of the model if the setting were applied; ``None`` if it cannot
            be applied to the model as it is (e.g. a layer quantized since the sweep).
        now: Footprint of the model as it is.

    Returns:
        HTML for an ``HTML`` widget.
    """
    predicted = result.predict(dict(ratios))
    change = predicted - result.baseline
    worse = change < 0 if result.higher_is_better else change > 0
    colour = ERROR if worse and abs(change) > 1e-12 else SUCCESS
    metric = html.escape(result.metric) + (" (proxy)" if result.proxy else "")
    text = metric_text(result)
    cards = _cards(result, ratios, setting, now)
    cards.append(
        (
            f"predicted {metric}",
            text.value(predicted),
            f"<span style='color:{colour}'>{text.change(change)}</span> vs baseline "
            f"{text.value(result.baseline)}",
        )
    )
    cells = "".join(
        "<div style='flex:1;min-width:150px;padding:4px 10px;border-left:3px solid #90a4ae'>"
        f"<div style='font-size:85%;color:{CAPTION}'>{title}</div>"
        f"<div style='font-size:130%;font-weight:600'>{value}</div>"
        f"<div style='font-size:80%;color:{CAPTION}'>{note}</div></div>"
        for title, value, note in cards
    )
    return f"<div style='display:flex;flex-wrap:wrap;gap:6px'>{cells}</div>"


def header_html(result: Any) -> str:
    """The explorer's title line: metric, direction, baseline, size and cost of the sweep."""
    direction = "higher is better" if result.higher_is_better else "lower is better"
    proxy = (
        f" <span style='color:{ERROR}'>· proxy metric (no evaluate function was given)</span>"
        if result.proxy
        else ""
    )
    partial = f" <span style='color:{ERROR}'>· partial sweep</span>" if not result.complete else ""
    return (
        f"<b>Sensitivity explorer</b> — {html.escape(result.metric)} ({direction}), baseline "
        f"{metric_text(result).value(result.baseline)} · {len(result.layers)} layer(s) × "
        f"{len(result.ratios)} ratios, {result.evaluations} evaluations in "
        f"{result.seconds:.1f} s{proxy}{partial}"
    )


def layer_info_html(
    result: Any, name: str, ratio: float, now: float | None = None, *, replaced: bool = False
) -> str:
    """The note beside a layer's slider: its weights and predicted change when pruned alone.

    Args:
        result: The ``SensitivityResult``.
        name: The layer.
        ratio: Its slider's ratio.
        now: Its sparsity now, shown in red when it differs from its sparsity at sweep time
            (``None``: not known, not shown).
        replaced: The layer was removed or replaced (e.g. quantized) since the sweep.
    """
    change = result.predict({name: ratio}) - result.baseline
    swept = result.start.get(name, 0.0)
    drift = ""
    if replaced or (now is not None and abs(now - swept) > 1e-9):
        state = "replaced" if replaced else f"now {fmt_pct(now)}"
        drift = (
            f" · <span style='color:{ERROR};white-space:nowrap' title='sparsity now; swept at "
            f"{fmt_pct(swept)}'>{state}</span>"
        )
    return (
        f"<span style='font-size:85%;color:{CAPTION};white-space:nowrap' title='weights in "
        f"the layer; predicted change of {html.escape(result.metric)} when only it is "
        "pruned'>"
        f"{fmt_count(result.sizes[name])} w · Δ {metric_text(result).change(change)}</span>"
        f"{drift}"
    )


def target_of(target: str) -> tuple[str | None, float | None]:
    """The target row's kind and value for a suggestion's ``target`` text.

    It reads ``"max drop 0.01"``, ``"sparsity 80%"`` or ``"MAC reduction 50%"``; anything
    else gives ``(None, None)`` (the row keeps its defaults).
    """
    words = target.split()
    if words[:2] == ["max", "drop"]:
        return "max_drop", float(words[-1])
    if words[:1] == ["sparsity"] or words[:2] == ["MAC", "reduction"]:
        return None, round(float(words[-1].rstrip("%")) / 100, 4)
    return None, None


def warning_html(reason: str | None) -> str:
    """The warning line when the model is no longer the swept one (empty when it is).

    Args:
        reason: What changed, from ``SweepCheck.reason``, or ``None``.
    """
    if not reason:
        return ""
    return (
        "<div style='color:#8a4b00;background:#fff4e5;border-left:3px solid #ef6c00;"
        "padding:3px 8px'>⚠ the model changed since the sweep "
        f"({html.escape(reason)}): predictions are for the swept model; re-run %sensitivity"
        "</div>"
    )


def model_text(now: Footprint) -> str:
    """The line describing the live model: nonzero parameters and estimated sizes."""
    return (
        f"model now: {now.nonzero:,} nonzero parameters of {now.total:,} "
        f"({fmt_pct(now.sparsity)} zero); {fmt_bytes(now.dense)} dense, "
        f"{fmt_bytes(now.csr)} as CSR (est.)"
    )


# The readout's words: per-layer settings zero weights in place; group settings remove.
_PRUNING_WORDS = (
    "sparsity",
    "of the weights in {n} explored layer(s)",
    "nonzero of {total:,} (now {nonzero:,})",
    "CSR",
    "vs {dense} dense fp32",
)
_REMOVAL_WORDS = (
    "removed",
    "of what the {n} swept group(s) take (est.)",
    "of {total:,} now (channels removed)",
    "dense fp32",
    "vs {dense} now",
)


def _cards(
    result: Any, ratios: Mapping[str, float], setting: Footprint | None, now: Footprint
) -> list[tuple[str, str, str]]:
    """Share, parameters left and size of a setting: zeros in place, or channels removed."""
    removal = getattr(result, "remove", False)  # a group sweep: layers get smaller
    if setting is None:
        left = size = "—"
    elif removal:
        left, size = f"{setting.total:,}", fmt_bytes(setting.dense)
    else:
        left, size = f"{setting.nonzero:,}", fmt_bytes(setting.csr)
    share, n = fmt_pct(result.sparsity_of(dict(ratios))), len(result.layers)
    title, of, kept, stored, versus = _REMOVAL_WORDS if removal else _PRUNING_WORDS
    return [
        (title, share, of.format(n=n)),
        ("parameters left", left, kept.format(total=now.total, nonzero=now.nonzero)),
        ("size (est.)", f"{size} {stored}", versus.format(dense=fmt_bytes(now.dense))),
    ]
