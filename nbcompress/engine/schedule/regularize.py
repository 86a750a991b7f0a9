"""L1 regularisation of the weights, so that small connections can be pruned afterwards.

The seed's penalty is L1(w) = Σ|wᵢ| over the weights, scaled by a weight λ and added to
the training loss; its gradient λ·sign(w) pulls every weight towards zero at the same rate,
so the ones the data does not hold up end near zero and cost nothing to prune. Group lasso
(Σ_c ‖W_c‖₂ over output channels or neurons) pulls whole rows of a layer to zero together,
which :func:`nbcompress.remove_` can then cut out physically.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from nbcompress.engine.core.layers import prunable_weights, select_layers
from nbcompress.engine.prune.apply import live_weight
from nbcompress.engine.prune.masks import output_major

__all__ = ["L1Penalty", "l1_penalty", "schedule_value"]

#: A penalty weight: a number, or a schedule of the step (``f(step) -> float``).
Weight = float | Callable[[int], Any]


def _check_number(value: Any, arg: str, where: str = "") -> float:
    """``value`` as a finite float >= 0, else one line naming ``arg`` and the fix."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{arg}: expected a number >= 0 such as 1e-4, or a schedule f(step) -> float, got "
            f"{type(value).__name__} {value!r}{where}."
        )
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(
            f"{arg}: {value!r}{where} is not a finite number >= 0; the penalty weight must be "
            "one, e.g. 1e-4 (0 turns the penalty off)."
        )
    return value


def schedule_value(schedule: Any, step: int, arg: str) -> float:
    """The value of a number or a schedule at ``step``, checked to be a finite float >= 0.

    A schedule is any callable of the step. One that returns ``(update_now, value)``, as
    TF-MOT's pruning schedules do, gives its value.

    Args:
        schedule: A number, or a callable ``f(step)``.
        step: The optimizer step (0 before the first one).
        arg: The argument the schedule was given for, named in errors.
    """
    if not callable(schedule):
        return _check_number(schedule, arg)
    value = schedule(step)
    if isinstance(value, tuple) and value:
        value = value[-1]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return _check_number(value, arg, f" (the schedule's value at step {step})")


class L1Penalty:
    """The L1 (or group-lasso) penalty of a model's layers, resolved once, evaluated per step.

    Use it in a hand-written loop where :func:`l1_penalty` would select the layers at every
    call: ``penalty = L1Penalty(model, 1e-4)``, then ``loss = loss + penalty(step)``.

    Args:
        model: The model.
        weight: λ >= 0, or a schedule of the step (any ``f(step) -> float``, e.g. a
            :class:`~nbcompress.engine.schedule.schedules.PolynomialDecay`).
        layers: Glob pattern(s) on layer names; ``None`` = the layers ``prune_`` prunes by
            default (Linear and Conv weights, attention projections, RNN gates), with the
            output layer left alone.
        group: Group lasso over output channels/neurons (Σ_c ‖W_c‖₂) instead of Σ|wᵢ|.
        arg: The name of ``weight`` in error messages (``finetune`` passes ``"l1"``).

    Raises:
        ValueError: ``weight`` < 0 (or not finite), or a pattern matching no layer.
    """

    def __init__(
        self,
        model: nn.Module,
        weight: Weight,
        *,
        layers: str | Sequence[str] | None = None,
        group: bool = False,
        arg: str = "weight",
    ) -> None:
        if not callable(weight):
            _check_number(weight, arg)
        selected, _ = select_layers(model, layers)
        self.weight, self.group, self.arg = weight, bool(group), arg
        self.modules = [m for m in selected.values() if prunable_weights(m)]
        self.layers = [n for n, m in selected.items() if prunable_weights(m)]

    def value(self, step: int | None = None) -> float:
        """λ at ``step`` (a schedule needs the step; a number does not)."""
        if callable(self.weight) and step is None:
            raise ValueError(
                "step: the penalty weight is a schedule; pass the optimizer step, e.g. "
                "penalty(step) or l1_penalty(model, schedule, step=step)."
            )
        return schedule_value(self.weight, step or 0, self.arg)

    def __call__(self, step: int | None = None) -> torch.Tensor:
        """λ(step) · Σ|wᵢ| (or λ · Σ_c ‖W_c‖₂), a scalar tensor to add to the loss."""
        lam = self.value(step)
        terms = []
        for module in self.modules:
            for path in prunable_weights(module):  # re-read: parametrized weights
                # Not the attribute: under a kept mask it is a detached copy (no gradient).
                w = live_weight(module, path)
                if self.group:
                    # A (grouped) ConvTranspose keeps outputs along dim 1, per group.
                    rows = output_major(w, module) if w.dim() > 1 else w
                    terms.append(torch.linalg.vector_norm(rows.reshape(rows.shape[0], -1), dim=1))
                else:
                    terms.append(w.abs())
        total = sum(t.sum() for t in terms) if terms else torch.zeros(())
        return total * lam


def l1_penalty(
    model: nn.Module,
    weight: Weight,
    *,
    layers: str | Sequence[str] | None = None,
    group: bool = False,
    step: int | None = None,
) -> torch.Tensor:
    """L1 penalty λ · Σ|wᵢ| of the model's weights, to add to the training loss.

    ``loss = criterion(model(x), y) + l1_penalty(model, 1e-4)``: its gradient λ·sign(w)
    drives the weights the data does not need towards zero, so that pruning them later
    costs little. ``group=True`` gives the group lasso λ · Σ_c ‖W_c‖₂ over each layer's
    output channels (neurons), which drives whole channels to zero for physical removal
    with :func:`nbcompress.remove_`. Biases are never penalised.

    Called every step, it selects the layers each time; :class:`L1Penalty` selects them once.

    Args:
        model: The model.
        weight: λ >= 0, or a schedule of the step (``f(step) -> float``, e.g. a
            ``PolynomialDecay``); a schedule needs ``step``.
        layers: Glob pattern(s) on layer names; ``None`` = the layers ``prune_`` prunes by
            default, output layer left alone.
        group: Group lasso over output channels/neurons instead of Σ|wᵢ|.
        step: The optimizer step, for a scheduled ``weight``.

    Returns:
        A scalar tensor (differentiable with respect to the weights).

    Raises:
        ValueError: ``weight`` < 0, a pattern matching no layer, a schedule without ``step``.
    """
    return L1Penalty(model, weight, layers=layers, group=group)(step)
