"""Checking a group sweep's suggestion by measurement: the curves' choice vs uniform removal.

A per-layer sweep's suggestion is checked against uniform and global L1 at the same
sparsity (:mod:`.advice`). For a sweep over coupled channel groups the natural baseline is
*uniform removal*: every group loses the same share of its channels, which is what
``remove_(model, amount)`` (``%prune model 0.3 --remove``) does. Global L1 is left out:
group scores are sums over differently sized groups, not comparable across them, so a
global ranking would be a different method rather than a baseline. Both candidates are
measured by removing their channels inside a trial (rolled back, checked by checksum), and
the better measured one is kept. The measured refinement (``refine=N``) moves sparsity
between single layers and is not available for removal.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from nbcompress.engine.core.history import trial
from nbcompress.engine.sensitivity.evaluate import call_evaluate, measuring
from nbcompress.engine.sensitivity.guard import Fingerprint, verified
from nbcompress.engine.sensitivity.registry import remembered
from nbcompress.engine.sensitivity.removal import remove_groups

if TYPE_CHECKING:
    from nbcompress.engine.sensitivity.result import SensitivityResult

__all__ = ["GroupCheck", "check_groups", "group_inputs", "measured_removal"]


@dataclass
class GroupCheck:
    """The measured check of a group suggestion.

    Attributes:
        ratios: The ratios kept (the better measured candidate).
        measured: Its measured metric.
        chosen: ``"curve suggestion"`` or ``"uniform removal"``.
        notes: The check's line: each candidate's metric and the margin.
        evaluations: Evaluations run.
        seconds: Their wall-clock time.
    """

    ratios: dict[str, float]
    measured: float
    chosen: str
    notes: list[str]
    evaluations: int
    seconds: float


def group_inputs(model: nn.Module, example_inputs: Any = None) -> Any:
    """The input removal traces on: the one given, else the group sweep's (if alive).

    Raises:
        ValueError: Neither is at hand (one line naming ``example_inputs``).
    """
    if example_inputs is None:
        example_inputs = remembered(model)[1]
    if example_inputs is None:
        raise ValueError(
            "example_inputs: removing channels traces the model on an example input; pass "
            "example_inputs=x (--input x)."
        )
    return example_inputs


def check_groups(
    result: SensitivityResult,
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    ratios: dict[str, float],
    refine: int,
) -> GroupCheck:
    """Measure the curves' ratios and uniform removal at the same share; keep the better.

    Args:
        result: The group sweep (``result.remove``).
        model: The model to measure on (unchanged afterwards).
        evaluate: ``evaluate(model) -> float``, in the sweep's direction.
        ratios: The curves' choice, root layer → fraction.
        refine: Evaluations of a measured refinement; only ``0`` is accepted here.

    Raises:
        ValueError: ``refine`` > 0, or no example input to trace on.
    """
    if refine:
        raise ValueError(
            "refine: the measured refinement moves sparsity between single layers and is not "
            "available for a group sweep (remove=True); the suggestion is checked against "
            "uniform removal instead. Drop refine."
        )
    x = group_inputs(model)
    share = result.sparsity_of(ratios)
    candidates = {"curve suggestion": ratios, "uniform removal": dict.fromkeys(ratios, share)}
    start, measured = time.perf_counter(), {}
    with verified(model, Fingerprint.of(model), "suggest"), measuring(model):
        for name, setting in candidates.items():
            with trial(model):
                kept = {n: r for n, r in setting.items() if r > 0}
                if kept:
                    remove_groups(model, kept, x, result.method)
                measured[name] = call_evaluate(evaluate, model, f"with the {name} removed")
    sign = 1.0 if result.higher_is_better else -1.0
    best = max(measured, key=lambda k: sign * measured[k])
    other = next(k for k in measured if k != best)
    margin = sign * (measured[best] - measured[other])
    shown = ", ".join(f"{k} {v:.4g}" for k, v in measured.items())
    line = (
        f"Measured {result.metric} with channels removed at the same share ({share:.0%} of "
        f"the swept groups' parameters): {shown} → {best} ({margin:+.4g} over {other}). "
        "Uniform removal is the baseline of a group sweep; global L1 is not (group scores "
        "are not comparable across groups)."
    )
    return GroupCheck(
        candidates[best], measured[best], best, [line], len(measured), time.perf_counter() - start
    )


def measured_removal(
    result: SensitivityResult, model: nn.Module | None, ratios: dict[str, float]
) -> tuple[int, str] | None:
    """Parameters the model really loses with ``ratios`` removed, and a note saying so.

    A group's size counts every layer it touches, and a layer between two groups counts in
    both, so the suggestion's share of the groups' parameters is not the model's: this
    removes the setting in a trial (rolled back) and counts. ``None`` when there is no
    live model or input to do it on.
    """
    kept = {n: r for n, r in ratios.items() if r > 0}
    x = None if model is None else remembered(model)[1]
    if not kept or x is None:
        return None
    before = sum(p.numel() for p in model.parameters())
    with trial(model):
        remove_groups(model, kept, x, result.method)
        after = sum(p.numel() for p in model.parameters())
    removed = before - after
    return removed, (
        f"Applying removes {removed:,} of the model's {before:,} parameters "
        f"({removed / before:.0%}, measured by removing the channels in a trial and rolling "
        "back): a layer between two groups loses both inputs and outputs."
    )
