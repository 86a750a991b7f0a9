"""Per-layer pruning ratios from sensitivity curves: prediction and budgeted choice.

The prediction model is the usual one of sensitivity analysis (Distiller, NNI): pruning
several layers costs the sum of what pruning each one alone cost. Each layer's drop curve
is made monotone (pruning more never helps) and clipped at zero, so that evaluation noise
does not show up as free gains. Choosing one ratio per layer under a budget is then a
multiple-choice knapsack, solved exactly on a discretised budget by dynamic programming.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from nbcompress.engine.core.report import Table, TableReport, fmt_count, fmt_pct
from nbcompress.engine.core.validation import check_module

__all__ = [
    "ApplyReport",
    "Curves",
    "Suggestion",
    "apply_suggestion_",
    "choose",
    "drop_curves",
    "layer_drop",
]

#: Budget resolution of the dynamic programme (bins over the whole budget).
_BINS = 2000


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
        measured: Metric measured for these ratios when the suggestion was refined by
            evaluation (``suggest(..., refine=evaluate)``), else ``None``.
        refinement: The refinement's report (candidates, kept moves, evaluations, time).
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
    refinement: Any = field(default=None, repr=False)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One plain dict per layer."""
        return [{"layer": n, "ratio": r} for n, r in self.ratios.items()]

    def _title(self) -> str:
        label = "predicted proxy" if self.proxy else "predicted"
        base = "" if self.baseline is None else f" (baseline {self.baseline:.4g})"
        measured = ""
        if self.refinement is not None:
            measured = (
                f", measured {self.measured:.4g} (refined from {self.refinement.start}: "
                f"{self.refinement.evaluations} evaluations in {self.refinement.seconds:.1f} s)"
            )
        return (
            f"Suggestion for {self.target}: sparsity {fmt_pct(self.sparsity)}, "
            f"{fmt_count(self.removed)} {self.objective} removed; "
            f"{label} {self.metric} {self.predicted:.4g}{measured}{base}"
        )

    def _table(self) -> Table:
        return Table(self.rows, _RATIO_COLUMNS, self._title())


@dataclass
class Curves:
    """Monotone, non-negative drop curves: per layer, ratios (from its start) and drops."""

    xs: dict[str, np.ndarray]
    drops: dict[str, np.ndarray]


def drop_curves(
    ratios: Sequence[float],
    curves: Mapping[str, Sequence[float | None]],
    baseline: float,
    higher_is_better: bool,
    start: Mapping[str, float] | None = None,
) -> Curves:
    """Turn metric curves into drop curves; unevaluated points are left out.

    Each curve starts at the layer's sparsity when it was swept (``start``, default 0)
    with no drop: a layer that is already pruned cannot be suggested less pruning.
    """
    xs, drops = {}, {}
    sign = 1.0 if higher_is_better else -1.0
    for name, values in curves.items():
        s0 = float((start or {}).get(name, 0.0))
        pts = [(s0, 0.0)]
        for r, v in zip(ratios, values, strict=True):
            if v is None or r <= s0 + 1e-9:
                continue
            d = sign * (baseline - v)
            pts.append((float(r), math.inf if math.isnan(d) else d))
        x = np.array([p[0] for p in pts])
        # Clip at zero and take the running maximum: more pruning is never predicted to help.
        d = np.maximum.accumulate(np.maximum(np.array([p[1] for p in pts]), 0.0))
        xs[name], drops[name] = x, d
    return Curves(xs, drops)


def layer_drop(x: np.ndarray, d: np.ndarray, ratio: float) -> float:
    """Predicted drop of one layer at ``ratio``: linear between points, extended past the last."""
    if ratio <= x[-1] or len(x) == 1:
        # With no evaluated point at all, nothing is known: predict no drop.
        value = float(np.interp(ratio, x, d)) if len(x) > 1 else 0.0
        return math.inf if math.isnan(value) else value  # next to a non-finite metric
    slope = (d[-1] - d[-2]) / (x[-1] - x[-2]) if math.isfinite(d[-1]) else 0.0
    return float(d[-1] + max(slope, 0.0) * (ratio - x[-1]))


def _check_fraction(value: Any, arg: str, *, upper_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{arg}: expected a number, got {type(value).__name__} {value!r}.")
    value = float(value)
    if math.isnan(value) or value < 0 or (upper_open and value >= 1):
        raise ValueError(f"{arg}: {value!r} is outside {'[0, 1)' if upper_open else '[0, inf)'}.")
    return value


def _options(curves: Curves, name: str, step: float = 0.01) -> list[tuple[float, float]]:
    """(ratio, drop) choices of one layer with a finite predicted drop; its start first.

    Besides the evaluated ratios, points every ``step`` in between are offered with
    interpolated drops: a coarse grid would otherwise force whole layers onto the same few
    ratios and overshoot the budget.
    """
    x, d = curves.xs[name], curves.drops[name]
    finite = x[np.isfinite(d)]
    if len(finite) < 2:
        return [(float(x[0]), 0.0)]
    fine = np.arange(x[0], finite[-1], step)
    grid = np.unique(np.round(np.concatenate([finite, fine]), 6))
    return [(float(r), float(np.interp(r, x[: len(finite)], d[: len(finite)]))) for r in grid]


def choose(
    curves: Curves,
    weights: Mapping[str, int],
    *,
    target_sparsity: float | None = None,
    max_drop: float | None = None,
) -> dict[str, float]:
    """Pick one ratio per layer (evaluated or interpolated between) under a budget.

    Args:
        curves: Drop curves from :func:`drop_curves`.
        weights: Layer → parameters (or MACs) one unit of ratio removes.
        target_sparsity: Remove at least this fraction of the total weight with the
            smallest predicted drop.
        max_drop: Remove as much weight as possible with a predicted drop of at most this.

    Returns:
        Layer → ratio.

    Raises:
        ValueError: Neither or both budgets given, or a budget that cannot be met (the
            message states the closest reachable value).
    """
    if (target_sparsity is None) == (max_drop is None):
        raise ValueError("target_sparsity / max_drop: give exactly one of the two budgets.")
    options = {n: _options(curves, n) for n in curves.xs}
    if target_sparsity is not None:
        t = _check_fraction(target_sparsity, "target_sparsity")
        return _min_drop_for(options, weights, t)
    m = _check_fraction(max_drop, "max_drop", upper_open=False)
    return _max_removed_within(options, weights, m)


def _min_drop_for(
    options: dict[str, list[tuple[float, float]]], weights: Mapping[str, int], t: float
) -> dict[str, float]:
    total = sum(weights.values())
    best = {n: max(r for r, _ in opts) for n, opts in options.items()}
    reachable = sum(best[n] * weights[n] for n in options) / total
    if t > reachable + 1e-12:
        raise ValueError(
            f"target_sparsity: {t:.1%} cannot be reached from this sweep: pruning every layer at "
            f"its largest evaluated ratio removes {reachable:.1%}. Closest reachable: "
            f"target_sparsity={math.floor(reachable * 1000) / 1000}; or sweep larger ratios."
        )
    unit = total / _BINS
    goal = math.ceil(t * total / unit - 1e-9)
    # dp[v] = smallest summed drop that removes exactly v bins (weights rounded down, so
    # the real removal is never less than the bins say).
    dp = np.full(_BINS + 1, np.inf)
    dp[0] = 0.0
    picks = []
    for name, opts in options.items():
        costs = [int(r * weights[name] / unit) for r, _ in opts]
        dp, arg = _step(dp, [(c, d) for c, (_, d) in zip(costs, opts, strict=True)], minimise=True)
        picks.append((name, arg, costs))
    feasible = np.arange(_BINS + 1) >= goal
    if not np.isfinite(dp[feasible]).any():
        return best  # only the rounding stood in the way: the largest ratios meet the target
    # Smallest drop; among equal drops the least removal (closest to the target).
    end = int(np.argmin(np.where(feasible, dp, np.inf)))
    return _backtrack(options, picks, end)


def _step(
    dp: np.ndarray, choices: list[tuple[int, float]], *, minimise: bool
) -> tuple[np.ndarray, np.ndarray]:
    """One layer of the knapsack: best over choices of ``dp[v - cost] + value``."""
    size = len(dp)
    worst = np.inf if minimise else -np.inf
    new = np.full(size, worst)
    arg = np.zeros(size, dtype=np.int64)
    for k, (cost, value) in enumerate(choices):
        if cost > size - 1:
            continue
        cand = np.full(size, worst)
        cand[cost:] = dp[: size - cost] + value
        better = cand < new - 1e-12 if minimise else cand > new + 1e-9
        new[better], arg[better] = cand[better], k
    return new, arg


def _backtrack(options, picks, end: int) -> dict[str, float]:
    """Follow the stored choices from the last layer back to the first."""
    chosen: dict[str, float] = {}
    pos = end
    for name, arg, costs in reversed(picks):
        k = int(arg[pos])
        chosen[name] = options[name][k][0]
        pos -= costs[k]
    return {n: chosen[n] for n in options}


def _max_removed_within(
    options: dict[str, list[tuple[float, float]]], weights: Mapping[str, int], m: float
) -> dict[str, float]:
    free = {n: max(r for r, d in opts if d <= 0.0) for n, opts in options.items()}
    steps = [d for opts in options.values() for _, d in opts[1:]]  # beyond each start
    cheapest = min(steps, default=math.inf)
    if m == 0 or all(d > m for d in steps):
        if any(free[n] > options[n][0][0] for n in options):
            return free
        raise ValueError(
            f"max_drop: {m:.4g} allows no pruning: the cheapest evaluated step is predicted to "
            f"cost {cheapest:.4g}. Closest reachable: max_drop={cheapest:.4g}."
        )
    unit = m / _BINS
    # dp[b] = most weight removed with a summed drop of exactly b bins (drops rounded up,
    # so the real predicted drop never exceeds the budget).
    dp = np.full(_BINS + 1, -np.inf)
    dp[0] = 0.0
    picks = []
    for name, opts in options.items():
        costs = [math.ceil(d / unit - 1e-9) for _, d in opts]
        dp, arg = _step(
            dp,
            [(c, r * weights[name]) for c, (r, _) in zip(costs, opts, strict=True)],
            minimise=False,
        )
        picks.append((name, arg, costs))
    end = int(np.argmax(dp))  # first maximum: the least drop among equally large removals
    return _backtrack(options, picks, end)


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
        return (
            f"Applied suggestion for {self.suggestion.target} ("
            f"{fmt_pct(self.suggestion.sparsity)} of the analysed weights zero): "
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
    # Imported here: those modules build on this one.
    from nbcompress.engine.core.history import transaction
    from nbcompress.engine.prune.prune import prune_
    from nbcompress.engine.sensitivity.result import latest_suggestion

    check_module(model)
    suggestion = suggestion if suggestion is not None else latest_suggestion(model)
    if suggestion is None:
        raise ValueError(
            "suggestion: none recorded for this model. Run a sweep and ask for one first, "
            "e.g. `r = nbcompress.sensitivity(model, evaluate); r.suggest(0.8)` or "
            "`%sensitivity model --eval evaluate --target-sparsity 0.8`."
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
    measure, notes = _measurer(model, suggestion, evaluate, example_inputs)
    detail = f"suggested per-layer ratios ({suggestion.target}) on {len(ratios)} layer(s)"
    with transaction(model, "prune", detail) as tx:
        prune_(
            model, ratios, layers=list(ratios), types={type(modules[n]) for n in ratios},
            include_output=True, granularity=suggestion.granularity,
        )  # fmt: skip
        measured = measure() if measure else None  # an error here rolls the pruning back
        tx.step.detail = detail + f", sparsity {fmt_pct(suggestion.sparsity)}"
        tx.info.update(suggestion=suggestion.target, measured=measured)
    notes.append("Undo with nbcompress.undo_(model) or %undo model.")
    return ApplyReport(
        suggestion, suggestion.predicted, measured, suggestion.baseline, suggestion.metric,
        proxy=suggestion.proxy, notes=notes,
    )  # fmt: skip


def _measurer(
    model: nn.Module, suggestion: Suggestion, evaluate: Any, example_inputs: Any
) -> tuple[Callable[[], float] | None, list[str]]:
    """How to measure after applying: explicit evaluate, else the sweep's own metric."""
    from nbcompress.engine.sensitivity.result import remembered
    from nbcompress.engine.sensitivity.sweep import measurer

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
