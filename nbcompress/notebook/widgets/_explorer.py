"""The interactive sensitivity explorer: sliders per layer over a sweep's curves.

Like ``tqdm.notebook``, the widget only adds a display: every number it shows comes from
the engine (``SensitivityResult.predict/suggest/sparsity_of``, ``prune_ratios_``, ``undo_``,
``trial``). Callbacks run synchronously when a trait changes, so plain pytest drives it by
setting ``slider.value`` and calling ``button.click()``; no frontend is needed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import ipywidgets as w
from torch import nn

from nbcompress.engine.core.history import history, trial, undo_
from nbcompress.engine.core.report import fmt_pct
from nbcompress.engine.prune.prune import prune_ratios_
from nbcompress.engine.sensitivity.setting import SettingCosts, proxy_metric
from nbcompress.notebook.widgets._render import (
    MarkedFigure,
    fmt_metric,
    group_layers,
    header_html,
    layer_info_html,
    model_text,
    png_output,
    readout_html,
)

if TYPE_CHECKING:
    from nbcompress.engine.sensitivity.result import SensitivityResult
    from nbcompress.engine.sensitivity.suggestion import Suggestion

__all__ = ["SensitivityExplorer"]

#: More layers than this are grouped in an accordion by module prefix.
_GROUP_ABOVE = 12


class SensitivityExplorer(w.VBox):
    """Explore per-layer pruning ratios against a sensitivity sweep, then apply them.

    Shows the sweep's curves with the current ratios marked, one slider per layer, live
    readouts (sparsity, parameters left, estimated size, *predicted* metric), a target
    control that re-runs :meth:`SensitivityResult.suggest`, and buttons to measure the
    real metric of the setting (model left unchanged), apply it in place (recorded in the
    history) and undo the last step.

    Args:
        result: A ``SensitivityResult`` from :func:`nbcompress.sensitivity`.
        model: The live model the sweep was run on.
        evaluate: ``evaluate(model) -> float`` for the "Evaluate" button; without it (and
            without ``example_inputs`` for a proxy sweep) the button is disabled.
        suggestion: Initial ratios; default ``result.suggest(target_sparsity=0.5)``.
        objective: What suggestions maximise: ``"params"`` or ``"macs"``.
        example_inputs: For a proxy sweep: the input on which "Evaluate" measures the
            proxy, against the model's output as it is when the explorer is made.

    Attributes:
        sliders: Layer name → its ratio slider.
        status: Label with the outcome of the last action.
        model_label: Label describing the live model (nonzero parameters, size).
        measured: Metric measured by the last "Evaluate" click, or ``None``.
    """

    def __init__(
        self,
        result: SensitivityResult,
        model: nn.Module,
        evaluate: Callable[[nn.Module], float] | None = None,
        *,
        suggestion: Suggestion | None = None,
        objective: str = "params",
        example_inputs: Any = None,
    ) -> None:
        self.result = result
        self.model = model
        if evaluate is None and result.proxy and example_inputs is not None:
            evaluate = proxy_metric(model, example_inputs)
        self.evaluate = evaluate
        self.objective = objective
        self.measured: float | None = None
        self._costs = SettingCosts(model, result.granularity)
        self._figure = MarkedFigure(result)
        self._hold = False
        self._build()
        super().__init__(
            [self.header, w.HBox([self.plot, self.controls]), self.model_label, self.status],
            layout=w.Layout(width="100%"),
        )
        self.add_class("nbc-explorer")
        if suggestion is None:
            self._suggest()
        else:
            self._show_target_of(suggestion)
            self.set_ratios(suggestion.ratios)

    # ----------------------------------------------------------------- construction
    def _build(self) -> None:
        self.header = w.HTML(header_html(self.result))
        self.plot = w.Output(
            layout=w.Layout(width="52%", min_width="320px", max_height="560px", overflow="auto")
        )
        self.sliders: dict[str, w.FloatSlider] = {}
        self._infos: dict[str, w.HTML] = {}
        self.readout = w.HTML()
        self.readout.add_class("nbc-readout")
        self.buttons = self._button_row()
        self.controls = w.VBox(
            [self._target_row(), self._slider_box(), self.readout, self.buttons],
            layout=w.Layout(width="48%", padding="0 0 0 8px"),
        )
        self.model_label = w.Label()
        self.model_label.add_class("nbc-model")
        self.status = w.Label()
        self.status.add_class("nbc-status")

    def _target_row(self) -> w.HBox:
        self.target_kind = w.ToggleButtons(
            options=[("sparsity", "sparsity"), ("max drop", "max_drop")],
            value="sparsity",
            tooltips=[
                "fraction of the explored weights to remove",
                f"largest allowed drop of {self.result.metric}",
            ],
            style={"button_width": "92px"},
        )
        # Unbounded on purpose: a max drop of a loss can exceed 1; the engine validates
        # and an out-of-range target becomes a status message.
        self.target_value = w.FloatText(
            value=0.5,
            step=0.01,
            description="target",
            style={"description_width": "45px"},
            layout=w.Layout(width="130px"),
        )
        self.target_kind.observe(self._on_kind, names="value")
        self.target_value.observe(self._on_target, names="value")
        return w.HBox(
            [self.target_kind, self.target_value],
            layout=w.Layout(flex_flow="row wrap", align_items="center"),
        )

    def _button_row(self) -> w.HBox:
        self.evaluate_button = w.Button(
            description="Evaluate",
            icon="flask",
            disabled=self.evaluate is None,
            tooltip=(
                "measure the real metric of this setting; the model is left unchanged"
                if self.evaluate
                else "pass evaluate=… to measure the real metric"
            ),
        )
        self.apply_button = w.Button(
            description="Apply",
            icon="check",
            button_style="primary",
            tooltip="prune the model in place (undoable)",
        )
        self.undo_button = w.Button(
            description="Undo", icon="undo", tooltip="revert the model's last compression step"
        )
        self.evaluate_button.on_click(lambda _: self.evaluate_setting())
        self.apply_button.on_click(lambda _: self.apply())
        self.undo_button.on_click(lambda _: self.undo())
        return w.HBox([self.evaluate_button, self.apply_button, self.undo_button])

    def _slider_box(self) -> w.Widget:
        layers = self.result.layers
        groups = group_layers(layers) if len(layers) > _GROUP_ABOVE else {"": layers}
        if len(groups) <= 1:
            groups = {"": layers}
        # Inside a group the prefix is in the title, so slider labels drop it.
        labels = {
            n: n[len(prefix) + 1 :] if prefix else n
            for prefix, names in groups.items()
            for n in names
        }
        # ~7 px per character of the longest label, bounded; longer ones end in "…".
        width = min(max(7 * max(map(len, labels.values())) + 12, 40), 200)
        box = w.Layout(max_height="340px", overflow="auto", width="100%")
        if len(groups) == 1:
            return w.VBox([self._slider_row(n, labels[n], width) for n in layers], layout=box)
        pages = [
            w.VBox([self._slider_row(n, labels[n], width) for n in names])
            for names in groups.values()
        ]
        titles = [f"{p or '(top level)'} — {len(names)} layer(s)" for p, names in groups.items()]
        accordion = w.Accordion(
            pages, titles=titles, selected_index=0, layout=w.Layout(width="100%")
        )
        return w.Box([accordion], layout=box)

    def _slider_row(self, name: str, label: str, label_width: int) -> w.HBox:
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
        slider.observe(lambda change: self._on_slider(name), names="value")
        info = w.HTML(layout=w.Layout(flex="0 0 130px"))
        self.sliders[name] = slider
        self._infos[name] = info
        return w.HBox([slider, info], layout=w.Layout(width="100%"))

    def __repr__(self) -> str:
        # The text/plain fallback (terminals, static renderers) says what is set, briefly.
        setting = ", ".join(f"{n}={r:.0%}" for n, r in self.ratios.items())
        return f"<SensitivityExplorer of {self.result.metric}: {setting}>"

    # ----------------------------------------------------------------- state
    @property
    def ratios(self) -> dict[str, float]:
        """The current slider setting: layer name → ratio."""
        return {name: float(s.value) for name, s in self.sliders.items()}

    def set_ratios(self, ratios: Mapping[str, float]) -> None:
        """Move the sliders (layers not named go to 0) and refresh everything once."""
        with self._holding():
            for name, slider in self.sliders.items():
                value = min(max(float(ratios.get(name, 0.0)), slider.min), slider.max)
                slider.value = round(value, 4)
        for name in self.sliders:
            self._update_info(name)
        self._refresh()

    @contextlib.contextmanager
    def _holding(self) -> Iterator[None]:
        # Moving many sliders at once would redraw once per slider; redraw once instead.
        self._hold = True
        try:
            yield
        finally:
            self._hold = False

    # ----------------------------------------------------------------- callbacks
    def _show_target_of(self, suggestion: Suggestion) -> None:
        # Make the target box agree with a suggestion made elsewhere (e.g. by %sensitivity
        # --max-drop), without re-running it. Its target reads "max drop 0.01" or
        # "sparsity 80%"; anything else keeps the defaults.
        self.objective = suggestion.objective
        words = suggestion.target.split()
        with self._holding():
            if words[:2] == ["max", "drop"]:
                self.target_kind.value = "max_drop"
                self.target_value.value = float(words[-1])
            elif words[:1] == ["sparsity"] or words[:2] == ["MAC", "reduction"]:
                self.target_value.value = round(float(words[-1].rstrip("%")) / 100, 4)

    def _on_slider(self, name: str) -> None:
        if self._hold:
            return
        self._update_info(name)
        self._refresh()

    def _on_kind(self, change: dict) -> None:
        with self._holding():
            self.target_value.value = 0.5 if change["new"] == "sparsity" else 0.01
        self._suggest()

    def _on_target(self, change: dict) -> None:
        if not self._hold:
            self._suggest()

    def _suggest(self) -> None:
        kind, value = self.target_kind.value, float(self.target_value.value)
        try:
            if kind == "sparsity":
                s = self.result.suggest(value, objective=self.objective)
            else:
                s = self.result.suggest(max_drop=value, objective=self.objective)
        except ValueError as err:
            self.status.value = f"target not reachable: {err}"
            self._refresh()
            return
        self.set_ratios(s.ratios)
        self.status.value = (
            f"suggested for {kind.replace('_', ' ')} {value:g}: {fmt_pct(s.sparsity)} sparsity, "
            f"predicted {self.result.metric} {fmt_metric(s.predicted)}"
        )

    # ----------------------------------------------------------------- actions
    def evaluate_setting(self) -> float | None:
        """Measure the real metric of the current setting; the model is left unchanged.

        Returns:
            The measured value, or ``None`` if there is no evaluate function or it failed
            (the reason is written to :attr:`status`).
        """
        if self.evaluate is None:
            self.status.value = "no evaluate function: pass evaluate=… to measure the real metric"
            return None
        ratios = self.ratios
        predicted = self.result.predict(ratios)
        with self._busy("evaluating…"):
            try:
                with trial(self.model):
                    if any(r > 0 for r in ratios.values()):
                        prune_ratios_(self.model, ratios, granularity=self.result.granularity)
                    value = float(self.evaluate(self.model))
            except Exception as err:  # noqa: BLE001 - the user's function; report, don't raise
                self.status.value = (
                    f"evaluate failed ({type(err).__name__}: {err}); model left unchanged"
                )
                return None
        self.measured = value
        self.status.value = (
            f"measured {self.result.metric} {fmt_metric(value)} at this setting (predicted "
            f"{fmt_metric(predicted)}); model left unchanged"
        )
        return value

    def apply(self) -> None:
        """Prune the live model in place with the current setting (recorded, undoable)."""
        ratios = self.ratios
        granularity = self.result.granularity
        change = self._change_model(
            "applying…",
            lambda: prune_ratios_(self.model, ratios, granularity=granularity),
            (ValueError, TypeError),
            "not applied",
        )
        if change is not None:
            self.status.value = (
                f"applied: {fmt_pct(self.result.sparsity_of(ratios))} sparsity over the explored "
                f"layers; {change}"
            )

    def undo(self) -> None:
        """Revert the model's last recorded compression step."""
        steps = history(self.model)
        change = self._change_model(
            "undoing…", lambda: undo_(self.model), (ValueError,), "nothing undone"
        )
        if change is not None:
            self.status.value = f"undone: {steps[-1].name} ({steps[-1].detail}); {change}"

    def _change_model(
        self,
        message: str,
        action: Callable[[], Any],
        errors: tuple[type[Exception], ...],
        failed: str,
    ) -> str | None:
        """Run an action that edits the model; what it did to the nonzero count, or ``None``.

        On one of ``errors`` the status says ``failed`` and why, and ``None`` is returned.
        """
        before = self._costs.now()
        with self._busy(message):
            try:
                action()
            except errors as err:
                self.status.value = f"{failed}: {err}"
                return None
        self._refresh()
        after = self._costs.now()
        return f"model now has {after.nonzero:,} nonzero parameters (was {before.nonzero:,})"

    @contextlib.contextmanager
    def _busy(self, message: str) -> Iterator[None]:
        buttons = (self.evaluate_button, self.apply_button, self.undo_button)
        states = [b.disabled for b in buttons]
        for b in buttons:
            b.disabled = True
        self.status.value = message
        try:
            yield
        finally:
            for b, state in zip(buttons, states, strict=True):
                b.disabled = state

    # ----------------------------------------------------------------- display
    def _update_info(self, name: str) -> None:
        self._infos[name].value = layer_info_html(self.result, name, self.sliders[name].value)

    def _refresh(self) -> None:
        # The model may also have changed outside the widget (%prune, %undo in another
        # cell); every refresh re-reads it, cheaply, as the costs are keyed on its history.
        ratios = self.ratios
        now = self._costs.now()
        self.readout.value = readout_html(self.result, ratios, self._costs.setting(ratios), now)
        self.model_label.value = model_text(now)
        # One assignment (not clear + append) so the frontend redraws once, and no
        # Output capture context is needed: the same path works in pytest.
        self.plot.outputs = (png_output(self._figure.png(ratios)),)
