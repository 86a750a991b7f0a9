"""Per-layer pruning ratios from sensitivity curves: prediction and budgeted choice.

The prediction model is the usual one of sensitivity analysis (Distiller, NNI): pruning
several layers costs the sum of what pruning each one alone cost. Each layer's drop curve
is made monotone (pruning more never helps) and clipped at zero, so that evaluation noise
does not show up as free gains. Choosing one ratio per layer under a budget is then a
multiple-choice knapsack, solved exactly on a discretised budget by dynamic programming
(:func:`choose`). :mod:`~nbcompress.engine.sensitivity.advice` turns a sweep's curves into
a checked suggestion with it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Curves", "choose", "drop_curves", "layer_drop"]

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
        if t == 0:
            raise ValueError(
                "target_sparsity: 0 prunes nothing; give a fraction in (0, 1) such as 0.8."
            )
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
