"""One sort per layer for a whole sweep of L1 ratios, instead of a selection per ratio.

A sweep prunes the same layer at a dozen ratios; element L1 pruning at ratio ``r`` zeroes
the ``round(r * n)`` smallest magnitudes, ties broken by position (the first ones go), as
:func:`~nbcompress.engine.sensitivity.entries.prune_in_trial` does. Sorting the layer's
magnitudes once (stably, on their int32 bit patterns: non-negative float32 order like
their bits, NaN above inf) gives every ratio's entries as a prefix of one order, so a
trial only gathers, zeroes and later scatters back those entries. Layers that cannot be
zeroed in place this way, other granularities and layers above :data:`MAX_ELEMENTS` (the
order costs 8 bytes per weight) go through ``prune_in_trial``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nbcompress.engine.prune.apply import is_masked
from nbcompress.engine.prune.targets import Target, collect
from nbcompress.engine.sensitivity.entries import prune_in_trial
from nbcompress.engine.sensitivity.guard import LayerTrial

__all__ = ["MAX_ELEMENTS", "Ladder", "SortedEntries"]

#: Largest weight (elements) whose order is kept: 128 MiB of int64 positions.
MAX_ELEMENTS = 1 << 24


@dataclass
class SortedEntries:
    """The entries of one weight a trial zeroes (a prefix of its L1 order), and their values.

    Attributes:
        flat: The weight, flattened (a view: edits reach the weight).
        positions: Flat positions to zero.
        values: Their old values, saved before zeroing (``None`` until then).
    """

    flat: torch.Tensor
    positions: torch.Tensor
    values: torch.Tensor | None = None

    @torch.no_grad()
    def zero(self) -> None:
        """Save the entries' values, then zero them."""
        self.values = self.flat[self.positions]  # a copy: saved before anything is zeroed
        self.flat.index_fill_(0, self.positions, 0.0)

    @torch.no_grad()
    def restore(self) -> None:
        """Put the saved values back, bit-exactly (idempotent)."""
        if self.values is not None:
            self.flat.index_copy_(0, self.positions, self.values)


def _sortable(target: Target) -> bool:
    """A plain float32 weight of at most MAX_ELEMENTS, zeroed in place by pruning."""
    w = target.weight()
    plain = isinstance(w, nn.Parameter) and w.layout == torch.strided and w.is_contiguous()
    if target.parametrized or not plain or w.dtype != torch.float32 or w.numel() > MAX_ELEMENTS:
        return False
    return not any(is_masked(u.owner, u.leaf) for u in target.uses)  # kept masks: prune_'s


class Ladder:
    """Prunes layers for trials, sorting each element-L1 layer's weights once.

    Args:
        model: The model being swept.
        granularity: The sweep's granularity (only ``"element"`` uses the order).
    """

    def __init__(self, model: nn.Module, granularity: str) -> None:
        self.model, self.granularity = model, granularity
        self.orders: dict[str, list[torch.Tensor]] = {}

    def forget(self) -> None:
        """Drop the kept orders (a layer's sweep is over)."""
        self.orders.clear()

    def prune(self, trial: LayerTrial, name: str, ratio: float) -> None:
        """Prune layer ``name`` to ``ratio`` by L1 inside ``trial`` (restored with it)."""
        targets = collect(self.model, {name: ratio})
        if self.granularity != "element" or not all(_sortable(t) for t in targets):
            prune_in_trial(self.model, trial, {name: ratio}, self.granularity)
            return
        if name not in self.orders:
            self.orders[name] = [_order(t.weight()) for t in targets]
        for target, order in zip(targets, self.orders[name], strict=True):
            flat = target.weight().detach().view(-1)
            entries = SortedEntries(flat, order[: round(target.amount * flat.numel())])
            trial.saved.append(entries)  # before zeroing: an interrupted zero() is restored
            entries.zero()


def _order(weight: torch.Tensor) -> torch.Tensor:
    """Positions of ``weight`` from the smallest magnitude up, ties by position."""
    keys = weight.detach().abs().view(-1).view(torch.int32)
    return torch.sort(keys, stable=True).indices
