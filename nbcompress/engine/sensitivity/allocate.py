"""Per-layer pruning ratios from sensitivity curves: prediction and budgeted choice.

The prediction model is the usual one of sensitivity analysis (Distiller, NNI): pruning
several layers costs the sum of what pruning each one alone cost. Each layer's drop curve
is made monotone (pruning more never helps) and clipped at zero, so that evaluation noise
does not show up as free gains. Choosing one ratio per layer under a budget is then a
multiple-choice knapsack, solved exactly on a discretised budget by dynamic programming
(:func:`choose`); :func:`suggest` turns a sweep's curves into a :class:`Suggestion`,
refined by measurement on request (:func:`~nbcompress.engine.sensitivity.refine.refine`).

:class:`~nbcompress.engine.sensitivity.result.SensitivityResult` calls this module; this
module only reads the result it is given, so it never imports the result's module.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from nbcompress.engine.sensitivity.refine import Refinement, check_budget
from nbcompress.engine.sensitivity.refine import refine as refine_allocation
from nbcompress.engine.sensitivity.registry import remember
from nbcompress.engine.sensitivity.suggestion import Suggestion

if TYPE_CHECKING:
    from nbcompress.engine.sensitivity.result import SensitivityResult

__all__ = [
    "Curves",
    "choose",
    "drop_curves",
    "layer_drop",
    "objective_weights",
    "suggest",
]

#: Budget resolution of the dynamic programme (bins over the whole budget).
_BINS = 2000


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


# --- a suggestion from a sweep -----------------------------------------------------------


def objective_weights(result: SensitivityResult, objective: str) -> dict[str, int]:
    """Layer → what one unit of its ratio removes: parameters or (estimated) MACs."""
    if objective == "params":
        return {n: result.sizes[n] for n in result.layers}
    if objective == "macs":
        missing = [n for n in result.layers if result.macs.get(n) is None]
        if missing:
            raise ValueError(
                f"objective: MACs are unknown for {', '.join(missing)}; rerun the sweep "
                "with example_inputs (--input) or use objective='params'."
            )
        return {n: int(result.macs[n]) for n in result.layers}
    raise ValueError(f"objective: {objective!r} is unknown; choose 'params' or 'macs'.")


def suggest(
    result: SensitivityResult,
    target: tuple[float | None, float | None],
    objective: str,
    **refinement: Any,
) -> Suggestion:
    """Per-layer ratios for a budget from a sweep's curves (``SensitivityResult.suggest``).

    Args:
        result: The sweep.
        target: ``(target_sparsity, max_drop)``, exactly one of them given: remove at least
            that fraction of the analysed weights (MACs), or as much as possible within
            that predicted drop.
        objective: ``"params"`` or ``"macs"``.
        **refinement: ``evaluate`` (``evaluate(model) -> float``) and ``refine`` (number of
            evaluations of a measured refinement), as ``SensitivityResult.suggest`` takes
            them, including the deprecated ``refine=evaluate`` and ``budget=N``.

    Returns:
        The suggestion, remembered as the model's latest when the result has a live model.
    """
    target_sparsity, max_drop = target
    evaluate, refine = _renamed(**refinement)
    weights = objective_weights(result, objective)
    model = result.model
    if refine is not None or evaluate is not None:
        _check_refine(model, target_sparsity, objective, evaluate, refine)
    ratios = choose(
        result.drop_curves(), weights, target_sparsity=target_sparsity, max_drop=max_drop
    )
    refinement = None
    if refine is not None:
        refinement = _refined(result, model, evaluate, target_sparsity, ratios, refine)
        ratios = refinement.ratios
    target = f"sparsity {target_sparsity:.0%}" if max_drop is None else f"max drop {max_drop:g}"
    if objective == "macs" and max_drop is None:
        target = f"MAC reduction {target_sparsity:.0%}"
    made = Suggestion(
        ratios=ratios, predicted=result.predict(ratios), sparsity=result.sparsity_of(ratios),
        removed=int(round(sum(r * weights[n] for n, r in ratios.items()))),
        objective=objective, target=target, metric=result.metric, baseline=result.baseline,
        granularity=result.granularity, proxy=result.proxy,
        measured=refinement.measured if refinement else None, refinement=refinement,
    )  # fmt: skip
    if model is not None:
        remember(model, suggestion=made)
    return made


def _renamed(evaluate: Any, refine: Any, budget: Any) -> tuple[Any, int | None]:
    """Accept the old spelling ``refine=evaluate, budget=N`` for one release, with a warning."""
    if callable(refine):
        warnings.warn(
            "suggest(refine=evaluate) is deprecated: pass the function as evaluate=... and "
            "the number of evaluations as refine=N, e.g. suggest(0.8, evaluate=fn, refine=100).",
            DeprecationWarning,
            stacklevel=4,
        )
        if evaluate is not None:
            raise ValueError("refine: give the function as evaluate= only, not also as refine=.")
        return refine, (100 if budget is None else check_budget(budget, "budget"))
    if budget is not None:
        warnings.warn(
            "suggest(budget=N) is deprecated: the number of evaluations is refine=N, e.g. "
            "suggest(0.8, evaluate=fn, refine=100).",
            DeprecationWarning,
            stacklevel=4,
        )
        if refine is None:
            return evaluate, check_budget(budget, "budget")
    return evaluate, (None if refine is None else check_budget(refine, "refine"))


def _check_refine(
    model: Any, target_sparsity: Any, objective: str, evaluate: Any, refine: int | None
) -> None:
    if refine is None:
        raise ValueError(
            "evaluate: suggest() uses it only to refine the suggestion by measuring; give "
            "refine=N too (evaluations, e.g. refine=100), or leave evaluate out."
        )
    if target_sparsity is None or objective != "params":
        raise ValueError(
            "refine: refines a target_sparsity suggestion over parameters; give "
            "target_sparsity=... with objective='params', or leave refine out."
        )
    if evaluate is None:
        raise ValueError("refine: measures real allocations; pass evaluate=fn (--eval fn) too.")
    if model is None:
        raise ValueError(
            "refine: this result is not attached to a live model (loaded from JSON, or the "
            "model is gone); attach it with remember(model, result) first."
        )


def _refined(
    result: SensitivityResult,
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    target: float,
    ratios: dict[str, float],
    budget: int,
) -> Refinement:
    """The curve suggestion refined by measuring on the swept model (left unchanged)."""
    return refine_allocation(
        model, evaluate, target, candidates={"curve suggestion": ratios}, budget=budget,
        layers=list(result.layers), types={type(model.get_submodule(n)) for n in result.layers},
        granularity=result.granularity, higher_is_better=result.higher_is_better,
        metric=result.metric, predict=result.predict,
    )  # fmt: skip
