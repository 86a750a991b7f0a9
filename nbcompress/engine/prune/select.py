"""Exact k-smallest selection over scores in bounded memory (a two-pass radix select).

Sorting or ``topk`` over all weights of a model needs int64 indices and copies several times
the size of the weights (13.6× the model for global pruning of 100M weights, issue 11 F11).
Here the k-th smallest score is found from two histograms of the scores' float32 bit
patterns, read in chunks, so the extra memory is a chunk and a few histograms; the keep-mask
is then one boolean per unit. Ties at the threshold are broken by position (first removed),
so the selection is deterministic and removes exactly ``k`` units.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

__all__ = ["CHUNK", "Scores", "Threshold", "capped_counts", "keep_mask", "threshold"]

#: Elements read at a time: int64 keys of a chunk take 2 MiB.
CHUNK = 1 << 18
_HALF = 16
_BINS = 1 << _HALF

#: A score source: called again for every pass, it yields float32 score chunks in flat order.
Scores = Callable[[], Iterator[torch.Tensor]]


def _keys(chunk: torch.Tensor) -> torch.Tensor:
    """Monotonic int64 keys in [0, 2**32) of float32 scores: their order is the values' order."""
    b = chunk.float().contiguous().view(torch.int32).to(torch.int64)
    return torch.where(b < 0, b ^ 0x7FFFFFFF, b) + 2**31


def _histogram(source: Scores, high: int | None) -> torch.Tensor:
    """Counts per high half of the keys, or (given ``high``) per low half within that bin."""
    counts = torch.zeros(_BINS, dtype=torch.int64)
    for chunk in source():
        k = _keys(chunk)
        if high is None:
            counts += torch.bincount(k >> _HALF, minlength=_BINS)
        else:
            counts += torch.bincount(k[(k >> _HALF) == high] & (_BINS - 1), minlength=_BINS)
    return counts


@dataclass(frozen=True)
class Threshold:
    """The k-th smallest key, and how many units lie strictly below / exactly at it."""

    key: int
    below: int
    equal: int


def _crossing(cum: torch.Tensor, k: int) -> int:
    """First bin whose cumulative count reaches ``k`` (``k >= 1``)."""
    return int(torch.searchsorted(cum, torch.tensor([k], dtype=cum.dtype)).item())


def threshold(source: Scores, k: int) -> Threshold:
    """Key of the ``k``-th smallest score of ``source`` (``k >= 1``), in two passes."""
    high = _histogram(source, None)
    cum = high.cumsum(0)
    hb = _crossing(cum, k)
    before = int(cum[hb - 1]) if hb else 0
    low = _histogram(source, hb).cumsum(0)
    lb = _crossing(low, k - before)
    below = before + (int(low[lb - 1]) if lb else 0)
    return Threshold((hb << _HALF) | lb, below, before + int(low[lb]) - below)


def keep_mask(source: Scores, k: int, shape: torch.Size | Sequence[int]) -> torch.Tensor:
    """Boolean keep-mask of ``shape`` that removes the ``k`` lowest scores of ``source``."""
    mask = torch.ones(int(torch.Size(shape).numel()), dtype=torch.bool)
    if k > 0:
        t = threshold(source, k)
        ties, start = k - t.below, 0
        for chunk in source():
            keys = _keys(chunk)
            part = keys > t.key
            if ties > 0:
                at = (keys == t.key).nonzero().reshape(-1)
                if len(at) > ties:
                    part[at[ties:]] = True  # only the first `ties` equal scores go
                ties -= min(ties, len(at))
            else:
                part |= keys == t.key
            mask[start : start + len(part)] = part
            start += len(part)
    return mask.reshape(shape)


def capped_counts(sources: Sequence[Scores], k: int, caps: Sequence[int]) -> list[int]:
    """Units each source loses when the ``k`` lowest scores pooled over all are removed.

    A source never loses more than its cap: pooled ranking among each source's ``cap``
    lowest scores, as if the rest were not there. ``k`` must not exceed ``sum(caps)``.
    """
    if k <= 0:
        return [0] * len(sources)
    high = [_histogram(s, None).cumsum(0) for s in sources]
    cap_t = torch.tensor(caps, dtype=torch.int64).reshape(-1, 1)
    pooled = torch.minimum(torch.stack(high), cap_t).sum(0)
    hb = _crossing(pooled, k)
    before = [int(min(c, int(h[hb - 1]) if hb else 0)) for h, c in zip(high, caps)]
    lows = [_histogram(s, hb).cumsum(0) for s in sources]
    base = torch.tensor(before, dtype=torch.int64).reshape(-1, 1)
    room = cap_t - base
    pooled_low = torch.minimum(torch.stack(lows), room).sum(0)
    lb = _crossing(pooled_low, k - sum(before))
    counts = []
    for b, low, r in zip(before, lows, room.reshape(-1).tolist()):
        counts.append(b + min(r, int(low[lb - 1]) if lb else 0))
    left = k - sum(counts)
    for i, (low, r) in enumerate(zip(lows, room.reshape(-1).tolist())):
        # Ties at the threshold: taken in source order, within each source's cap.
        here = min(
            left, r - (counts[i] - before[i]), int(low[lb]) - (int(low[lb - 1]) if lb else 0)
        )
        counts[i] += max(here, 0)
        left -= max(here, 0)
    return counts
