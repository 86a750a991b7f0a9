"""What a setting of per-layer ratios would do to the model: footprint and proxy metric.

A *setting* is one pruning ratio per explored layer; the explorer widget shows these figures
for its sliders, and applying a setting is :func:`~nbcompress.engine.prune.prune.prune_ratios_`.
The cost figures come from really pruning each layer inside
:func:`~nbcompress.engine.core.history.trial` (always rolled back) and measuring it with
:func:`~nbcompress.engine.core.costs.layer_bytes`, so the readouts use exactly the engine's
pruning rule (existing zeros count, channel granularity zeroes biases). Layer
pruning is independent per layer, so results are cached per ``(layer, ratio)`` and a slider
move only re-measures the layer that moved.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nbcompress.engine.core.costs import layer_bytes
from nbcompress.engine.core.history import history, trial
from nbcompress.engine.core.layers import MULTI_WEIGHT_TYPES
from nbcompress.engine.prune.prune import prune_ratios_
from nbcompress.engine.sensitivity.evaluate import measurer

__all__ = [
    "Footprint",
    "SettingCosts",
    "layer_footprint",
    "model_footprint",
    "proxy_metric",
]


@dataclass(frozen=True)
class Footprint:
    """Parameter counts and estimated storage of a model (or of one layer).

    Attributes:
        nonzero: Parameters that are not zero.
        total: All parameters.
        dense: Bytes stored dense as fp32 (estimate).
        csr: Bytes with weight matrices stored as CSR (estimate, see ``layer_bytes``).
    """

    nonzero: int
    total: int
    dense: int
    csr: int

    def __add__(self, other: Footprint) -> Footprint:
        return Footprint(
            self.nonzero + other.nonzero,
            self.total + other.total,
            self.dense + other.dense,
            self.csr + other.csr,
        )

    def __sub__(self, other: Footprint) -> Footprint:
        return Footprint(
            self.nonzero - other.nonzero,
            self.total - other.total,
            self.dense - other.dense,
            self.csr - other.csr,
        )

    @property
    def sparsity(self) -> float:
        """Fraction of parameters that are zero."""
        return 1.0 - self.nonzero / self.total if self.total else 0.0


_EMPTY = Footprint(0, 0, 0, 0)


def _own_footprint(module: nn.Module) -> Footprint:
    """Footprint of the parameters ``module`` holds directly (not its children's)."""
    params = list(module.parameters(recurse=False))
    if not params:
        return _EMPTY
    size = layer_bytes(module)
    nonzero = sum(int(torch.count_nonzero(p.detach())) for p in params)
    return Footprint(nonzero, sum(p.numel() for p in params), size["dense"], size["csr"])


def layer_footprint(module: nn.Module) -> Footprint:
    """Footprint of one layer as pruning sees it.

    A MultiheadAttention's ``out_proj`` is a child module whose weight the attention reads
    directly; it is pruned with the layer, so it counts with it.
    """
    if not isinstance(module, MULTI_WEIGHT_TYPES):
        return _own_footprint(module)
    total = _EMPTY
    for sub in module.modules():
        total = total + _own_footprint(sub)
    return total


def model_footprint(model: nn.Module) -> Footprint:
    """Footprint of the whole model as it is now.

    Args:
        model: Any module.

    Returns:
        Sums over every module's own parameters, so each parameter counts once.
    """
    total = _EMPTY
    for module in model.modules():
        total = total + _own_footprint(module)
    return total


class SettingCosts:
    """Footprint of ``model`` if a setting were applied, exact and cached per layer.

    Args:
        model: The live model (never changed: every measurement runs in a trial).
        granularity: Pruning granularity of the sweep.
    """

    def __init__(self, model: nn.Module, granularity: str = "element") -> None:
        self.model = model
        self.granularity = granularity
        self._version: tuple | None = None
        self._now = _EMPTY
        self._layer_now: dict[str, Footprint] = {}
        self._cache: dict[tuple[str, float], Footprint] = {}

    def _refresh(self) -> None:
        # Any recorded step (Apply, Undo, %prune in another cell) changes the history;
        # identity plus creation time makes the key, so undo + a new step is not "same".
        version = tuple((id(step), step.created) for step in history(self.model))
        if version == self._version:
            return
        self._version = version
        self._now = model_footprint(self.model)
        self._layer_now = {}
        self._cache = {}

    def now(self) -> Footprint:
        """Footprint of the model as it is now."""
        self._refresh()
        return self._now

    def layer(self, name: str, ratio: float) -> Footprint:
        """Footprint of layer ``name`` alone after pruning it to ``ratio``."""
        self._refresh()
        if name not in self._layer_now:
            self._layer_now[name] = layer_footprint(self.model.get_submodule(name))
        key = (name, round(float(ratio), 6))
        if key not in self._cache:
            if key[1] <= 0:
                self._cache[key] = self._layer_now[name]
            else:
                with trial(self.model):
                    prune_ratios_(self.model, {name: key[1]}, granularity=self.granularity)
                    self._cache[key] = layer_footprint(self.model.get_submodule(name))
        return self._cache[key]

    def setting(self, ratios: Mapping[str, float]) -> Footprint:
        """Footprint of the whole model if ``ratios`` were applied now."""
        total = self.now()
        for name, ratio in ratios.items():
            after = self.layer(name, ratio)
            total = total - self._layer_now[name] + after
        return total


def proxy_metric(model: nn.Module, example_inputs: Any) -> Callable[[nn.Module], float]:
    """The engine's data-free proxy as an ``evaluate(model)`` function.

    Its reference output is taken now, so later measurements compare against the model
    as it is at this moment (the setting the sliders start from). The function measures
    that same model object only.
    """
    measure = measurer(model, None, example_inputs, proxy=True)

    def evaluate(m: nn.Module) -> float:
        if m is not model:
            raise ValueError("model: this proxy measures the model it was made for only.")
        return measure()

    return evaluate
