"""A suggestion of per-layer ratios, and applying it to the model in place.

:meth:`SensitivityResult.suggest <nbcompress.engine.sensitivity.result.SensitivityResult.suggest>`
makes a :class:`Suggestion`; :func:`apply_suggestion_` prunes the model with it (through
:func:`~nbcompress.engine.prune.prune.prune_ratios_`, the one way to apply per-layer ratios)
and measures the result, as one step of the model's history.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from nbcompress.engine.core.history import transaction
from nbcompress.engine.core.report import Table, TableReport, fmt_count, fmt_pct
from nbcompress.engine.core.summary import REMOVE_STEP
from nbcompress.engine.core.validation import check_module
from nbcompress.engine.prune.prune import prune_ratios_
from nbcompress.engine.sensitivity.evaluate import measurer, spent
from nbcompress.engine.sensitivity.groupcheck import group_inputs
from nbcompress.engine.sensitivity.registry import latest_suggestion, remembered
from nbcompress.engine.sensitivity.removal import remove_groups

if TYPE_CHECKING:
    from nbcompress.engine.sensitivity.refine import Refinement

__all__ = ["ApplyReport", "Suggestion", "apply_suggestion_", "prune_to_suggestion_"]

_RATIO_COLUMNS = {"layer": None, "ratio": fmt_pct}


@dataclass(repr=False)
class Suggestion(TableReport):
    """Per-layer pruning ratios chosen from sensitivity curves.

    Attributes:
        ratios: Layer → fraction to prune (0 = leave alone).
        predicted: Metric predicted from the curves with these ratios.
        sparsity: Overall fraction of weights removed over the analysed layers.
        removed: Parameters (or MACs, per ``objective``) removed.
        objective: ``"params"`` or ``"macs"``.
        target: The budget asked for, e.g. ``"sparsity 80%"`` or ``"max drop 0.01"``.
        metric: Name of the metric the prediction is for.
        baseline: Metric of the unpruned model.
        granularity: ``"element"``, ``"block"`` or ``"channel"``, as in the sweep.
        proxy: The metric is the data-free proxy, not a user evaluation.
        measured: Metric measured for these ratios when the suggestion was checked
            against uniform and global L1 or refined (``suggest(..., refine=N)``), else
            ``None``.
        refinement: The check's (and refinement's) report: candidates measured, kept
            moves, evaluations, time.
        higher_is_better: Direction of the metric.
        notes: What the target is a share of, which candidate won the check and by how
            much, or why there was no check.
        reconstruct: Applying re-fits the kept weights by least squares on
            ``calibration`` (a re-fitted candidate measured best in the check).
        calibration: The inputs the re-fit uses (recorded from the sweep's evaluation).
        chosen: What the ratios are: ``"curve suggestion"``, ``"uniform L1"``, ``"global L1"``,
            ``"… , re-fitted"`` or ``"refined from …"`` (the best measured).
        method: How applying chooses the masks (the sweep's method).
        evaluations: Evaluations the check (re-fits and refinement included) ran.
        seconds: Their wall-clock time.
        remove: Ratios of coupled channel groups (a group sweep): applying removes the
            channels physically (``remove_``) instead of zeroing them.
    """

    ratios: dict[str, float]
    predicted: float
    sparsity: float
    removed: int
    objective: str
    target: str
    metric: str = "metric"
    baseline: float | None = None
    granularity: str = "element"
    proxy: bool = False
    measured: float | None = None
    refinement: Refinement | None = field(default=None, repr=False)
    higher_is_better: bool = True
    notes: list[str] = field(default_factory=list)
    reconstruct: bool = False
    calibration: Any = field(default=None, repr=False, compare=False)
    chosen: str = "curve suggestion"
    method: str = "l1"
    evaluations: int = 0
    seconds: float = 0.0
    remove: bool = False

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One plain dict per layer."""
        return [{"layer": n, "ratio": r} for n, r in self.ratios.items()]

    def _title(self) -> str:
        label = "predicted proxy" if self.proxy else "predicted"
        base = "" if self.baseline is None else f" (baseline {self.baseline:.4g})"
        measured = ""
        if self.measured is not None:
            cost = spent(self.evaluations, self.seconds)
            measured = f", measured {self.measured:.4g} ({self.chosen}, best measured: {cost})"
        return (
            f"Suggestion for {self.target}: sparsity {fmt_pct(self.sparsity)}, "
            f"{fmt_count(self.removed)} {self.objective} removed; "
            f"{label} {self.metric} {self.predicted:.4g}{measured}{base}"
        )

    def _table(self) -> Table:
        return Table(self.rows, _RATIO_COLUMNS, self._title(), self.notes)


# --- applying a suggestion ----------------------------------------------------------------


@dataclass(repr=False)
class ApplyReport(TableReport):
    """What :func:`apply_suggestion_` did: the ratios, and predicted vs measured metric.

    Attributes:
        suggestion: The applied suggestion.
        predicted: Metric predicted by the sensitivity curves.
        measured: Metric measured on the pruned model (``None`` without an evaluation).
        baseline: Metric of the unpruned model in the sweep.
        metric: Name of the metric.
        proxy: The metric is the data-free proxy.
        notes: Explanations shown with the report.
    """

    suggestion: Suggestion
    predicted: float
    measured: float | None
    baseline: float | None
    metric: str
    proxy: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One plain dict per pruned layer."""
        return [r for r in self.suggestion.rows if r["ratio"] > 0]

    def _title(self) -> str:
        kind = "proxy " if self.proxy else ""
        measured = "not measured" if self.measured is None else f"{self.measured:.4g}"
        base = "" if self.baseline is None else f"; baseline {self.baseline:.4g}"
        share = (
            "of the swept groups' parameters removed"
            if self.suggestion.remove
            else ("of the analysed weights zero")
        )
        return (
            f"Applied suggestion for {self.suggestion.target} ("
            f"{fmt_pct(self.suggestion.sparsity)} {share}): "
            f"{kind}{self.metric} predicted "
            f"{self.predicted:.4g}, measured {measured}{base}"
        )

    def _table(self) -> Table:
        return Table(self.rows, _RATIO_COLUMNS, self._title(), self.notes)


def apply_suggestion_(
    model: nn.Module,
    suggestion: Suggestion | None = None,
    *,
    evaluate: Callable[[nn.Module], float] | None = None,
    example_inputs: Any = None,
) -> ApplyReport:
    """Prune ``model`` in place with a suggestion's per-layer ratios and measure the result.

    The pruning is one step of the model's history (``undo_`` reverts it). The metric is
    measured with ``evaluate`` (default: the function of the model's latest sweep, if still
    alive) or, for a proxy sweep, on the example input; if measuring fails, nothing is kept.

    Args:
        model: The model to prune.
        suggestion: Default: the latest suggestion made for ``model``.
        evaluate: Evaluation function, ``evaluate(model) -> float``.
        example_inputs: Input for the proxy metric of a proxy sweep.

    Returns:
        The report with predicted and measured metric.

    Raises:
        ValueError: No suggestion for this model, or it prunes nothing.
    """
    check_module(model)
    suggestion = suggestion if suggestion is not None else latest_suggestion(model)
    if suggestion is None:
        raise ValueError(
            "suggestion: none recorded for this model (a sweep records one only with a "
            "budget). Run a sweep with one first, e.g. `r = nbcompress.sensitivity(model, "
            "evaluate); r.suggest(0.8)`, `%sensitivity model --eval evaluate --target-sparsity "
            "0.8`, or for removed channels `%sensitivity model --eval evaluate --remove --input "
            "x --target-sparsity 0.3` (or --max-drop 0.01)."
        )
    ratios = {n: r for n, r in suggestion.ratios.items() if r > 0}
    if not ratios:
        raise ValueError("suggestion: every ratio is 0, so there is nothing to prune.")
    modules = dict(model.named_modules())
    missing = [n for n in ratios if n not in modules]
    if missing:
        raise ValueError(
            f"suggestion: layer(s) {', '.join(missing)} are not in this model; apply a "
            "suggestion to the model it was made for."
        )
    measure, notes = _how_to_measure(model, suggestion, evaluate, example_inputs)
    notes = [*suggestion.notes, *notes]
    detail = f"suggested per-layer ratios ({suggestion.target}) on {len(ratios)} layer(s)"
    if suggestion.remove:
        x = group_inputs(model, example_inputs)
        detail = f"suggested per-group ratios ({suggestion.target}) on {len(ratios)} group(s)"
    with transaction(model, REMOVE_STEP if suggestion.remove else "prune", detail) as tx:
        if suggestion.remove:
            remove_groups(model, ratios, x, suggestion.method)
            # remove_ wrote channels, params and MACs before → after: keep them.
            detail = f"{detail}: {tx.step.detail}".rstrip(": ")
        else:
            prune_to_suggestion_(model, suggestion)
        measured = measure() if measure else None  # an error here rolls the pruning back
        share = "" if suggestion.remove else f", sparsity {fmt_pct(suggestion.sparsity)}"
        tx.step.detail = detail + share
        tx.info.update(suggestion=suggestion.target, measured=measured)
    notes.append("Undo with nbcompress.undo_(model) or %undo model.")
    return ApplyReport(
        suggestion, suggestion.predicted, measured, suggestion.baseline, suggestion.metric,
        proxy=suggestion.proxy, notes=notes,
    )  # fmt: skip


def prune_to_suggestion_(
    model: nn.Module, suggestion: Suggestion, *, keep_masks: bool = False
) -> nn.Module:
    """Prune ``model`` to a suggestion's ratios as the sweep pruned (granularity, method).

    The one way a suggestion's unstructured ratios are applied: ``apply_suggestion_``, the
    demo and the application notebooks all go through it. ``keep_masks=True`` keeps the
    masks so that fine-tuning next cannot revive pruned weights. One undoable step (or part
    of the caller's).
    """
    ratios = {n: r for n, r in suggestion.ratios.items() if r > 0}
    return prune_ratios_(
        model, ratios, granularity=suggestion.granularity, method=suggestion.method,
        reconstruct=suggestion.reconstruct, example_inputs=suggestion.calibration,
        keep_masks=keep_masks,
    )  # fmt: skip


def _how_to_measure(
    model: nn.Module, suggestion: Suggestion, evaluate: Any, example_inputs: Any
) -> tuple[Callable[[], float] | None, list[str]]:
    """How to measure after applying: explicit evaluate, else the sweep's own metric."""
    old_eval, old_inputs = remembered(model)
    if evaluate is not None:
        notes = (
            ["The prediction is of the proxy; the measurement uses evaluate."]
            if suggestion.proxy
            else []
        )
        return measurer(model, evaluate, None), notes
    if suggestion.proxy:
        inputs = example_inputs if example_inputs is not None else old_inputs
        measure = measurer(model, None, inputs, proxy=True)
    else:
        measure = measurer(model, old_eval, None)
    return measure, ([] if measure else ["Not measured: pass evaluate= (--eval) to compare."])
