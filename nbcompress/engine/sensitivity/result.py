"""The result of a sensitivity sweep, and each model's latest result and suggestion.

A :class:`SensitivityResult` holds the measured curves and predicts the metric of
per-layer ratios; its suggestions come from :mod:`nbcompress.engine.sensitivity.allocate`.
The latest result and suggestion of each model live in a weak-keyed registry (like the
histories in :mod:`nbcompress.engine.core.history`) so that ``%prune model --suggested`` and
the explorer widget find them without the model holding anything extra.
"""

from __future__ import annotations

import contextlib
import copy
import json
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from torch import nn

from nbcompress.engine.core.report import fmt_count, html_table, text_table
from nbcompress.engine.core.validation import check_amount, check_module
from nbcompress.engine.sensitivity import allocate as _suggest
from nbcompress.engine.sensitivity.allocate import Suggestion

__all__ = ["SensitivityResult", "keep_latest", "latest", "latest_suggestion", "remember"]

_FORMAT = "nbcompress.sensitivity/1"


@dataclass
class SensitivityResult:
    """Metric per layer and pruning ratio, measured by :func:`sensitivity`.

    Attributes:
        layers: Analysed layers, in model order.
        ratios: Pruning ratios of the sweep, ascending.
        baseline: Metric of the unpruned model.
        curves: Layer → metric per ratio (same order as ``ratios``); ``None`` where not
            evaluated (early stop or interrupted).
        sizes: Layer → parameters in its weight.
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
    _model: Any = field(default=None, repr=False, compare=False)

    # --- prediction and suggestion -------------------------------------------------------

    def _drops(self) -> _suggest.Curves:
        return _suggest.drop_curves(
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
        drops = self._drops()
        total = sum(
            _suggest.layer_drop(drops.xs[n], drops.drops[n], r) for n, r in ratios.items() if r
        )
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

    def _weights(self, objective: str) -> dict[str, int]:
        if objective == "params":
            return {n: self.sizes[n] for n in self.layers}
        if objective == "macs":
            missing = [n for n in self.layers if self.macs.get(n) is None]
            if missing:
                raise ValueError(
                    f"objective: MACs are unknown for {', '.join(missing)}; rerun the sweep "
                    "with example_inputs (--input) or use objective='params'."
                )
            return {n: int(self.macs[n]) for n in self.layers}
        raise ValueError(f"objective: {objective!r} is unknown; choose 'params' or 'macs'.")

    def suggest(
        self,
        target_sparsity: float | None = None,
        *,
        max_drop: float | None = None,
        objective: str = "params",
        refine: Callable[[nn.Module], float] | None = None,
        budget: int = 100,
    ) -> Suggestion:
        """Per-layer ratios for a budget, chosen from the curves (not uniform ratios).

        The curves' prediction sums single-layer drops, which is optimistic when layers
        compound. With ``refine=evaluate`` the choice is checked by evaluation instead: the
        curve suggestion and the ratios uniform and global L1 would give are measured on the
        model, and a local search moves sparsity between layers while the measured metric
        improves (:func:`nbcompress.engine.sensitivity.refine.refine`; the model is left unchanged).

        Args:
            target_sparsity: Remove at least this fraction of the analysed weights (of the
                MACs with ``objective="macs"``) at the smallest predicted drop.
            max_drop: Remove as many parameters (or MACs) as possible while the predicted
                metric falls by at most this much.
            objective: ``"params"`` or ``"macs"``: what is counted as removed.
            refine: ``evaluate(model) -> float`` (same direction as the sweep's metric) to
                refine a ``target_sparsity`` suggestion by measuring on the swept model.
            budget: Evaluations the refinement may spend after measuring its candidates.

        Returns:
            The suggestion (with ``measured`` and ``refinement`` when refined); also
            remembered as the model's latest suggestion.

        Raises:
            ValueError: Neither or both budgets given, or a budget that cannot be met (the
                message states the closest reachable value); ``refine`` without
                ``target_sparsity``, or a result not attached to a model.
        """
        weights = self._weights(objective)
        model = self._model() if self._model is not None else None
        if refine is not None:
            self._check_refine(model, target_sparsity, objective)
        ratios = _suggest.choose(
            self._drops(), weights, target_sparsity=target_sparsity, max_drop=max_drop
        )
        refinement = None
        if refine is not None:
            refinement = self._refine(model, refine, target_sparsity, ratios, budget)
            ratios = refinement.ratios
        target = f"sparsity {target_sparsity:.0%}" if max_drop is None else f"max drop {max_drop:g}"
        if objective == "macs" and max_drop is None:
            target = f"MAC reduction {target_sparsity:.0%}"
        result = Suggestion(
            ratios=ratios,
            predicted=self.predict(ratios),
            sparsity=self.sparsity_of(ratios),
            removed=int(round(sum(r * weights[n] for n, r in ratios.items()))),
            objective=objective,
            target=target,
            metric=self.metric,
            baseline=self.baseline,
            granularity=self.granularity,
            proxy=self.proxy,
            measured=refinement.measured if refinement else None,
            refinement=refinement,
        )
        if model is not None:
            remember(model, suggestion=result)
        return result

    def _check_refine(self, model: Any, target_sparsity: Any, objective: str) -> None:
        if target_sparsity is None or objective != "params":
            raise ValueError(
                "refine: refines a target_sparsity suggestion over parameters; give "
                "target_sparsity=... with objective='params', or leave refine out."
            )
        if model is None:
            raise ValueError(
                "refine: this result is not attached to a live model (loaded from JSON, or the "
                "model is gone); attach it with remember(model, result) first."
            )

    def _refine(self, model, evaluate, target, ratios, budget) -> Any:
        from nbcompress.engine.sensitivity.refine import refine  # it builds on the sweep module

        return refine(
            model, evaluate, target, candidates={"curve suggestion": ratios}, budget=budget,
            layers=list(self.layers), types={type(model.get_submodule(n)) for n in self.layers},
            granularity=self.granularity, higher_is_better=self.higher_is_better,
            metric=self.metric, predict=self.predict,
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
        return (
            f"Sensitivity of {kind}{self.metric} ({order}) to {self.granularity} L1 pruning, "
            f"baseline {self.baseline:.4g}; {self.evaluations} evaluations in "
            f"{self.seconds:.1f} s{state}"
        )

    def _columns(self) -> dict[str, Any]:
        cols: dict[str, Any] = {"layer": None, "params": fmt_count, "MACs": fmt_count}
        cols.update(dict.fromkeys(map(_ratio_key, self.ratios)))
        return cols

    def __str__(self) -> str:
        return text_table(self.rows, self._columns(), title=self._title(), notes=self.notes)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        # IPython's plain-text display (terminals, text/plain): the table, not the repr.
        printer.text(str(self))

    def _repr_html_(self) -> str:
        table = html_table(self.rows, self._columns(), caption=self._title(), notes=self.notes)
        try:
            from nbcompress.notebook.display.figures import figure_html

            return figure_html(self.plot()) + table
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
        return {"format": _FORMAT, **data}

    def save(self, path: str | Path) -> None:
        """Write the result as JSON, so that a long sweep survives the kernel.

        Args:
            path: File to write.
        """
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> SensitivityResult:
        """Read a result written by :meth:`save`.

        Args:
            path: File to read.

        Returns:
            The result (not attached to any model; see :func:`remember`).

        Raises:
            ValueError: The file is not a saved sensitivity result.
        """
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"path: {str(path)!r} is not JSON: {err}.") from None
        if not isinstance(data, dict) or data.pop("format", None) != _FORMAT:
            raise ValueError(f"path: {str(path)!r} is not a saved nbcompress sensitivity result.")
        names = {f.name for f in fields(cls) if not f.name.startswith("_")}
        return cls(**{k: v for k, v in data.items() if k in names})


def _ratio_key(r: float) -> str:
    return f"{100 * r:g}%"


# --- registry of each model's latest result and suggestion ---------------------------------


@dataclass
class _Record:
    result: Any = None  # a SensitivityResult (typed loosely: that module imports this one)
    suggestion: Suggestion | None = None
    evaluate: Callable[[], Any] | None = None  # weak reference to the evaluate function
    inputs: Callable[[], Any] | None = None  # weak reference to the example input


_LATEST: weakref.WeakKeyDictionary[nn.Module, _Record] = weakref.WeakKeyDictionary()


def _weak(obj: Any) -> Callable[[], Any] | None:
    # Weak, so that an evaluate closure over the model cannot keep the model alive.
    if obj is None:
        return None
    try:
        return weakref.WeakMethod(obj) if hasattr(obj, "__self__") else weakref.ref(obj)
    except TypeError:  # tuples of inputs and the like cannot be weakly referenced
        return lambda: obj


def remember(
    model: nn.Module,
    result: Any = None,
    *,
    suggestion: Suggestion | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    example_inputs: Any = None,
) -> None:
    """Record a sensitivity result and/or a suggestion as the latest for ``model``.

    The sweep and ``SensitivityResult.suggest`` call this; call it yourself after
    ``SensitivityResult.load`` to attach a saved result to a model.

    Args:
        model: The model the result belongs to.
        result: A ``SensitivityResult`` (attached to ``model``; the latest suggestion is reset).
        suggestion: A suggestion for ``model``.
        evaluate: The evaluation function used, to measure after applying a suggestion.
        example_inputs: The example input used by the proxy.
    """
    check_module(model)
    rec = _LATEST.setdefault(model, _Record())
    if result is not None:
        result._model = weakref.ref(model)
        rec.result, rec.suggestion = result, None
        rec.evaluate, rec.inputs = _weak(evaluate), _weak(example_inputs)
    if suggestion is not None:
        rec.suggestion = suggestion


def latest(model: nn.Module) -> Any:
    """The most recent ``SensitivityResult`` of ``model`` (partial ones included), or ``None``."""
    rec = _LATEST.get(check_module(model))
    return rec.result if rec else None


def latest_suggestion(model: nn.Module) -> Suggestion | None:
    """The most recent suggestion made for ``model``, or ``None``."""
    rec = _LATEST.get(check_module(model))
    return rec.suggestion if rec else None


def remembered(model: nn.Module) -> tuple[Any, Any]:
    """The evaluate function and example input of the model's latest sweep, if still alive."""
    rec = _LATEST.get(model)
    if rec is None:
        return None, None
    return (rec.evaluate() if rec.evaluate else None, rec.inputs() if rec.inputs else None)


@contextlib.contextmanager
def keep_latest(model: nn.Module) -> Iterator[None]:
    """Restore the model's latest result and suggestion if the block fails.

    For procedures that sweep and suggest several times (staged pruning): when they roll
    the model back, the sweeps they made describe a model that no longer exists. On success
    the latest suggestion is cleared, as it was made for an intermediate state.
    """
    rec = _LATEST.get(model)
    saved = copy.copy(rec) if rec is not None else None
    try:
        yield
    except BaseException:
        if saved is None:
            _LATEST.pop(model, None)
        else:
            _LATEST[model] = saved
        raise
    if model in _LATEST:
        _LATEST[model].suggestion = None
