"""The trials of a search, their Pareto front, and applying, saving and plotting them."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from nbcompress.engine.core.report import fmt_bytes, fmt_time, text_table
from nbcompress.engine.prune.prune import prune_ratios_
from nbcompress.engine.search.objectives import MEASURED

__all__ = ["FORMAT", "SearchResult", "SearchTrial"]

FORMAT = "nbcompress-search/1"


def _fixed(digits: int) -> Any:
    return lambda v: "—" if v is None else f"{v:.{digits}f}"


@dataclass
class SearchTrial:
    """One measured allocation.

    Attributes:
        number: Position in the study (0 = first trial).
        ratios: Layer name → pruning ratio of the allocation.
        metric: What ``evaluate`` returned (``None`` if the trial failed).
        sparsity: Share of the searched weights the ratios zero.
        state: ``"complete"``, ``"fail"`` or another optuna trial state, lower case.
        error: The failure of ``evaluate``, one line (failed trials only).
        size: Stored bytes of the pruned model (CSR where smaller), when an objective.
        latency: Measured seconds per call as ``sparsify_`` would leave it, when an objective.
    """

    number: int
    ratios: dict[str, float]
    metric: float | None
    sparsity: float
    state: str = "complete"
    error: str | None = None
    size: float | None = None
    latency: float | None = None

    @property
    def ok(self) -> bool:
        """The trial completed with a metric."""
        return self.state == "complete" and self.metric is not None


@dataclass
class SearchResult:
    """What a :func:`~nbcompress.engine.search.search.search` measured.

    Attributes:
        trials: Every trial, in order (resumed ones included).
        target_sparsity: The budget every trial met, or ``None`` (sparsity was an objective).
        sampler: Name of the sampler.
        method: Pruning criterion the ratios were applied with.
        granularity: Pruning granularity the ratios were applied with.
        reconstruct: Kept weights were re-fitted on calibration inputs in every trial.
        interrupted: The search was stopped by Ctrl-C; the finished trials are kept.
        study_name: The optuna study's name (to find it in a storage).
        notes: Lines printed under the table.
    """

    trials: list[SearchTrial]
    target_sparsity: float | None = None
    sampler: str = "tpe"
    method: str = "l1"
    granularity: str = "element"
    reconstruct: bool = False
    interrupted: bool = False
    study_name: str = ""
    notes: list[str] = field(default_factory=list)

    def completed(self) -> list[SearchTrial]:
        """The trials that completed with a metric."""
        return [t for t in self.trials if t.ok]

    def pareto(self) -> list[SearchTrial]:
        """The non-dominated trials for (metric, sparsity), both higher-better, deduplicated.

        A point repeated (the same metric and sparsity, e.g. a proposal repeated by the
        sampler) is listed once, as its first trial. Sorted by sparsity.
        """
        front: dict[tuple[float, float], SearchTrial] = {}
        done = self.completed()
        # Sparsities are compared to 1e-6: projected trials meet a target to the bisection's
        # rounding (~1e-9), and two such points are the same sparsity, not a trade-off.
        sp = {t.number: round(t.sparsity, 6) for t in done}
        for t in done:
            dominated = any(
                o.metric >= t.metric  # type: ignore[operator]
                and sp[o.number] >= sp[t.number]
                and (o.metric > t.metric or sp[o.number] > sp[t.number])  # type: ignore[operator]
                for o in done
            )
            if not dominated:
                front.setdefault((t.metric, sp[t.number]), t)  # type: ignore[arg-type]
        return sorted(front.values(), key=lambda t: (t.sparsity, t.number))

    def best(self, min_sparsity: float | None = None) -> SearchTrial:
        """The trial with the highest metric, optionally among those at ``min_sparsity`` or more.

        Raises:
            ValueError: No trial completed, or none reaches ``min_sparsity``.
        """
        done = self.completed()
        if not done:
            raise ValueError("result: no trial completed; there is no best allocation.")
        if min_sparsity is not None:
            reached = max(t.sparsity for t in done)
            done = [t for t in done if t.sparsity >= min_sparsity - 1e-9]
            if not done:
                raise ValueError(
                    f"min_sparsity: no completed trial reaches {min_sparsity:.3f} (the "
                    f"sparsest reached {reached:.3f}); pass a lower value."
                )
        return max(done, key=lambda t: (t.metric, t.sparsity, -t.number))

    def apply_(
        self,
        model: nn.Module,
        choice: int | Mapping[str, float] | SearchTrial,
        example_inputs: Any = None,
    ) -> nn.Module:
        """Prune ``model`` to a trial's allocation, as one undoable step (``prune_ratios_``).

        Args:
            model: The model searched (or one with the same layer names).
            choice: A trial number, a :class:`SearchTrial`, or layer name → ratio.
            example_inputs: The calibration inputs of the search, when it used
                ``method="wanda"`` or ``reconstruct`` (the pruning must be the one measured).

        Returns:
            The model, pruned in place.
        """
        if isinstance(choice, SearchTrial):
            ratios: Mapping[str, float] = choice.ratios
        elif isinstance(choice, int) and not isinstance(choice, bool):
            numbers = {t.number: t for t in self.trials}
            if choice not in numbers:
                raise ValueError(
                    f"choice: no trial number {choice}; pick one of 0..{len(self.trials) - 1} "
                    "(see result.pareto() or result.best())."
                )
            ratios = numbers[choice].ratios
        elif isinstance(choice, Mapping):
            ratios = choice
        else:
            raise TypeError(
                "choice: expected a trial number, a SearchTrial or a dict layer → ratio, got "
                f"{type(choice).__name__}."
            )
        if (self.reconstruct or self.method == "wanda") and example_inputs is None:
            raise ValueError(
                "example_inputs: this search pruned with calibration inputs (wanda or re-fit); "
                "pass the same example_inputs=x to apply what was measured."
            )
        return prune_ratios_(
            model,
            {n: r for n, r in ratios.items() if r > 0},
            method=self.method,
            granularity=self.granularity,
            example_inputs=example_inputs,
            reconstruct=self.reconstruct,
        )

    # --- display ---------------------------------------------------------------------------

    def _extras(self) -> list[str]:
        """The measured objectives besides metric and sparsity present in the trials."""
        return [k for k in MEASURED if any(getattr(t, k) is not None for t in self.trials)]

    def _rows(self, trials: list[SearchTrial]) -> list[dict[str, Any]]:
        front = {t.number for t in self.pareto()}
        return [
            {
                "#": t.number,
                "metric": t.metric,
                "sparsity": t.sparsity,
                **{k: getattr(t, k) for k in self._extras()},
                "front": "*" if t.number in front else "",
                "state": t.state,
                "ratios": " ".join(f"{r:.2f}" for r in t.ratios.values()),
            }
            for t in trials
        ]

    def title(self) -> str:
        """One line: sampler, budget, trials complete."""
        done = len(self.completed())
        budget = (
            f"target sparsity {self.target_sparsity:.3f}"
            if self.target_sparsity is not None
            else "metric vs sparsity"
        )
        stop = ", interrupted" if self.interrupted else ""
        return f"search ({self.sampler}, {budget}): {done}/{len(self.trials)} trials complete{stop}"

    def __str__(self) -> str:
        extras = self._extras()
        columns = dict.fromkeys(("#", "metric", "sparsity", *extras, "front", "state", "ratios"))
        columns.update(metric=_fixed(4), sparsity=_fixed(3))
        units = {"size": fmt_bytes, "latency": fmt_time}
        columns.update({k: units[k] for k in extras})
        return text_table(self._rows(self.trials), columns, title=self.title(), notes=self.notes)

    def __repr__(self) -> str:
        try:
            best = self.best()
            tail = (
                f", best metric {best.metric:.4f} at sparsity {best.sparsity:.3f} (#{best.number})"
            )
        except ValueError:
            tail = ""
        return f"<SearchResult {self.title()}{tail}; print() it for the table>"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        # IPython's plain-text display: the table, not the one-line repr.
        printer.text(str(self))

    def plot(self) -> Any:
        """Metric vs sparsity of every completed trial, the Pareto front highlighted.

        Returns:
            A ``matplotlib.figure.Figure`` (no pyplot state is touched).
        """
        # Imported here: plotting belongs to the notebook layer and pulls in matplotlib.
        from nbcompress.notebook.display.search import search_figure

        return search_figure(self)

    # --- persistence -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field."""
        data = asdict(self)
        for t in data["trials"]:
            if t["metric"] is not None and not math.isfinite(t["metric"]):
                t["metric"] = None
        return {"format": FORMAT, **data}

    def save(self, path: str | Path) -> None:
        """Write the result as JSON, atomically (a crash mid-write keeps the old file)."""
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False)
        target = Path(path)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | Path) -> SearchResult:
        """Read a file written by :meth:`save`.

        Raises:
            ValueError: One line naming ``path``: not JSON, or not a saved search result.
        """
        where = f"path: {str(path)!r}"
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{where} is not a saved search result: {err}.") from None
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
            raise ValueError(f"{where} is not a saved nbcompress search result.")
        try:
            trials = [SearchTrial(**t) for t in data.pop("trials")]
            return cls(trials=trials, **data)
        except (TypeError, KeyError) as err:
            raise ValueError(f"{where} is not a valid saved search result: {err}.") from None
