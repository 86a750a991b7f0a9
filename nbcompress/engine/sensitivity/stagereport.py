"""What staged sensitivity pruning reports: one row per stage, predicted vs measured.

The report of :func:`~nbcompress.engine.sensitivity.staged.prune_to_` (kept apart from the
procedure so that each module stays small).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nbcompress.engine.core.report import Table, TableReport, fmt_pct
from nbcompress.engine.sensitivity.evaluate import fmt_value, spent
from nbcompress.engine.sensitivity.refine import Refinement
from nbcompress.engine.sensitivity.result import SensitivityResult
from nbcompress.engine.sensitivity.suggestion import Suggestion

__all__ = ["StagedReport"]


@dataclass(repr=False)
class StagedReport(TableReport):
    """What :func:`prune_to_` did: one row per stage, predicted vs measured metric.

    Attributes:
        target: Overall sparsity asked for.
        stages: One dict per stage: stage, target, sparsity, predicted, measured.
        baseline: Metric of the model before the first stage.
        metric: Name of the metric.
        higher_is_better: ``False`` for losses, perplexity, RMSE.
        evaluations: Evaluations over all sweeps and measurements.
        seconds: Wall-clock time of the whole procedure.
        suggestion: The last stage's suggestion.
        result: The last stage's sweep (curves of the model before the last stage).
        notes: Explanations shown with the report.
        refinement: With ``refine``: the measured search (its candidates and kept moves);
            the last row of ``stages`` is its result.
    """

    target: float
    stages: list[dict[str, Any]]
    baseline: float
    metric: str
    higher_is_better: bool
    evaluations: int
    seconds: float
    suggestion: Suggestion | None = None
    result: SensitivityResult | None = None
    notes: list[str] = field(default_factory=list)
    refinement: Refinement | None = None

    @property
    def measured(self) -> float | None:
        """Metric measured after the last stage."""
        return self.stages[-1]["measured"] if self.stages else None

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One plain dict per stage."""
        return [dict(s) for s in self.stages]

    @property
    def ratios(self) -> dict[str, float]:
        """Per-layer ratios in place after the last stage (or the refinement)."""
        if self.refinement is not None:
            return dict(self.refinement.ratios)
        return dict(self.suggestion.ratios) if self.suggestion else {}

    def _title(self) -> str:
        measured = "not measured" if self.measured is None else f"{self.measured:.4g}"
        n = sum(isinstance(s["stage"], int) for s in self.stages)
        refined = " + measured refinement" if self.refinement is not None else ""
        what = f"Staged sensitivity pruning to sparsity {fmt_pct(self.target)} in {n} stage(s)"
        return (
            f"{what}{refined}: {self.metric} {measured} (baseline {self.baseline:.4g}); "
            + spent(self.evaluations, self.seconds)
        )

    def _columns(self) -> dict[str, Any]:
        num = "{:.4g}".format
        return {
            "stage": None, "target": fmt_pct, "sparsity": fmt_pct,
            "predicted": num, "measured": fmt_value,
        }  # fmt: skip

    def _prediction_note(self) -> str:
        """Why a row's measured metric differs from its prediction (the refined row's often)."""
        off = [
            s for s in self.stages
            if s.get("predicted") is not None and s.get("measured") is not None
            and f"{s['predicted']:.4g}" != f"{s['measured']:.4g}"
        ]  # fmt: skip
        if not off:
            return ""
        sign = 1 if self.higher_is_better else -1
        better = [s for s in off if sign * (s["measured"] - s["predicted"]) > 0]
        what = (
            "measured better than predicted: pruned together, these layers hurt less than "
            "their single-layer drops added up"
            if len(better) == len(off)
            else "measured worse than predicted: pruned together, the layers hurt more than "
            "their single-layer drops added up"
            if not better
            else "measured and predicted differ both ways"
        )
        refined = (
            " The refined row is predicted from the first sweep's curves (the model before any "
            "stage), so it is only a rough guide there; the refinement keeps what measures best."
            if self.refinement is not None
            else ""
        )
        return f"Predicted: from the curves (single-layer drops added up); {what}.{refined}"

    def _table(self) -> Table:
        note = self._prediction_note()
        return Table(
            self.rows, self._columns(), self._title(), [*self.notes, *([note] if note else [])]
        )
