"""The live view of ``%search``: a plot that fills in as trials finish, then Apply and Undo.

``search(..., callback=view.update)`` calls :meth:`SearchView.update` in the notebook process
after every finished trial; :meth:`SearchView.finish` takes the final result and enables the
selector of Pareto points and the Apply / Undo buttons (the kernel is busy during the search,
so a click could not run before anyway). Every number shown comes from the engine
(``SearchResult.pareto/best/apply_``, ``undo_``); callbacks run synchronously, so plain pytest
drives the view by calling ``update``, setting ``choice.value`` and calling ``button.click()``.

Drawing the figure costs 0.1-0.25 s (Agg, 90 dpi, constrained layout; see
``benchmarks/bench_search_live.py``), so redraws during the search are throttled: at most every
``min_interval`` seconds and never more than ``budget`` (5%) of the time (the wait grows with the
measured cost of the last redraw); :meth:`SearchView.finish` draws the end. The progress bar and
its line are updated after every trial (one small message each, ~0.1 ms).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ipywidgets as w
import torch
from torch import nn

from nbcompress.engine.core.history import history, history_token, undo_
from nbcompress.engine.core.report import fmt_pct
from nbcompress.engine.search.result import SearchResult, SearchTrial
from nbcompress.engine.sensitivity.evaluate import eta_status
from nbcompress.notebook.display.figures import png_bytes
from nbcompress.notebook.display.search import search_figure
from nbcompress.notebook.widgets._controls import descendants
from nbcompress.notebook.widgets._render import fmt_metric

__all__ = ["SearchView", "front_options", "progress_text"]


def _point(t: SearchTrial) -> str:
    return f"sparsity {fmt_pct(t.sparsity)} · metric {fmt_metric(t.metric)} · trial #{t.number}"


def front_options(result: SearchResult) -> list[tuple[str, int]]:
    """The selector's entries: the deduplicated Pareto front, best metric first.

    Returns:
        ``(label, trial number)`` pairs, e.g. ``("sparsity 90.0% · metric 0.947 · trial #12",
        12)``; ties in metric put the sparser point first.
    """
    front = sorted(
        result.pareto(),
        key=lambda t: (-t.metric, -t.sparsity, t.number),  # type: ignore[operator]
    )
    return [(_point(t), t.number) for t in front]


def progress_text(trials: list[SearchTrial], done: int, total: int, elapsed: float) -> str:
    """``"12/60 trials · 1 failed · 4 s elapsed, ETA 16 s · best 0.947 at 90.0% (#7)"``."""
    times = eta_status(done, total, elapsed).split(", ", 1)[1]  # "… elapsed, ETA …"
    failed = sum(not t.ok for t in trials)
    parts = [f"{done}/{total} trials"] + ([f"{failed} failed"] if failed else []) + [times]
    ok = [t for t in trials if t.ok]
    if ok:
        best = max(ok, key=lambda t: (t.metric, t.sparsity, -t.number))
        parts.append(f"best {fmt_metric(best.metric)} at {fmt_pct(best.sparsity)} (#{best.number})")
    return " · ".join(parts)


class SearchView(w.VBox):
    """Live metric-vs-sparsity plot and progress of a search; then apply a front point.

    Args:
        model: The model searched; Apply prunes it in place (one undoable step).
        total: Trials the search runs (``n_trials``), for the bar until the first update.
        name: How the notebook calls the model, for the ``%undo`` hint.
        example_inputs: The search's calibration inputs (wanda or ``reconstruct``): Apply
            prunes exactly as the trials were pruned.
        target_sparsity: The search's budget (drawn as a line), or ``None``.
        sampler: The sampler's name, for the plot's title.
        show: Display the view at the first update (or at :meth:`finish`), so that a search
            refused before its first trial leaves no empty view behind.
        min_interval: Least seconds between two redraws of the plot during the search.
        budget: Largest share of the time redrawing may take (the wait grows with the cost).
        clock: Seconds, monotonic (injectable for tests).

    Attributes:
        result: The final :class:`SearchResult` (``None`` while the search runs).
        plot: ``Image`` widget with the PNG of the plot.
        bar: ``IntProgress`` of finished trials; ``progress``: its text line.
        choice: ``Dropdown`` of the front points (value: trial number), best first.
        apply_button, undo_button: Disabled until :meth:`finish`.
        status: ``Label`` with the outcome of the last action.
        draws: Seconds each redraw took (measured, for the throttle's cost).
    """

    def __init__(
        self,
        model: nn.Module,
        total: int,
        *,
        name: str = "model",
        example_inputs: Any = None,
        target_sparsity: float | None = None,
        sampler: str = "tpe",
        show: bool = False,
        min_interval: float = 0.5,
        budget: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model, self.name, self.example_inputs = model, name, example_inputs
        self.min_interval, self.budget, self.clock = min_interval, budget, clock
        self.result: SearchResult | None = None
        self.draws: list[float] = []
        # The trials finished so far, drawn by the same function as SearchResult.plot().
        self._live = SearchResult(trials=[], target_sparsity=target_sparsity, sampler=sampler)
        self._show, self._start = show, clock()
        self._last = self._start  # the first redraw too waits min_interval
        self._searched: tuple[Any, int] | None = None  # the model as the search left it
        self._applied: tuple[int, Any] | None = None  # trial number, history token after it
        self._build(total)
        super().__init__([self.plot, w.HBox([self.bar, self.progress]), self.controls, self.status])
        self.add_class("nbc-search")

    def _build(self, total: int) -> None:
        self.plot = w.Image(format="png", layout=w.Layout(width="576px"))
        self.plot.add_class("nbc-search-plot")
        self.bar = w.IntProgress(value=0, min=0, max=max(total, 1), bar_style="info")
        self.progress = w.Label(f"0/{total} trials")
        self.progress.add_class("nbc-search-progress")
        self.choice = w.Dropdown(
            options=[], description="front", disabled=True, layout=w.Layout(width="460px")
        )
        self._quiet = False  # True while finish() fills the selector: it redraws once itself
        self.choice.observe(lambda _: self._quiet or self.redraw(), names="value")
        self.apply_button = w.Button(
            description="Apply", icon="check", button_style="primary", disabled=True,
            tooltip="prune the model in place to the chosen allocation (one undoable step)",
        )  # fmt: skip
        self.undo_button = w.Button(
            description="Undo", icon="undo", disabled=True,
            tooltip="revert the model's last compression step",
        )  # fmt: skip
        self.apply_button.on_click(lambda _: self.apply())
        self.undo_button.on_click(lambda _: self.undo())
        self.controls = w.HBox([self.choice, self.apply_button, self.undo_button])
        self.status = w.Label("searching… (Apply is enabled when the search ends)")
        self.status.add_class("nbc-search-status")

    def __repr__(self) -> str:
        # The text/plain fallback (terminals, static renderers).
        return f"<SearchView: {self._live.title()}>"

    def close(self) -> None:
        """Close the view and every widget in it."""
        for widget in list(descendants(self)):
            widget.close()
        super().close()

    # ----------------------------------------------------------------- during the search
    def update(self, trial: SearchTrial, done: int, total: int) -> None:
        """The search's callback: record ``trial``, move the bar, redraw when due.

        Due: ``min_interval`` seconds since the start or the last redraw, and at least
        ``cost / budget`` seconds when the last redraw took ``cost``.
        """
        self._display_once()
        self._live.trials.append(trial)
        self.bar.max, self.bar.value = max(total, 1), done
        self.progress.value = progress_text(
            self._live.trials, done, total, self.clock() - self._start
        )
        # The wait grows with the cost so that drawing stays a small share of the search.
        wait = max(self.min_interval, (self.draws[-1] / self.budget) if self.draws else 0.0)
        if self.clock() - self._last >= wait:  # the end is drawn by finish()
            self.redraw()

    def redraw(self) -> None:
        """Draw the plot now (the chosen front point ringed once the search ended)."""
        started = self.clock()
        shown = self.result or self._live
        self.plot.value = png_bytes(search_figure(shown, selected=self.selected))
        self._last = self.clock()
        self.draws.append(self._last - started)

    def finish(self, result: SearchResult) -> None:
        """Show the final result: last redraw, the front in the selector, buttons enabled."""
        self._display_once()
        self.result = result
        self._searched = self._model_state()
        failed = len(result.trials) - len(result.completed())
        self.bar.bar_style = "warning" if result.interrupted or failed else "success"
        if not result.interrupted:
            self.bar.value = self.bar.max
        self._quiet = True
        try:
            options = front_options(result)
            self.choice.options = options
            # Options set on an empty Dropdown select nothing: select the best point.
            self.choice.value = options[0][1] if options else None
        finally:
            self._quiet = False
        self.choice.disabled = not self.choice.options
        self.apply_button.disabled = not self.choice.options
        self.undo_button.disabled = False
        self.redraw()
        stop = "interrupted" if result.interrupted else "done"
        fails = f", {failed} failed" if failed else ""
        self.status.value = f"search {stop}: {len(result.trials)} trials{fails}; " + (
            "choose a front point and Apply it"
            if self.choice.options
            else "no trial completed, nothing to apply"
        )

    def fail(self, error: BaseException) -> None:
        """The search stopped with ``error`` before it returned: say so (nothing to apply)."""
        self.bar.bar_style = "danger"
        self.status.value = (
            f"search stopped: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
        )

    def _display_once(self) -> None:
        if self._show:
            self._show = False
            from IPython.display import display

            display(self)

    # ----------------------------------------------------------------- actions
    @property
    def selected(self) -> SearchTrial | None:
        """The trial chosen in the selector (``None`` before :meth:`finish`)."""
        if self.result is None or self.choice.value is None:
            return None
        return next(t for t in self.result.trials if t.number == self.choice.value)

    def apply(self) -> None:
        """Prune the model to the chosen front point in place (one undoable step).

        Refused, with the reason in :attr:`status`, while the search runs and when the
        model is no longer as the search left it (a point already applied: Undo first).
        """
        trial = self.selected
        if trial is None:
            self.status.value = "not applied: the search has not ended"
            return
        refused = self._refusal()
        if refused:
            self.status.value = f"not applied: {refused}"
            return
        before = _nonzero(self.model)
        try:
            assert self.result is not None  # a trial is selected only after finish()
            self.result.apply_(self.model, trial, example_inputs=self.example_inputs)
        except (ValueError, TypeError, RuntimeError) as err:  # the model is put back
            self.status.value = f"not applied: {err}"
            return
        self._applied = (trial.number, history_token(self.model))
        self.status.value = (
            f"applied trial #{trial.number} (sparsity {fmt_pct(trial.sparsity)}, metric "
            f"{fmt_metric(trial.metric)}): {_nonzero(self.model):,} nonzero parameters (was "
            f"{before:,}); Undo or %undo {self.name} reverts it"
        )

    def undo(self) -> None:
        """Revert the model's last compression step (as ``%undo``), bit-exactly."""
        steps = history(self.model)
        before = _nonzero(self.model)
        try:
            undo_(self.model)
        except ValueError as err:
            self.status.value = f"nothing undone: {err}"
            return
        self.status.value = (
            f"undone: the last {steps[-1].name} step; {_nonzero(self.model):,} nonzero "
            f"parameters (was {before:,})"
        )

    def _model_state(self) -> tuple[Any, int]:
        # The steps in place and one nonzero count: also catches weights edited by hand.
        return history_token(self.model), _nonzero(self.model)

    def _refusal(self) -> str | None:
        """Why the model cannot take a front point now, or ``None`` if it is as searched."""
        state = self._model_state()
        if state == self._searched:
            return None
        if self._applied is not None and state[0] == self._applied[1]:
            return (
                f"trial #{self._applied[0]} is already applied; Undo first (or %undo "
                f"{self.name}), then Apply another point"
            )
        if state[0] != self._searched[0]:  # type: ignore[index]
            return (
                f"the model has steps the search did not see; %undo {self.name} back to the "
                "searched model first"
            )
        return "the model's weights changed since the search; re-run %search"


def _nonzero(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters() if not p.is_meta)
