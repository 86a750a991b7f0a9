"""What a group setting would do to the model: measured by removing it whole, in a trial.

Per-layer settings are additive (each layer is pruned alone, see
:class:`~nbcompress.engine.sensitivity.setting.SettingCosts`); coupled groups are not: a
layer between two groups loses inputs to one and outputs to the other. So the footprint of
a group setting is measured by removing every group of the setting at once, exactly as
applying does, inside a trial (rolled back), and cached per setting and model history.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from nbcompress.engine.core.history import history_token, trial
from nbcompress.engine.sensitivity.registry import remembered
from nbcompress.engine.sensitivity.removal import remove_groups
from nbcompress.engine.sensitivity.setting import Footprint, SettingCosts, model_footprint

__all__ = ["GroupCosts", "setting_costs"]

#: Settings whose footprint is kept (a slider moving back and forth re-uses them).
_KEPT = 64


class GroupCosts(SettingCosts):
    """Footprint of the model if a group setting were applied (channels removed).

    Args:
        model: The live model (never changed: every measurement runs in a trial).
        example_inputs: The input the groups are traced on.
        method: Channel importance, as the sweep used it.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, method: str = "l1") -> None:
        super().__init__(model, "channel")
        self.example_inputs, self.method = example_inputs, method
        self._settings: dict[tuple, Footprint] = {}

    def setting(self, ratios: Mapping[str, float]) -> Footprint:
        """Footprint of the whole model if the groups of ``ratios`` were removed now."""
        chosen = tuple(sorted((n, round(float(r), 6)) for n, r in ratios.items() if r > 0))
        if not chosen:
            return self.now()
        key = (history_token(self.model), chosen)
        if key not in self._settings:
            with trial(self.model):
                remove_groups(self.model, dict(chosen), self.example_inputs, self.method)
                self._settings[key] = model_footprint(self.model)
            while len(self._settings) > _KEPT:
                del self._settings[next(iter(self._settings))]
        return self._settings[key]


def setting_costs(result: Any, model: nn.Module, example_inputs: Any = None) -> SettingCosts:
    """The cost model of a sweep's settings: group removal for a group sweep, else per layer.

    Args:
        result: The ``SensitivityResult``.
        model: The live model.
        example_inputs: For a group sweep, the input to trace on (default: the sweep's).
    """
    if not getattr(result, "remove", False):
        return SettingCosts(model, result.granularity)
    inputs = example_inputs if example_inputs is not None else remembered(model)[1]
    return GroupCosts(model, inputs, result.method)
