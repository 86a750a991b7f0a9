"""The explorer's controls: target row, buttons, one slider per layer (built, not wired).

Each builder returns the widgets the explorer keeps plus the box that lays them out; the
explorer passes in the callbacks, so nothing here holds state of its own.
"""

from __future__ import annotations

import contextlib
import html
from collections.abc import Callable, Iterator
from typing import Any

import ipywidgets as w

from nbcompress.notebook.widgets._render import group_layers

__all__ = ["GROUP_ABOVE", "Buttons", "Sliders", "descendants", "target_row"]

#: More layers than this are listed under module-prefix headings, with a filter box.
GROUP_ABOVE = 12


def target_row(metric: str) -> tuple[w.ToggleButtons, w.FloatText, w.HBox]:
    """Target kind (sparsity or max drop) and value, in a wrapping row."""
    kind = w.ToggleButtons(
        options=[("sparsity", "sparsity"), ("max drop", "max_drop")],
        value="sparsity",
        tooltips=[
            "fraction of the explored weights to remove",
            f"largest allowed drop of {metric}",
        ],
        style={"button_width": "92px"},
    )
    # Unbounded on purpose: a max drop of a loss can exceed 1; the engine validates
    # and an out-of-range target becomes a status message.
    value = w.FloatText(
        value=0.5,
        step=0.01,
        description="target",
        style={"description_width": "45px"},
        layout=w.Layout(width="130px"),
    )
    row = w.HBox([kind, value], layout=w.Layout(flex_flow="row wrap", align_items="center"))
    return kind, value, row


class Buttons:
    """The Check, Evaluate, Apply and Undo buttons and their row.

    Args:
        can_evaluate: Whether an evaluate function (or proxy) is available.
    """

    def __init__(self, can_evaluate: bool) -> None:
        self.evaluate = w.Button(
            description="Evaluate",
            icon="flask",
            disabled=not can_evaluate,
            tooltip=(
                "measure the real metric of this setting; the model is left unchanged"
                if can_evaluate
                else "pass evaluate=… to measure the real metric"
            ),
        )
        self.check = w.Button(
            description="Check",
            icon="balance-scale",
            disabled=not can_evaluate,
            tooltip="measure the sparsity target's suggestion against uniform and global L1 at "
            "the same sparsity and keep the best measured (a few evaluations)",
        )
        self.apply = w.Button(
            description="Apply",
            icon="check",
            button_style="primary",
            tooltip="prune the model in place (undoable)",
        )
        self.undo = w.Button(
            description="Undo", icon="undo", tooltip="revert the model's last compression step"
        )
        self.row = w.HBox(
            [self.check, self.evaluate, self.apply, self.undo],
            layout=w.Layout(flex_flow="row wrap"),
        )

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Disable every button while an action runs; each gets its own state back."""
        buttons = (self.check, self.evaluate, self.apply, self.undo)
        states = [b.disabled for b in buttons]
        for b in buttons:
            b.disabled = True
        try:
            yield
        finally:
            for b, state in zip(buttons, states, strict=True):
                b.disabled = state


class Sliders:
    """One ratio slider per analysed layer, each with an info note, all on the page.

    More than :data:`GROUP_ABOVE` layers are listed under a heading per module prefix,
    with a filter box above them. Nothing scrolls inside the widget and no group is
    folded away: every slider of a resnet18 (20 layers, 12 groups) is reachable by
    scrolling the page alone, and typing ``layer3`` leaves only that block's sliders.

    Args:
        result: The ``SensitivityResult``.
        on_move: Called with the layer name when its slider moves.

    Attributes:
        sliders: Layer name → its slider.
        infos: Layer name → the note beside its slider.
        filter: The filter box (``None`` when the layers are not grouped).
    """

    def __init__(self, result: Any, on_move: Callable[[str], None]) -> None:
        self.result = result
        self.on_move = on_move
        self.sliders: dict[str, w.FloatSlider] = {}
        self.infos: dict[str, w.HTML] = {}
        self.rows: dict[str, w.HBox] = {}
        self.headers: dict[str, w.HTML] = {}
        self.groups: dict[str, list[str]] = {}
        self.filter: w.Text | None = None
        self.box = self._box()

    def _box(self) -> w.Widget:
        layers = self.result.layers
        groups = group_layers(layers) if len(layers) > GROUP_ABOVE else {"": layers}
        self.groups = groups if len(groups) > 1 else {"": layers}
        # Under a heading the prefix is in the heading, so slider labels drop it.
        labels = {
            n: n[len(prefix) + 1 :] if prefix else n
            for prefix, names in self.groups.items()
            for n in names
        }
        # ~7 px per character of the longest label, bounded; longer ones end in "…".
        width = min(max(7 * max(map(len, labels.values())) + 12, 40), 200)
        for name in layers:
            self.rows[name] = self._row(name, labels[name], width)
        if len(self.groups) == 1:
            return w.VBox(list(self.rows.values()), layout=w.Layout(width="100%"))
        children: list[w.Widget] = []
        for prefix, names in self.groups.items():
            header = w.HTML(f"{html.escape(prefix or '(top level)')} — {len(names)} layer(s)")
            header.add_class("nbc-group")
            self.headers[prefix] = header
            children += [header, *(self.rows[n] for n in names)]
        self.filter = w.Text(
            placeholder="type part of a layer name, e.g. layer3",
            description="filter",
            continuous_update=True,
            style={"description_width": "45px"},
            layout=w.Layout(width="100%"),
        )
        self.filter.observe(lambda change: self.show_matching(change["new"]), names="value")
        return w.VBox([self.filter, *children], layout=w.Layout(width="100%"))

    def show_matching(self, text: str) -> int:
        """Show only the sliders of layers whose name holds every word of ``text``.

        Returns:
            How many sliders are shown (all of them for an empty text).
        """
        words = text.lower().split()
        shown = 0
        for prefix, names in self.groups.items():
            visible = {n for n in names if all(word in n.lower() for word in words)}
            for name in names:
                self.rows[name].layout.display = None if name in visible else "none"
            if prefix in self.headers:
                self.headers[prefix].layout.display = None if visible else "none"
            shown += len(visible)
        return shown

    def _row(self, name: str, label: str, label_width: int) -> w.HBox:
        # Below its sparsity at sweep time a layer cannot go (pruning never revives), and
        # beyond the sweep the curves are only extrapolated.
        low = round(self.result.start.get(name, 0.0), 4)
        slider = w.FloatSlider(
            value=low,
            min=low,
            max=max(max(self.result.ratios), low),
            step=0.01,
            description=label,
            tooltip=name,
            readout_format=".0%",
            continuous_update=False,
            style={"description_width": f"{label_width}px"},
            layout=w.Layout(width="100%"),
        )
        slider.observe(lambda change: self.on_move(name), names="value")
        info = w.HTML(layout=w.Layout(flex="0 0 150px"))
        self.sliders[name] = slider
        self.infos[name] = info
        return w.HBox([slider, info], layout=w.Layout(width="100%"))


def descendants(widget: w.Widget) -> Iterator[w.Widget]:
    """Every widget inside ``widget`` (children of boxes and accordions), depth first."""
    for child in getattr(widget, "children", ()):
        yield from descendants(child)
        yield child
