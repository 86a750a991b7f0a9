"""What ``factorize_`` did, per layer: rank, params, MACs, measured latency, output error."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from nbcompress.engine.core.report import Table, TableReport, fmt_count, fmt_pct, fmt_time

__all__ = ["FactorizeReport", "factorize_report", "remember_report"]

_COLUMNS = {
    "layer": None,
    "type": None,
    "rank": lambda r: "—" if r is None else str(r),
    "full rank": lambda r: "—" if r is None else str(r),
    "params before": fmt_count,
    "params after": fmt_count,
    "MACs before": fmt_count,
    "MACs after": fmt_count,
    "time before": fmt_time,
    "time after": fmt_time,
    "output error": fmt_pct,
    "result": None,
}

_LAST: weakref.WeakKeyDictionary[nn.Module, FactorizeReport] = weakref.WeakKeyDictionary()


@dataclass(repr=False)
class FactorizeReport(TableReport):
    """Per-layer figures of one ``factorize_`` call (latencies measured on this machine).

    Attributes:
        rule: How ranks were chosen, e.g. ``"energy 0.9"`` or ``"rank 16"``.
        rows: One dict per selected layer: ``layer``, ``type``, ``rank``, ``full rank``,
            ``params before``/``after``, ``MACs before``/``after`` (per example input),
            ``time before``/``after`` (median seconds, paired interleaved race on the layer's
            real input), ``output error`` (‖y′ − y‖ / ‖y‖ of the layer on that input) and
            ``result`` (``"factorised"`` or the reason it was skipped).
        excluded_output: The output layer left alone by default, if any.
        output_error: Relative error ‖y′ − y‖ / ‖y‖ of the whole model's output on the
            example input after the replacements (``None`` without an example or change).
    """

    rule: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    excluded_output: str | None = None
    output_error: float | None = None

    @property
    def factorised(self) -> list[str]:
        """Names of the layers replaced."""
        return [r["layer"] for r in self.rows if r["result"] == "factorised"]

    @property
    def skipped(self) -> dict[str, str]:
        """Layer name → reason it was left as it was."""
        return {r["layer"]: r["result"] for r in self.rows if r["result"] != "factorised"}

    def _totals(self, key: str) -> tuple[int, int]:
        before = sum(r[f"{key} before"] or 0 for r in self.rows)
        after = sum(
            (r[f"{key} after"] if r["result"] == "factorised" else r[f"{key} before"]) or 0
            for r in self.rows
        )
        return before, after

    def _table(self) -> Table:
        params = self._totals("params")
        notes = [
            f"{len(self.factorised)} of {len(self.rows)} layers factorised; params of the "
            f"selected layers {fmt_count(params[0])} → {fmt_count(params[1])}.",
            "Times: median of interleaved rounds on each layer's input from the example "
            "(a layer is replaced only if smaller and measured ≥ 5% faster, unless "
            "only_faster=False). Undo with undo_(model) / %undo.",
        ]
        if self.output_error is not None:
            notes.append(f"Model output error on the example: {fmt_pct(self.output_error)}.")
        if self.excluded_output:
            notes.append(
                f"Output layer {self.excluded_output} left alone (include_output=True to "
                "factorise it)."
            )
        return Table(self.rows, _COLUMNS, f"factorize ({self.rule})", notes)


def remember_report(model: nn.Module, report: FactorizeReport) -> None:
    """Keep ``report`` as the last factorize report of ``model``."""
    _LAST[model] = report


def factorize_report(model: nn.Module) -> FactorizeReport | None:
    """The report of the last ``factorize_`` call on ``model`` (``None`` if there was none)."""
    return _LAST.get(model)
