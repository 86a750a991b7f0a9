"""The first trials of a search: allocations known to be good, measured before sampling.

With a target, every warm-start allocation is given as scores (``keep = 1 - ratio``), whose
projection onto the budget is the allocation itself when it meets the target exactly
(``c = 1``), and its nearest feasible neighbour otherwise — so the sampler learns from
them like from its own proposals.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from nbcompress.engine.search.space import MIN_KEEP, Space

__all__ = ["warm_allocations"]


def _suggestion(sensitivity: Any, space: Space, target: float) -> dict[str, float] | None:
    """The sensitivity suggestion at ``target`` over the searched layers, or None."""
    if sensitivity is None or not set(space.names) & set(sensitivity.layers):
        return None
    try:
        # check=False: the curves' allocation only; the search measures it as a trial.
        made = sensitivity.suggest(target_sparsity=target, check=False)
    except ValueError:  # a sweep that cannot reach the target (e.g. a coarse grid)
        return None
    return {n: made.ratios.get(n, target) for n in space.names}


def warm_allocations(
    model: nn.Module, space: Space, target: float, sensitivity: Any = None
) -> list[tuple[str, dict[str, float]]]:
    """Uniform, global L1 and (given a sweep) the sensitivity suggestion, as scores.

    Args:
        model: The model as searched (its weights give the global-L1 threshold).
        space: The searched layers.
        target: The budget's overall sparsity.
        sensitivity: A :class:`~nbcompress.engine.sensitivity.result.SensitivityResult`
            of the model, or ``None``.

    Returns:
        ``(label, scores)`` pairs in the order they are enqueued.
    """
    found = [
        ("uniform", dict.fromkeys(space.names, 1.0 - target)),
        ("global L1", dict(zip(space.names, space.global_l1(model, target)))),
    ]
    suggested = _suggestion(sensitivity, space, target)
    if suggested is not None:
        found.append(("sensitivity suggestion", suggested))
    return [
        (label, {n: max(1.0 - r, MIN_KEEP) for n, r in ratios.items()}) for label, ratios in found
    ]
