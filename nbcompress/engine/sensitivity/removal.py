"""Physical removal as the sensitivity subsystem uses it: one call into the structural engine.

Sweeps, checks and applied suggestions of a group sweep all remove channels the same way,
through :func:`remove_groups`, so a point measured is exactly what applying keeps. The
structural engine (Torch-Pruning underneath) is imported on first use only. This module
imports nothing from the subsystem, so the sweep, the check and the suggestion can all
use it without a cycle.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["model_macs", "remove_groups"]


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
    from nbcompress.engine.core.costs import macs
    from nbcompress.engine.core.layers import weighted_layers
    from nbcompress.engine.core.summary import capture_calls

    layers = weighted_layers(model)
    calls = capture_calls(model, layers, inputs)
    return sum(macs(layers[n], c[0], c[2]) or 0 for n, c in calls.items())
