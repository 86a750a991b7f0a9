"""The interactive sensitivity explorer: sliders per layer over a sweep's curves.

Like ``tqdm.notebook``, the widget only adds a display: every number it shows comes from
the engine (``SensitivityResult.predict/suggest/sparsity_of``, ``prune_ratios_``, ``undo_``,
``trial``, ``SweepCheck``). Callbacks run synchronously when a trait changes, so plain pytest
drives it by setting ``slider.value`` and calling ``button.click()``; no frontend is needed.

It follows the model's history (:func:`~nbcompress.engine.core.history.on_change`):
``%prune``/``%undo`` in another cell refresh it when that cell ends, each interaction
re-reads the model cheaply, and a warning says when it is no longer the swept model.
Check (:mod:`~nbcompress.notebook.widgets._checking`) measures a suggestion.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import ipywidgets as w
import torch
from torch import nn

from nbcompress.engine.core.history import Change, history, history_token, on_change, undo_
from nbcompress.engine.core.report import fmt_pct
from nbcompress.engine.sensitivity.groupcosts import setting_costs
from nbcompress.engine.sensitivity.setting import SweepCheck, proxy_metric
from nbcompress.notebook.widgets._after_cell import after_cell, follow_cells
from nbcompress.notebook.widgets._checking import apply_setting, evaluate_setting, run_check
from nbcompress.notebook.widgets._controls import Buttons, Sliders, descendants, target_row
from nbcompress.notebook.widgets._render import (
    MarkedFigure,
    header_html,
    layer_info_html,
    model_text,
    png_output,
    readout_html,
    target_of,
    warning_html,
)
from nbcompress.notebook.widgets._text import STYLE, metric_text

if TYPE_CHECKING:
    from nbcompress.engine.sensitivity.result import SensitivityResult
    from nbcompress.engine.sensitivity.suggestion import Suggestion

__all__ = ["SensitivityExplorer"]


class SensitivityExplorer(w.VBox):
    """Explore per-layer pruning ratios against a sensitivity sweep, then apply them.

    Shows the sweep's curves with the current ratios marked, one slider per layer, live
    readouts (sparsity, parameters left, estimated size, *predicted* metric), a target
    control that re-runs :meth:`SensitivityResult.suggest`, and buttons to measure the
    real metric of the setting (model left unchanged), apply it in place (recorded in the
    history) and undo the last step. The model line and readouts follow the live model
    when it changes elsewhere, and a warning shows when it is no longer the swept model.

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
        layer_filter: Text box that shows only the sliders of matching layers (many layers
            only, else ``None``).
        status: Label with the outcome of the last action.
        model_label: Label describing the live model (nonzero parameters, size).
        warning: HTML line saying why predictions no longer fit the model (empty if they do).
        check: The :class:`~nbcompress.engine.sensitivity.setting.SweepCheck` behind it.
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
        self.evaluate, self.example_inputs = evaluate, example_inputs
        self.objective = objective
        self.measured: float | None = None
        # The sweep's history token (of this very model) shows steps taken since the sweep.
        token = getattr(result, "history_token", None) if result.model is model else None
        self.check = SweepCheck(result, model, token)
        self._costs = setting_costs(result, model, example_inputs)  # group sweeps: removal
        self._figure = MarkedFigure(result)
        self._hold = False
        self._refit = False  # Check picked a re-fitted candidate: Apply re-fits too
        self._acting = False  # during Apply/Undo: the action refreshes once afterwards
        self._seen: tuple | None = None
        self._sparsity: dict[str, float | None] = {}
        self._moved: dict[str, float] = {}  # sliders the user set: layer → ratio
        self.text = metric_text(result)
        self._build()
        super().__init__(
            [
                w.HTML(STYLE),
                self.header,
                self.warning,
                # Side by side when there is room; on a narrow page the controls go below
                # the plot at full width rather than squeezing the sliders to nothing.
                w.HBox([self.plot, self.controls], layout=w.Layout(flex_flow="row wrap")),
                self.model_label,
                self.status,
            ],
            layout=w.Layout(width="100%"),
        )
        self.add_class("nbc-explorer")
        # A bound method is held weakly: following the model keeps neither alive.
        self._subscription = on_change(model, self._on_history_change)
        follow_cells()
        if suggestion is None:
            self._suggest()
        else:
            self._show_target_of(suggestion)
            self.set_ratios(suggestion.ratios)

    # ----------------------------------------------------------------- construction
    def _build(self) -> None:
        self.header = w.HTML(header_html(self.result))
        self.warning = w.HTML(layout=w.Layout(display="none"))
        self.warning.add_class("nbc-warning")
        self.plot = w.Output(
            layout=w.Layout(width="52%", min_width="320px", max_height="560px", overflow="auto")
        )
        self.target_kind, self.target_value, target = target_row(self.result.metric)
        self.target_kind.observe(self._on_kind, names="value")
        self.target_value.observe(self._on_target, names="value")
        sliders = Sliders(self.result, self._on_slider)
        self.sliders: dict[str, w.FloatSlider] = sliders.sliders
        self._infos: dict[str, w.HTML] = sliders.infos
        self.layer_filter = sliders.filter
        self.readout = w.HTML()
        self.readout.add_class("nbc-readout")
        self._buttons = buttons = Buttons(self.evaluate is not None)
        self.evaluate_button, self.apply_button = buttons.evaluate, buttons.apply
        self.undo_button = buttons.undo
        self.check_button = buttons.check
        self.check_button.on_click(lambda _: setattr(self, "_refit", run_check(self)))
        self.evaluate_button.on_click(lambda _: self.evaluate_setting())
        self.apply_button.on_click(lambda _: self.apply())
        self.undo_button.on_click(lambda _: self.undo())
        self.buttons = buttons.row
        self.controls = w.VBox(
            [target, sliders.box, self.readout, self.buttons],
            layout=w.Layout(flex="1 1 400px", min_width="400px", padding="0 0 0 8px"),
        )
        self.model_label = w.Label()
        self.model_label.add_class("nbc-model")
        self.status = w.Label()
        self.status.add_class("nbc-status")

    def __repr__(self) -> str:
        # The text/plain fallback (terminals, static renderers) says what is set, briefly.
        setting = ", ".join(f"{n}={r:.0%}" for n, r in self.ratios.items())
        return f"<SensitivityExplorer of {self.result.metric}: {setting}>"

    def close(self) -> None:
        """Close the explorer and every widget in it; it stops following the model."""
        self._subscription.remove()
        for widget in list(descendants(self)):
            widget.close()
        super().close()

    # ----------------------------------------------------------------- state
    @property
    def ratios(self) -> dict[str, float]:
        """The current slider setting: layer name → ratio."""
        return {name: float(s.value) for name, s in self.sliders.items()}

    def set_ratios(self, ratios: Mapping[str, float]) -> None:
        """Move the sliders (layers not named go to 0) and refresh everything once."""
        self._moved = {}  # the user's settings are replaced (a suggestion says so)
        with self._holding():
            for name, slider in self.sliders.items():
                value = min(max(float(ratios.get(name, 0.0)), slider.min), slider.max)
                slider.value = round(value, 4)
        for name in self.sliders:
            self._update_info(name)
        self._refresh()

    def effective(self, ratios: Mapping[str, float]) -> dict[str, float]:
        """The ratios the layers would really have if ``ratios`` were applied now.

        See :meth:`~nbcompress.engine.sensitivity.setting.SweepCheck.effective`; the
        readouts and the prediction Evaluate is compared with use these.
        """
        return self.check.effective(ratios, self._sparsity)

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
        # --max-drop), without re-running it.
        self.objective = suggestion.objective
        kind, value = target_of(suggestion.target)
        with self._holding():
            if kind is not None:
                self.target_kind.value = kind
            if value is not None:
                self.target_value.value = value

    def _on_slider(self, name: str) -> None:
        if self._hold:
            return
        self._refit = False  # a Check's re-fitted winner no longer describes this setting
        self._moved[name] = float(self.sliders[name].value)
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
        # The curves only, while the target moves: a measured check of the suggestion
        # (several evaluations) belongs to the Check button, never to typing a number.
        options: dict[str, Any] = {"objective": self.objective, "check": False}
        self._refit = False
        try:
            if kind == "sparsity":
                s = self.result.suggest(value, **options)
            else:
                s = self.result.suggest(max_drop=value, **options)
        except ValueError as err:
            self.status.value = f"target not reachable: {err}"
            self._refresh()
            return
        replaced = self._replaced(s.ratios)
        self.set_ratios(s.ratios)
        self.status.value = (
            f"suggested for {kind.replace('_', ' ')} {value:g}: {fmt_pct(s.sparsity)} sparsity, "
            f"predicted {self.result.metric} {self.text.value(s.predicted)}{replaced}"
        )

    def _replaced(self, ratios: Mapping[str, float]) -> str:
        """What a new suggestion overwrites of the sliders the user set ('' if nothing)."""
        moved, self._moved = self._moved, {}
        lost = [
            f"{name} {fmt_pct(ratio)}"
            for name, ratio in moved.items()
            if abs(float(ratios.get(name, 0.0)) - ratio) > 5e-3
        ]
        if not lost:
            return ""
        shown = ", ".join(lost[:3]) + (f" and {len(lost) - 3} more" if len(lost) > 3 else "")
        return f". It replaced the slider(s) you had set: {shown}"

    # ----------------------------------------------------------------- actions
    def evaluate_setting(self) -> float | None:
        """Measure the real metric of the current setting; the model is left unchanged.

        Returns:
            The measured value, or ``None`` if there is no evaluate function or it failed
            (the reason is written to :attr:`status`).
        """
        return evaluate_setting(self)

    def apply(self) -> None:
        """Prune the live model in place with the current setting (recorded, undoable).

        For a group sweep (``result.remove``) the channels are removed physically.
        """
        ratios = self.ratios
        change = self._change_model(
            "applying…",
            lambda: apply_setting(self, ratios),
            # RuntimeError: e.g. a layer quantized since the sweep (the model is put back).
            (ValueError, TypeError, RuntimeError),
            "not applied",
        )
        if change is not None:
            self.status.value = (
                f"applied: {fmt_pct(self.result.sparsity_of(self.effective(ratios)))} sparsity "
                f"over the explored layers; {change}"
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
        self._sync()
        before, token = self._costs.now(), history_token(self.model)
        with self._busy(message):
            self._acting = True
            try:
                action()
            except errors as err:
                self.status.value = f"{failed}: {err}"
                return None
            finally:
                self._acting = False
        self.check.mark_own(token)
        self._refresh()
        after = self._costs.now()
        return f"model now has {after.nonzero:,} nonzero parameters (was {before.nonzero:,})"

    def _busy(self, message: str) -> contextlib.AbstractContextManager[None]:
        self.status.value = message
        return self._buttons.disabled()

    # ----------------------------------------------------------------- display
    def _on_history_change(self, change: Change) -> None:
        # A step recorded or undone anywhere on the model (%prune, %undo in another cell):
        # refreshed once the cell ends, so a loop of steps costs one refresh, not one each.
        if not self._acting:
            if not any(m is change.module for m in self.model.modules()):
                self._costs.invalidate()  # a step on a module containing the model
            if not after_cell(self._show_model):
                self._show_model()

    def _sync(self) -> dict[str, float | None]:
        """Re-read the model if it changed since last seen (cheap); its layers' sparsity."""
        # The history token and one nonzero count catch edits the history cannot see too
        # (a weight zeroed by hand); per-layer sparsity is recounted only when one moved.
        nonzero = sum(
            int(torch.count_nonzero(p.detach())) for p in self.model.parameters() if not p.is_meta
        )
        seen = (history_token(self.model), nonzero)
        if seen != self._seen:
            if self._seen is not None and seen[0] == self._seen[0]:
                self._costs.invalidate()  # same steps, other zeros: an edit outside them
            self._seen, self._sparsity = seen, self.check.sparsity()
            for name in self.sliders:
                self._update_info(name)
        return self._sparsity

    def _update_info(self, name: str) -> None:
        now = self._sparsity.get(name, self.result.start.get(name, 0.0))
        self._infos[name].value = layer_info_html(
            self.result, name, self.sliders[name].value, now, replaced=now is None
        )

    def _show_model(self) -> None:
        """Model line, readouts and warning from the model as it is now."""
        sparsity = self._sync()
        ratios = self.ratios
        now = self._costs.now()
        try:
            setting = self._costs.setting(ratios)
        except (ValueError, TypeError, AttributeError, RuntimeError):
            setting = None  # e.g. a layer quantized since: it can no longer be pruned
        self.readout.value = readout_html(self.result, self.effective(ratios), setting, now)
        self.model_label.value = model_text(now)
        reason = self.check.reason(sparsity)
        self.warning.value = warning_html(reason)
        self.warning.layout.display = None if reason else "none"

    def _refresh(self) -> None:
        self._show_model()
        # One assignment (not clear + append) so the frontend redraws once, and no
        # Output capture context is needed: the same path works in pytest.
        self.plot.outputs = (png_output(self._figure.png(self.ratios)),)
