"""Checks and choices behind a GradualPruner: schedule, options, per-layer shares."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nbcompress.engine.core.layers import MULTI_WEIGHT_TYPES, select_layers
from nbcompress.engine.prune.apply import live_weight
from nbcompress.engine.prune.masks import CRITERIA, GRANULARITIES
from nbcompress.engine.prune.prune import DEFAULT_TYPES, check_ratios
from nbcompress.engine.prune.targets import split_multi

__all__ = ["SCOPES", "check_options", "check_schedule", "current_weight", "layer_shares"]

SCOPES = ("layer", "global")


def check_schedule(schedule: Any) -> float:
    """The schedule's final sparsity; refuse what is not a schedule or lowers sparsity."""
    final = getattr(schedule, "final", None)
    if not callable(schedule) or not isinstance(final, float):
        raise TypeError(
            f"schedule: expected a sparsity schedule such as PolynomialDecay(0.5, 0.9, "
            f"begin_step=0, end_step=1000), got {type(schedule).__name__}."
        )
    initial = getattr(schedule, "initial_sparsity", final)
    if initial > final:
        raise ValueError(
            f"schedule: sparsity falls from {initial} to {final}, but gradual pruning only "
            "removes weights; give initial_sparsity <= final_sparsity (e.g. 0.5 -> 0.9)."
        )
    return final


def check_options(method: Any, scope: Any, granularity: Any) -> None:
    """Refuse an unknown ``method``, ``scope`` or ``granularity`` in one line naming it."""
    if not isinstance(method, str) or method not in CRITERIA:
        raise ValueError(
            f"method: {method!r} is not available for gradual pruning; choose one of "
            f"{sorted(CRITERIA)}."
        )
    if not isinstance(scope, str) or scope not in SCOPES:
        raise ValueError(f"scope: {scope!r} is unknown; choose one of {SCOPES}.")
    if not isinstance(granularity, str) or granularity not in GRANULARITIES:
        raise ValueError(f"granularity: {granularity!r} is unknown; choose one of {GRANULARITIES}.")


def _without_multi(selected: dict[str, nn.Module], explicit: bool, arg: str) -> tuple[dict, dict]:
    """``split_multi`` for a pruner, whose refusal cannot name ``keep_masks=False``."""
    try:
        return split_multi(selected, keep_masks=True, granularity="element", explicit=explicit)
    except ValueError as err:
        multi = [n for n, m in selected.items() if isinstance(m, MULTI_WEIGHT_TYPES)]
        raise ValueError(
            f"{arg}: attention/recurrent layer(s) {', '.join(map(repr, multi[:3]))} read their "
            "weights directly, so a mask kept during gradual pruning would not apply; leave "
            f"them out of {arg}= (prune them once with prune_ after training)."
        ) from err


def layer_shares(
    model: nn.Module, final: float, ratios: Any, layers: Any, include_output: bool
) -> tuple[dict[str, float], dict[str, str]]:
    """Layer → factor on the scheduled sparsity (1 without ratios, ratio / final with them).

    Returns:
        The shares, and layer name → why it is left out (attention and recurrent layers).
    """
    if ratios is None:
        selected, _ = select_layers(model, layers, DEFAULT_TYPES, include_output=include_output)
        selected, skipped = _without_multi(selected, False, "layers")
        return dict.fromkeys(selected, 1.0), skipped
    if layers is not None:
        raise ValueError("layers: ratios already name the layers; pass ratios or layers, not both.")
    found = check_ratios(model, getattr(ratios, "ratios", ratios))
    if not found:
        raise ValueError("ratios: every ratio is 0, so there is nothing to prune.")
    if final == 0:
        raise ValueError(
            "schedule: its final sparsity is 0, so per-layer ratios (each layer's sparsity = "
            "its ratio × scheduled / final) are undefined; give a final sparsity above 0."
        )
    named = {n: model.get_submodule(n) for n in found}
    _without_multi(named, True, "ratios")
    return {n: r / final for n, r in found.items()}, {}


def current_weight(owner: nn.Module, leaf: str) -> torch.Tensor:
    """The weight as the next forward pass computes it (not the one left by the last)."""
    return live_weight(owner, leaf).detach()
