"""Measuring one allocation of a model's layers inside a trial: prune, evaluate, restore.

One piece of code for every place a sensitivity procedure measures ratios: the sweep's
points (one layer at a time), the measured refinement's allocations, and the same two on
an executor's workers, where each worker runs it on its own copy of the model
(:mod:`.remote`). The layers are pruned as the procedure asks (L1 by default, Wanda on
statistics collected once, or re-fitted), ``evaluate`` is called with one clear error,
and the layers are restored bit-exactly (checked by checksum) before the value returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from nbcompress.engine.prune.prune import prune_ratios_
from nbcompress.engine.sensitivity.entries import prune_in_trial
from nbcompress.engine.sensitivity.evaluate import Proxy, call_evaluate
from nbcompress.engine.sensitivity.guard import layer_trial
from nbcompress.engine.sensitivity.ladder import Ladder

__all__ = ["Measure"]


@dataclass
class Measure:
    """How a procedure measures an allocation: the model, its layers, pruning and metric.

    Attributes:
        model: The model (on a worker: that worker's copy).
        layers: Qualified name → layer, the procedure's selection.
        granularity: ``"element"``, ``"block"`` or ``"channel"``.
        evaluate: ``evaluate(model) -> float``, or the sweep's :class:`~.proxy.Proxy`.
        pruning: Keyword arguments of the trial's pruning, from
            :func:`~nbcompress.engine.sensitivity.entries.trial_pruning` (empty: L1).
        where: What the model is at a call, for errors (``{layer}``/``{ratio}`` are
            filled in for one-layer allocations).
        sorted_l1: Prune one-layer L1 allocations through a :class:`~.ladder.Ladder`
            (the sweep: one sort per layer for all its ratios).
    """

    model: nn.Module
    layers: dict[str, nn.Module]
    granularity: str
    evaluate: Callable[[nn.Module], Any] | Proxy
    pruning: dict[str, Any] = field(default_factory=dict)
    where: str = "with layer {layer} pruned at {ratio:g}"
    sorted_l1: bool = False
    ladder: Ladder | None = field(default=None, repr=False)

    def __call__(self, ratios: dict[str, float], trained: set[str] | None = None) -> float:
        """The metric with ``ratios`` (layer → fraction) pruned; the layers restored on exit.

        Args:
            ratios: Layers to prune and their fractions (others stay as they are).
            trained: If given, names of parameters ``evaluate`` trained are added.
        """
        g = self.granularity
        with layer_trial(self.model, {n: self.layers[n] for n in ratios}) as trial:
            if ratios and self.pruning.get("reconstruct"):
                # Re-fitting needs the layers' inputs: prune_ratios_ measures them (in the trial).
                prune_ratios_(self.model, ratios, granularity=g, **self.pruning)
            elif self.sorted_l1 and not self.pruning and len(ratios) == 1:
                ((name, ratio),) = ratios.items()
                self._ladder(name).prune(trial, name, ratio)
            elif ratios:
                prune_in_trial(self.model, trial, ratios, g, **self.pruning)
            if isinstance(self.evaluate, Proxy) and len(ratios) == 1:
                return self.evaluate.at_layer(self.model, next(iter(ratios)))
            return call_evaluate(self.evaluate, self.model, self._where(ratios), trained)

    def forget(self) -> None:
        """Drop the sorted orders kept for one layer's ratios (its sweep is over)."""
        if self.ladder is not None:
            self.ladder.forget()

    def _ladder(self, name: str) -> Ladder:
        if self.ladder is None:
            self.ladder = Ladder(self.model, self.granularity)
        elif name not in self.ladder.orders:
            self.ladder.forget()  # another layer: its order replaces the last one's
        return self.ladder

    def _where(self, ratios: dict[str, float]) -> str:
        if len(ratios) != 1:
            return self.where
        ((layer, ratio),) = ratios.items()
        return self.where.format(layer=layer, ratio=ratio)
