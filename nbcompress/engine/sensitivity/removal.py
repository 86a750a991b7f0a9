"""Physical removal as the sensitivity subsystem uses it: one call into the structural engine.

Sweeps, checks and applied suggestions of a group sweep all remove channels the same way,
through :func:`remove_groups`, so a point measured is exactly what applying keeps. The
structural engine (Torch-Pruning underneath) is imported on first use only. This module
imports nothing from the subsystem, so the sweep, the check and the suggestion can all
use it without a cycle.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["model_macs", "remove_groups", "whole_group_cost"]


def remove_groups(
    model: nn.Module, ratios: dict[str, float], example_inputs: Any, method: str = "l1"
) -> None:
    """Remove channels of coupled groups in place, ``{root layer: fraction}``.

    Run it inside an open :func:`~nbcompress.engine.core.history.trial` (the removal joins
    it and is rolled back with it) or transaction (it joins the step).

    Args:
        model: The model.
        ratios: Root layer name → fraction of its group's channels to remove (groups not
            named keep theirs).
        example_inputs: The input the coupled groups are traced on.
        method: Channel importance, as ``remove_(importance=)`` takes it.
    """
    # Imported here: the structural engine loads Torch-Pruning, which only removal needs.
    from nbcompress.engine.structural.remove import remove_

    remove_(model, ratios, example_inputs=example_inputs, importance=method)


def model_macs(model: nn.Module, inputs: tuple) -> int:
    """Estimated MACs of one forward pass of ``model`` on ``inputs`` (its weighted layers)."""
    return sum(_layer_macs(model, inputs).values())


def _layer_macs(model: nn.Module, inputs: tuple) -> dict[str, int]:
    """Estimated MACs of each weighted layer of ``model`` in one forward pass on ``inputs``."""
    from nbcompress.engine.core.costs import macs
    from nbcompress.engine.core.layers import weighted_layers
    from nbcompress.engine.core.summary import capture_calls

    layers = weighted_layers(model)
    calls = capture_calls(model, layers, inputs)
    return {n: macs(layers[n], c[0], c[2]) or 0 for n, c in calls.items()}


def whole_group_cost(
    model: nn.Module, inputs: tuple, remove: Callable[[], None], width: int, count: int
) -> tuple[int, int]:
    """Params and MACs removing a whole group would take, from removing ``count`` of its channels.

    ``remove()`` removes ``count`` of the group's ``width`` channels in place (run this in a
    trial). Each tensor dimension that shrank is extrapolated to the whole group (it shrinks
    ``width / count`` times as much, down to zero at most) and the tensor's size is the
    product of its dimensions, so a layer whose inputs and outputs are both in the group
    counts quadratically, as removal shrinks it, and a group never takes more than the
    model has. A layer's MACs shrink as its largest parameter (a conv's or linear's weight,
    a norm's scale) does: its output positions do not change.

    Returns:
        ``(params, macs)`` removed with the whole group, never more than the model's.
    """
    before = {n: tuple(p.shape) for n, p in model.named_parameters()}
    layers = dict(model.named_modules())
    layer_macs = _layer_macs(model, inputs)
    remove()
    after = {n: tuple(p.shape) for n, p in model.named_parameters()}
    left = {n: _extrapolated(shape, after.get(n), width / count) for n, shape in before.items()}
    params = sum(math.prod(shape) - left[n] for n, shape in before.items())
    removed_macs = 0.0
    for name, value in layer_macs.items():
        own = [(math.prod(before[q]), q) for q, _ in layers[name].named_parameters(prefix=name)
               if q in before]  # fmt: skip
        size, largest = max(own, default=(0, ""))
        if size:
            removed_macs += value * (1 - left[largest] / size)
    return params, round(removed_macs)


def _extrapolated(shape: tuple[int, ...], shrunk: tuple[int, ...] | None, scale: float) -> int:
    """Elements left of a tensor of ``shape`` if each cut of its dimensions grew ``scale``-fold."""
    if shrunk is None or len(shrunk) != len(shape):
        return 0  # the parameter went away (or changed rank): all of it counts as removed
    left = [max(0, n - round((n - m) * scale)) for n, m in zip(shape, shrunk, strict=True)]
    return math.prod(left)
