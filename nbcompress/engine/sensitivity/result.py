"""The result of a sensitivity sweep: measured curves, prediction, suggestion, persistence.

A :class:`SensitivityResult` holds the measured curves and predicts the metric of
per-layer ratios; its suggestions come from :mod:`nbcompress.engine.sensitivity.allocate`,
which only reads the result (so the dependency runs one way: this module imports allocate).
The latest result and suggestion of each model live in
:mod:`nbcompress.engine.sensitivity.registry`. Figures are drawn by the notebook layer,
imported only when asked for (:meth:`SensitivityResult.plot`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from torch import nn

from nbcompress.engine.core.history import history_token
from nbcompress.engine.core.report import fmt_count, html_table, text_table
from nbcompress.engine.core.validation import check_amount
from nbcompress.engine.sensitivity.advice import suggest
from nbcompress.engine.sensitivity.allocate import Curves, drop_curves, layer_drop
from nbcompress.engine.sensitivity.saved import FORMAT, read_result, write_result
from nbcompress.engine.sensitivity.suggestion import Suggestion

__all__ = ["SensitivityResult"]


@dataclass
class SensitivityResult:
    """Metric per layer and pruning ratio, measured by :func:`sensitivity`.

    Attributes:
        layers: Analysed layers, in model order.
        ratios: Pruning ratios of the sweep, ascending.
        baseline: Metric of the unpruned model.
        curves: Layer → metric per ratio (same order as ``ratios``); ``None`` where not
            evaluated (early stop or interrupted).
        sizes: Layer → weights in its prunable weight matrices (all projections of an
            attention, all gate matrices of an LSTM).
        macs: Layer → multiply-accumulates per call (estimated), ``None`` if unknown.
        metric: Name of the metric.
        higher_is_better: ``False`` for losses, perplexity, RMSE.
        proxy: The metric is the data-free proxy (agreement with the dense output).
        granularity: ``"element"``, ``"block"`` or ``"channel"``.
        evaluations: Number of evaluations run (baseline included).
        seconds: Wall-clock time of the sweep.
        complete: ``False`` if the sweep was interrupted or stopped by an error.
        notes: Explanations shown with the result.
        start: Layer → its sparsity when swept (already pruned layers); suggestions never
            go below it and ratios up to it were not evaluated (they change nothing).
        method: How each point pruned its layer (``"l1"`` or ``"wanda"``); suggestions
            are measured and applied the same way.
        reconstruct: Each point re-fitted its layer's kept weights by least squares.
        filled: Layer → indices into ``ratios`` of points filled in after the layer
            collapsed, not evaluated (plots draw them hollow).
        remove: A sweep over coupled channel groups by physical removal
            (``sensitivity(remove=True)``): each entry is a group named by its root layer,
            ``sizes``/``macs`` are what removing the whole group takes, and a suggestion
            is applied by removing channels (``remove_``).
    """

    layers: list[str]
    ratios: list[float]
    baseline: float
    curves: dict[str, list[float | None]]
    sizes: dict[str, int]
    macs: dict[str, int | None]
    metric: str
    higher_is_better: bool
    proxy: bool
    granularity: str
    evaluations: int
    seconds: float
    complete: bool
    notes: list[str] = field(default_factory=list)
    start: dict[str, float] = field(default_factory=dict)
    method: str = "l1"
    reconstruct: bool = False
    filled: dict[str, list[int]] = field(default_factory=dict)
    remove: bool = False
    _model: Callable[[], nn.Module | None] | None = field(default=None, repr=False, compare=False)
    # The swept model's history when attached: not saved (tokens mean nothing elsewhere).
    _history_token: tuple[int, ...] | None = field(default=None, repr=False, compare=False)
    _calibration: Any = field(default=None, repr=False, compare=False)
    # True while the curves are already on screen (see shown_elsewhere): the HTML repr
    # then leaves the plot out.
    _plot_shown: Callable[[], bool] | None = field(default=None, repr=False, compare=False)

    # --- the model it was measured on -------------------------------------------------------

    @property
    def model(self) -> nn.Module | None:
        """The live model the curves were measured on, or ``None`` (loaded, or model gone)."""
        return self._model() if self._model is not None else None

    def attach(self, model: nn.Module) -> None:
        """Refer (weakly) to the live model; :func:`remember` does this for you.

        Args:
            model: The model the curves were measured on.
        """
        self._model = weakref.ref(model)
        self._history_token = history_token(model)

    @property
    def calibration(self) -> Any:
        """Batches the sweep's evaluation fed the model (references, never saved), or ``None``.

        The suggestion check re-fits kept weights on them
        (:mod:`~nbcompress.engine.sensitivity.refit`).
        """
        return self._calibration

    @calibration.setter
    def calibration(self, batches: Any) -> None:
        self._calibration = batches

    @property
    def history_token(self) -> tuple[int, ...] | None:
        """``history_token(model)`` when the result was attached to its model, else ``None``.

        The explorer compares it with the model's token now to tell whether the model is
        still the one that was swept.
        """
        return self._history_token

    # --- prediction and suggestion -------------------------------------------------------

    def drop_curves(self) -> Curves:
        """Monotone, non-negative drop per layer and ratio, as the prediction uses them."""
        return drop_curves(
            self.ratios, self.curves, self.baseline, self.higher_is_better, self.start
        )

    def _check_ratios(self, ratios: dict[str, float]) -> dict[str, float]:
        if not isinstance(ratios, dict):
            raise TypeError(
                f"ratios: expected a dict layer → fraction, got {type(ratios).__name__}."
            )
        unknown = [n for n in ratios if n not in self.curves]
        if unknown:
            raise ValueError(
                f"ratios: {', '.join(map(repr, unknown))} not analysed in this sweep; "
                f"analysed layers: {', '.join(self.layers)}."
            )
        return {n: check_amount(r, f"ratios[{n!r}]") for n, r in ratios.items()}

    def predict(self, ratios: dict[str, float]) -> float:
        """Predict the metric of pruning several layers at once from the curves.

        Each layer's drop is interpolated on its curve (made monotone and non-negative) and
        the drops are summed, the usual additive model of sensitivity analysis. Layers not
        named are left unpruned.

        Args:
            ratios: Layer → fraction to prune.

        Returns:
            The predicted metric.
        """
        ratios = self._check_ratios(ratios)
        drops = self.drop_curves()
        total = sum(layer_drop(drops.xs[n], drops.drops[n], r) for n, r in ratios.items() if r)
        return self.baseline - total if self.higher_is_better else self.baseline + total

    def sparsity_of(self, ratios: dict[str, float]) -> float:
        """Overall fraction of weights removed over the analysed layers.

        Args:
            ratios: Layer → fraction to prune (missing layers stay as they were swept).

        Returns:
            Zero weights / weights of all analysed layers (a layer never counts less
            than its sparsity at sweep time, see ``start``).
        """
        ratios = self._check_ratios(ratios)
        total = sum(self.sizes[n] for n in self.layers)
        removed = sum(
            max(ratios.get(n, 0.0), self.start.get(n, 0.0)) * self.sizes[n] for n in self.layers
        )
        return removed / total if total else 0.0

    def suggest(
        self,
        target_sparsity: float | None = None,
        *,
        max_drop: float | None = None,
        objective: str = "params",
        evaluate: Callable[[nn.Module], float] | None = None,
        refine: int | None = None,
        budget: int | None = None,
        check: bool | None = None,
        reconstruct: bool | None = None,
        model: nn.Module | None = None,
        executor: Executor | str | None = None,
    ) -> Suggestion:
        """Per-layer ratios for a budget, chosen from the curves and checked by measuring.

        The curves' prediction sums single-layer drops, which is optimistic when layers
        compound. So a ``target_sparsity`` suggestion is checked: the curve suggestion and
        the ratios uniform and global L1 give at the same sparsity are measured on the
        model (three evaluations, each rolled back) and the best measured is kept; its
        notes say which won and by how much. It measures with ``evaluate``, else the
        sweep's own function (or the proxy on the sweep's input) while it is alive. With
        ``refine=N`` a local search then moves sparsity between layers while the measured
        metric improves, for up to ``N`` more evaluations
        (:func:`nbcompress.engine.sensitivity.refine.refine`; the model is left unchanged).

        Args:
            target_sparsity: Remove at least this fraction of the analysed weights (of the
                MACs with ``objective="macs"``) at the smallest predicted drop.
            max_drop: Remove as many parameters (or MACs) as possible while the predicted
                metric falls by at most this much.
            objective: ``"params"`` or ``"macs"``: what is counted as removed.
            evaluate: ``evaluate(model) -> float`` (same direction as the sweep's metric)
                that measures the check and the refinement on the swept model; default
                the sweep's own.
            refine: Evaluations the measured refinement of a ``target_sparsity``
                suggestion may spend after measuring its candidates (e.g. 100), as in
                ``prune_to_(refine=N)``; ``None``: the curves' choice as it is. The old
                spelling ``refine=evaluate`` still works for one release, with a
                ``DeprecationWarning``.
            budget: Deprecated: the old name of ``refine``'s number of evaluations.
            check: ``True``: measure against uniform and global L1 (an error if nothing
                can measure); ``False``: the curves' choice unmeasured (cheap, e.g. while a
                slider moves); ``None``: check whenever something can measure.
            reconstruct: Also measure the checked candidates with kept weights re-fitted
                by least squares on the batches the sweep's evaluation fed the model, and
                keep a re-fitted one if it measures better (applying then re-fits too).
                ``None``: when those batches are known and the re-fit is cheap.
            model: Measure on this model instead of the swept one (e.g. a loaded result
                attached to nothing, checked on a live model; give ``evaluate`` too).
            executor: Measure the check and the refinement on this executor's workers (an
                Executor or a dask scheduler address; the same suggestion as serially).

        Returns:
            The suggestion (with ``measured`` and ``refinement`` when checked); also
            remembered as the model's latest suggestion.

        Raises:
            ValueError: Neither or both budgets given, or a budget that cannot be met (the
                message states the closest reachable value); ``refine`` without
                ``evaluate`` or ``target_sparsity``, or a result not attached to a model.
        """
        return suggest(
            self, (target_sparsity, max_drop), objective,
            evaluate=evaluate, refine=refine, budget=budget, check=check,
            reconstruct=reconstruct, model=model, executor=executor,
        )  # fmt: skip

    # --- presentation --------------------------------------------------------------------

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One plain dict per layer: layer, params, MACs, then the metric per ratio."""
        out = []
        for n in self.layers:
            row: dict[str, Any] = {"layer": n, "params": self.sizes[n], "MACs": self.macs.get(n)}
            row.update({_ratio_key(r): v for r, v in zip(self.ratios, self.curves[n], strict=True)})
            out.append(row)
        return out

    def _title(self) -> str:
        kind = "proxy " if self.proxy else ""
        order = "higher is better" if self.higher_is_better else "lower is better"
        state = "" if self.complete else " — INCOMPLETE"
        what = (
            "removing coupled channel groups" if self.remove else f"{self.granularity} L1 pruning"
        )
        return (
            f"Sensitivity of {kind}{self.metric} ({order}) to {what}, "
            f"baseline {self._value_format()(self.baseline)}; {self.evaluations} evaluations in "
            f"{self.seconds:.1f} s{state}"
        )

    def _columns(self) -> dict[str, Any]:
        cols: dict[str, Any] = {"layer": None, "params": fmt_count, "MACs": fmt_count}
        cols.update(dict.fromkeys(map(_ratio_key, self.ratios), self._value_format()))
        return cols

    def _value_format(self) -> Callable[[float | None], str]:
        """A metric format with digits enough to tell every measured value from the baseline.

        Four significant digits show a proxy of 0.99998 on an untrained model as ``1``,
        the baseline's own value; up to eight are used until they differ.
        """
        values = [v for c in self.curves.values() for v in c if v is not None]
        for digits in range(4, 9):
            text = f"{{:.{digits}g}}".format
            if all(text(v) != text(self.baseline) for v in values if v != self.baseline):
                break
        return lambda v: "—" if v is None else text(v)

    def __str__(self) -> str:
        return text_table(self.rows, self._columns(), title=self._title(), notes=self.notes)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        # IPython's plain-text display (terminals, text/plain): the table, not the repr.
        printer.text(str(self))

    def shown_elsewhere(self, while_: Callable[[], bool]) -> None:
        """Leave the plot out of the HTML display while ``while_()`` is true.

        ``%sensitivity`` draws the curves live and in its explorer; the result it returns
        then shows only its table in that cell instead of the same plot again (in a later
        cell, ``r`` shows the plot as usual).

        Args:
            while_: Tells whether the plot is still on screen, e.g. "still the same cell".
        """
        self._plot_shown = while_

    def _repr_html_(self) -> str:
        notes = list(self.notes)
        if self._plot_shown is not None and self._plot_shown():
            notes.append("The curves are plotted above; .plot() draws them again.")
        table = html_table(self.rows, self._columns(), caption=self._title(), notes=notes)
        if len(notes) > len(self.notes):
            return table
        try:
            from nbcompress.notebook.display.figures import figure_html

            return figure_html(self.plot(), alt="sensitivity plot") + table
        except ImportError:  # matplotlib missing: the table alone still says everything
            return table

    def plot(self, kind: str = "auto") -> Any:
        """Plot the curves as a matplotlib figure.

        Args:
            kind: ``"curves"`` (metric vs ratio, one line per layer, Distiller-style),
                ``"heatmap"`` (layers × ratios, for many layers) or ``"auto"`` (heat map
                above 12 layers).

        Returns:
            A ``matplotlib.figure.Figure`` (no pyplot state is touched).
        """
        # Imported here: plotting belongs to the notebook layer and pulls in matplotlib.
        from nbcompress.notebook.display.sensitivity import sensitivity_figure

        return sensitivity_figure(self, kind)

    # --- persistence ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        return {"format": FORMAT, **data}

    def save(self, path: str | Path) -> None:
        """Write the result as standard JSON, so that a long sweep survives the kernel.

        The file is replaced atomically (a temporary file in the same folder, then
        ``os.replace``): a crash mid-write keeps the old file. Non-finite curve points are
        written as the strings ``"nan"``, ``"inf"``, ``"-inf"`` and read back as floats.

        Args:
            path: File to write.
        """
        write_result(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> SensitivityResult:
        """Read a result written by :meth:`save`.

        Args:
            path: File to read.

        Returns:
            The result (not attached to any model; see
            :func:`~nbcompress.engine.sensitivity.registry.remember`).

        Raises:
            ValueError: The file is not a saved sensitivity result, or a field is missing,
                of the wrong kind or inconsistent (one line naming ``path`` and the field).
        """
        return cls(**read_result(path))


def _ratio_key(r: float) -> str:
    return f"{100 * r:g}%"
