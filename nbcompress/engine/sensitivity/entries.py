"""Pruning layers for a trial while saving only the entries it zeroes (issue 11, F11).

A trial that prunes one layer used to keep a full copy of it for the rollback, on top of
the boolean mask and the selection's temporaries: 3.3x the layer at its peak. Here the
rollback keeps, chunk by chunk, the zeroed positions as packed bits (1/32 of a float32
weight) and the old values of those entries only (one buffer), so a trial at ratio ``r``
holds about ``r + 1/32`` of the layer. Element L1 selection (the sweep's default) is done
chunk by chunk on the same threshold as ``prune_``, so no boolean mask of the layer is
made; other granularities compute the mask as ``prune_`` does and free it once packed. The
entries zeroed are exactly those :func:`~nbcompress.engine.prune.prune.prune_ratios_`
zeroes; weights that cannot be zeroed in place this way (parametrized, kept masks,
non-contiguous) are pruned by ``prune_ratios_`` itself, inside the same trial.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nbcompress.engine.prune.apply import is_masked, zero_channel_bias
from nbcompress.engine.prune.calibrate import (
    SUPPORTED,
    ActivationStats,
    calibration_inputs,
    collect_stats,
)
from nbcompress.engine.prune.masks import (
    from_output_major,
    layer_mask,
    output_major,
)
from nbcompress.engine.prune.prune import prune_ratios_
from nbcompress.engine.prune.select import threshold
from nbcompress.engine.prune.targets import Target, collect
from nbcompress.engine.prune.wanda import wanda_mask
from nbcompress.engine.sensitivity.guard import LayerTrial

__all__ = ["PrunedEntries", "check_pruning", "prune_in_trial", "trial_pruning"]


#: Elements read at a time. Smaller than prune's chunks: the selection's temporaries (int64
#: keys of a chunk: 512 KiB) are then reused in place instead of fragmenting the heap,
#: which kept up to a third of a 64 MiB layer resident between trials.
_CHUNK = 1 << 16

#: Bit weights of one byte of a packed mask.
_BITS = 2 ** torch.arange(8, dtype=torch.uint8)


def _pack(flags: torch.Tensor) -> torch.Tensor:
    """A 1-D boolean tensor as bits, eight to a byte (one chunk at a time: small temporaries)."""
    pad = -flags.numel() % 8
    if pad:
        flags = torch.cat([flags, flags.new_zeros(pad)])
    return (flags.view(-1, 8).to(torch.uint8) * _BITS).sum(1, dtype=torch.uint8)


def _unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`_pack`: the first ``n`` flags."""
    return ((packed.unsqueeze(1) & _BITS) != 0).reshape(-1)[:n]


@dataclass
class PrunedEntries:
    """The entries of one weight a trial zeroes: where they are and their old values.

    Made with :meth:`of` (positions only, so the boolean mask can be freed), then
    :meth:`zero` saves each chunk's old values and zeroes it.

    Attributes:
        tensor: The weight (edited in place).
        drops: Per chunk of ``_CHUNK`` elements, the positions to zero as packed bits
            (1/32 of a float32 chunk), and how many there are.
        values: Old values of every entry to zero, chunk after chunk (one buffer: many
            small ones would fragment the heap).
        zeroed: Chunks whose values are saved (and which are then zeroed).
    """

    tensor: torch.Tensor
    drops: list[tuple[torch.Tensor, int]]
    values: torch.Tensor | None = None
    zeroed: int = 0

    @classmethod
    def of(cls, tensor: torch.Tensor, keep: torch.Tensor) -> PrunedEntries:
        """Entries of ``tensor`` that ``keep`` (boolean, same shape) marks ``False``."""
        keep, drops = keep.reshape(-1), []
        for i in range(0, keep.numel(), _CHUNK):
            part = keep[i : i + _CHUNK]
            drops.append((_pack(~part), part.numel() - int(torch.count_nonzero(part))))
        return cls(tensor, drops)

    @property
    def nbytes(self) -> int:
        """Bytes this snapshot holds."""
        held = sum(p.numel() for p, _ in self.drops)
        return held + (0 if self.values is None else self.values.nbytes)

    def _chunks(self, count: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The first ``count`` chunks: the weight's, its positions to zero, their values."""
        flat, at = self.tensor.detach().view(-1), 0
        for i, (packed, n) in enumerate(self.drops[:count]):
            chunk = flat[i * _CHUNK : (i + 1) * _CHUNK]
            yield chunk, _unpack(packed, chunk.numel()), self.values[at : at + n]
            at += n

    @torch.no_grad()
    def zero(self) -> None:
        """Save then zero each chunk's entries (an interrupted call restores what it did)."""
        if self.values is None:
            total = sum(n for _, n in self.drops)
            self.values = self.tensor.new_empty(total, requires_grad=False)
        for i, (chunk, drop, values) in enumerate(self._chunks(len(self.drops))):
            if i == self.zeroed:
                torch.masked_select(chunk, drop, out=values)
                # Saved before zeroed: a Ctrl-C in between restores unchanged values.
                self.zeroed += 1
                chunk.masked_fill_(drop, 0)

    @torch.no_grad()
    def restore(self) -> None:
        """Put the saved values back, bit-exactly (idempotent)."""
        for chunk, drop, values in self._chunks(self.zeroed):
            chunk.masked_scatter_(drop, values)


def _in_place(target: Target) -> bool:
    """Whether zeroing ``target``'s tensor in place prunes it (no parametrization or kept mask)."""
    w = target.weight()
    return (
        not target.parametrized
        and not any(is_masked(u.owner, u.leaf) for u in target.uses)
        and isinstance(w, nn.Parameter)
        and w.layout == torch.strided
        and w.is_floating_point()
        and w.is_contiguous()
    )


def prune_in_trial(
    model: nn.Module,
    trial: LayerTrial,
    ratios: dict[str, float],
    granularity: str,
    *,
    method: str = "l1",
    stats: ActivationStats | None = None,
) -> None:
    """Prune each named layer to its ratio, as ``prune_ratios_`` would, inside ``trial``.

    Each weight's zeroed entries are added to ``trial.saved`` before they are zeroed; biases
    of removed channels are saved in the trial's transaction. If some weight cannot be
    zeroed in place, ``prune_ratios_`` prunes them all (its full copies join the trial).

    Args:
        model: The model (inside ``trial``).
        trial: The open :func:`~nbcompress.engine.sensitivity.guard.layer_trial`.
        ratios: Layer name → fraction in (0, 1), layers already validated.
        granularity: ``"element"``, ``"block"`` or ``"channel"``.
        method: ``"l1"`` or ``"wanda"`` (then ``stats`` is required).
        stats: Input statistics from :func:`~nbcompress.engine.prune.calibrate.collect_stats`,
            collected once on the dense model, so that each trial only re-scores its layer.
            A layer without statistics (attention, recurrent) is scored by L1, as
            ``prune_`` does.

    Raises:
        ValueError: ``method="wanda"`` without ``stats``.
    """
    if method == "wanda" and stats is None:
        raise ValueError(
            "stats: method='wanda' in a trial needs the input statistics collected once on "
            "the dense model (nbcompress.engine.prune.calibrate.collect_stats)."
        )
    targets = collect(model, ratios)
    if not all(_in_place(t) for t in targets):
        options = dict(method=method, example_inputs=stats) if method == "wanda" else {}
        prune_ratios_(model, ratios, granularity=granularity, **options)
        return
    for t in targets:
        w = t.weight()
        found = stats.layers.get(t.first.layer) if method == "wanda" else None
        if found is not None and not isinstance(t.module, SUPPORTED):
            found = None
        if found is None and granularity == "element" and w.dtype == torch.float32:
            entries = _l1_entries(w, t.amount)
        else:
            view = output_major(w.detach(), t.module)
            if found is not None:
                mask = wanda_mask(view, t.amount, found, granularity)
            else:
                mask = layer_mask(view, t.amount, granularity=granularity)
            mask = from_output_major(mask, w, t.module)
            entries = PrunedEntries.of(w, mask)
            if granularity == "channel":
                for use in t.uses:
                    zero_channel_bias(trial.tx, use.owner, mask)
            del view, mask  # the positions are packed: free the boolean mask before zeroing
        trial.saved.append(entries)  # before zeroing: an interrupted zero() is restored
        entries.zero()


def _l1_entries(weight: torch.Tensor, amount: float) -> PrunedEntries:
    """The entries element L1 pruning removes, found chunk by chunk (no mask of the layer).

    The selection of :func:`~nbcompress.engine.prune.select.keep_mask` on the same
    scores: the ``round(amount * n)`` smallest magnitudes go, ties at the threshold broken
    by position (the first ones go). Magnitudes are non-negative float32, so their int32
    bit patterns order like the values (NaN above inf), and the threshold's key is the bit
    pattern plus ``2**31``.
    """
    flat = weight.detach().view(-1)
    k = round(amount * flat.numel())
    n = flat.numel()
    source = lambda: (flat[i : i + _CHUNK].abs() for i in range(0, n, _CHUNK))  # noqa: E731
    cut, ties = -1, 0
    if k > 0:
        found = threshold(source, k)
        cut, ties = found.key - 2**31, k - found.below
    drops = []
    for scores in source():
        bits = scores.view(torch.int32)
        drop = bits < cut
        if ties > 0:
            at = (bits == cut).nonzero().reshape(-1)[:ties]
            drop[at] = True
            ties -= len(at)
        drops.append((_pack(drop), int(torch.count_nonzero(drop))))
    return PrunedEntries(weight, drops)


def check_pruning(method: Any, example_inputs: Any, reconstruct: Any) -> bool:
    """Check ``method`` / ``reconstruct`` and their calibration inputs; True if not plain L1.

    Raises:
        ValueError: An unknown method, or wanda / reconstruct without ``example_inputs``
            (one line naming the argument and the fix).
    """
    if method not in ("l1", "wanda") or not isinstance(reconstruct, bool):
        raise ValueError(
            f"method / reconstruct: expected method 'l1' or 'wanda' and reconstruct True or "
            f"False, got {method!r} / {reconstruct!r}."
        )
    if method == "l1" and not reconstruct:
        return False
    if example_inputs is None:
        who = "reconstruct=True" if reconstruct else "method='wanda'"
        raise ValueError(
            f"example_inputs: {who} needs calibration inputs: pass example_inputs=x (--input x "
            "in a notebook), a list of batches or a DataLoader."
        )
    return True


def trial_pruning(
    model: nn.Module,
    selected: dict[str, nn.Module],
    method: str,
    example_inputs: Any,
    reconstruct: bool,
) -> dict[str, Any]:
    """How each measured allocation is pruned: keyword arguments for the trial's pruning.

    L1: nothing (the default). Wanda: statistics collected once here, on the model as it
    is, for every trial (``prune_in_trial(method=, stats=)``). Reconstruct: the calibration
    inputs, for ``prune_ratios_`` (each layer is re-measured after the earlier ones).

    Raises:
        ValueError: As :func:`check_pruning`, or the model fails on ``example_inputs``.
    """
    if not check_pruning(method, example_inputs, reconstruct):
        return {}
    if reconstruct:
        return dict(method=method, example_inputs=example_inputs, reconstruct=True)
    stats = collect_stats(model, calibration_inputs(example_inputs), selected)
    return dict(method=method, stats=stats)
