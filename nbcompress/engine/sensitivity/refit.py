"""The suggestion check's re-fitted candidates: least squares on the evaluation's own inputs.

Pruning without fine-tuning loses most where the kept weights no longer add up to what the
layer computed. Re-fitting them by least squares on real inputs (``reconstruct=True`` of
:func:`~nbcompress.prune_ratios_`, the SparseGPT/OBS idea) recovers much of it without
labels or gradients. The sweep records the batches its ``evaluate`` fed the model; when the
re-fit is cheap on this model (:func:`refit_cost`), the check measures each candidate
allocation re-fitted as well, and keeps a re-fitted one only if it measures better.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from nbcompress.engine.core.history import trial
from nbcompress.engine.prune.prune import prune_ratios_
from nbcompress.engine.sensitivity.evaluate import call_evaluate, measuring

__all__ = ["MAX_REFIT_FLOPS", "Refit", "refit_candidates", "refit_cost"]

#: Solve work (multiply-adds) above which the check does not try re-fitted candidates on
#: its own: a few seconds per candidate on two cores. ``reconstruct=True`` forces it.
MAX_REFIT_FLOPS = 3e10


@dataclass(frozen=True)
class Refit:
    """The best re-fitted candidate measured.

    Attributes:
        name: The candidate it re-fits (e.g. ``"uniform L1"``).
        ratios: Its per-layer ratios.
        measured: The metric with those ratios and re-fitted weights.
        all: Candidate name → measured metric, for the report.
        evaluations: Evaluations run (candidates with the same ratios are measured once).
        seconds: Wall-clock time of the re-fits and evaluations.
    """

    name: str
    ratios: dict[str, float]
    measured: float
    all: dict[str, float]
    evaluations: int
    seconds: float


def refit_cost(model: nn.Module, ratios: Mapping[str, float]) -> float:
    """Multiply-adds of the least-squares solves re-fitting ``ratios`` (rows × kept³ / 3)."""
    total = 0.0
    for name, ratio in ratios.items():
        layer = model.get_submodule(name)
        if isinstance(layer, nn.Linear):
            rows, width = layer.out_features, layer.in_features
        elif isinstance(layer, (nn.Conv1d, nn.Conv2d)):
            rows = layer.out_channels
            width = layer.in_channels // layer.groups * math.prod(layer.kernel_size)
        else:
            continue
        total += rows * ((1 - ratio) * width) ** 3 / 3
    return total


def refit_candidates(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    candidates: Mapping[str, Mapping[str, float]],
    *,
    granularity: str,
    calibration: Any,
    higher_is_better: bool,
    method: str = "l1",
) -> Refit:
    """Measure each candidate pruned and re-fitted; the model is rolled back after each.

    Args:
        model: The model (unchanged afterwards).
        evaluate: ``evaluate(model) -> float``.
        candidates: Name → per-layer ratios.
        granularity: Pruning granularity of the sweep.
        calibration: Inputs for the re-fit (as ``prune_ratios_`` takes ``example_inputs``).
        higher_is_better: Direction of the metric.
        method: How the masks are chosen (the sweep's method).

    Returns:
        The best re-fitted candidate (first on ties) and every measurement.
    """
    sign = 1.0 if higher_is_better else -1.0
    measured: dict[str, float] = {}
    seen: dict[tuple, float] = {}
    start = time.perf_counter()
    with measuring(model):
        for name, ratios in candidates.items():
            nonzero = {n: r for n, r in ratios.items() if r > 0}
            key = tuple(sorted((n, round(r, 9)) for n, r in nonzero.items()))
            if key in seen:  # e.g. uniform and global L1 agree: one re-fit, one evaluation
                measured[name] = seen[key]
                continue
            with trial(model):
                prune_ratios_(
                    model, nonzero, granularity=granularity, example_inputs=calibration,
                    reconstruct=True, method=method,
                )  # fmt: skip
                value = call_evaluate(evaluate, model, f"with {name} re-fitted")
            measured[name] = seen[key] = -math.inf * sign if math.isnan(value) else value
    best = max(measured, key=lambda n: sign * measured[n])
    seconds = time.perf_counter() - start
    return Refit(best, dict(candidates[best]), measured[best], measured, len(seen), seconds)
