"""Mask strategies: which weights to remove. They compute masks and never edit a model.

Like ``torch.nn.utils.prune``, a small mechanism (``prune.py`` applies masks) is kept apart
from the strategies here. A criterion maps a weight tensor to per-element scores; the
lowest-scoring units — elements, 4 × 1 blocks or output channels — are removed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch

__all__ = [
    "BLOCK",
    "CRITERIA",
    "GRANULARITIES",
    "global_masks",
    "layer_mask",
    "scores",
    "zero_units",
]

Criterion = Callable[[torch.Tensor, torch.Generator], torch.Tensor]

#: Criterion name → score function (higher score = more important, kept longer).
CRITERIA: dict[str, Criterion] = {
    "l1": lambda w, g: w.detach().abs().float(),
    "random": lambda w, g: torch.rand(w.shape, generator=g),
}

#: Granularity name → how element scores are reduced to the unit that is removed.
GRANULARITIES = ("element", "block", "channel")
#: Output rows per block of the ``"block"`` granularity: the 4 × 1 blocks (four output
#: channels / neurons at one input position) that the block-sparse kernels run with each
#: input value or row loaded once for four outputs.
BLOCK = 4


def _blocks(t: torch.Tensor, fill: float | bool) -> torch.Tensor:
    """``t`` as (blocks, BLOCK, inputs): groups of BLOCK output rows, the last padded."""
    flat = t.reshape(t.shape[0], -1)
    pad = -flat.shape[0] % BLOCK
    if pad:
        flat = torch.cat([flat, flat.new_full((pad, flat.shape[1]), fill)])
    return flat.reshape(-1, BLOCK, flat.shape[1])


def scores(
    weight: torch.Tensor, method: str, granularity: str, gen: torch.Generator
) -> torch.Tensor:
    """Scores per removable unit: per element, or per output channel (dim 0) or block as an L1 norm.

    Already-zero units score lowest, so that a target sparsity counts existing zeros and a
    random criterion never revives a pruned weight.
    """
    if method not in CRITERIA:
        raise ValueError(f"method: {method!r} is unknown; choose one of {sorted(CRITERIA)}.")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity: {granularity!r} is unknown; choose one of {GRANULARITIES}.")
    s = CRITERIA[method](weight, gen)
    if granularity == "channel":
        s = s.reshape(s.shape[0], -1).sum(1) if method == "l1" else s.reshape(s.shape[0], -1)[:, 0]
    elif granularity == "block" and method == "l1":
        # Mean over the block's real rows × BLOCK: a last block of fewer rows (out_features
        # not a multiple of 4) must not look small for lack of rows.
        real = _blocks(torch.ones(s.shape[0], 1), 0.0).sum(1)
        s = _blocks(s, 0.0).sum(1) * (BLOCK / real)
    elif granularity == "block":
        s = _blocks(s, 0.0)[:, 0]
    return torch.where(zero_units(weight, granularity), torch.full_like(s, -1.0), s)


def zero_units(weight: torch.Tensor, granularity: str) -> torch.Tensor:
    """Which removable units of ``weight`` are all zero: per element, block or output channel.

    Args:
        weight: A layer's weight (output channels / neurons along dim 0).
        granularity: ``"element"``, ``"block"`` or ``"channel"``.

    Returns:
        A boolean tensor with one entry per unit (its size is the number of units).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity: {granularity!r} is unknown; choose one of {GRANULARITIES}.")
    zero = weight.detach() == 0
    if granularity == "channel":
        return zero.reshape(zero.shape[0], -1).all(1)
    if granularity == "block":
        return _blocks(zero, True).all(1)
    return zero


def _mask_from_scores(s: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.ones(s.numel(), dtype=torch.bool)
    if k > 0:
        mask[torch.topk(s.reshape(-1), k, largest=False, sorted=False).indices] = False
    return mask.reshape(s.shape)


def _expand(unit_mask: torch.Tensor, weight: torch.Tensor, granularity: str) -> torch.Tensor:
    """Broadcast a per-channel or per-block mask to the weight's shape (element: as is)."""
    if granularity == "element":
        return unit_mask
    if granularity == "block":
        rows = unit_mask.repeat_interleave(BLOCK, dim=0)[: weight.shape[0]]
        return rows.reshape(weight.shape).clone()
    return unit_mask.reshape(-1, *([1] * (weight.dim() - 1))).expand_as(weight).clone()


def layer_mask(
    weight: torch.Tensor,
    amount: float,
    *,
    method: str = "l1",
    granularity: str = "element",
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """Boolean keep-mask that makes ``amount`` of one layer's units zero.

    Args:
        weight: The layer's weight.
        amount: Target fraction of zero units afterwards (existing zeros count).
        method: A key of :data:`CRITERIA`.
        granularity: ``"element"``, ``"block"`` (4 × 1 blocks: four consecutive output
            channels / neurons at one input position, see :data:`BLOCK`; a last block of
            fewer rows counts as one unit) or ``"channel"`` (whole output channels / neurons).
        gen: Random generator for the random criterion.

    Returns:
        A boolean tensor shaped like ``weight``; ``False`` marks removed weights.
    """
    s = scores(weight, method, granularity, gen or torch.Generator().manual_seed(0))
    return _expand(_mask_from_scores(s, int(round(amount * s.numel()))), weight, granularity)


def global_masks(
    weights: dict[str, torch.Tensor],
    amount: float,
    *,
    method: str = "l1",
    granularity: str = "element",
    min_density: float = 0.05,
    gen: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Keep-masks that remove ``amount`` of all units pooled across layers.

    Pooled magnitude ranking removes whole layers whose weights happen to be small (a
    recommender lost every Linear weight this way because its embeddings are larger). Each
    layer therefore keeps at least ``min_density`` of its units; the shortfall is taken from
    the other layers, and a warning names every layer that hit the floor.

    Args:
        weights: Layer name → weight.
        amount: Overall fraction of units to remove.
        method: A key of :data:`CRITERIA`.
        granularity: ``"element"``, ``"block"`` or ``"channel"``.
        min_density: Minimum fraction of units every layer keeps.
        gen: Random generator for the random criterion.

    Returns:
        Layer name → boolean keep-mask.
    """
    gen = gen or torch.Generator().manual_seed(0)
    per_layer = {n: scores(w, method, granularity, gen) for n, w in weights.items()}
    total = sum(s.numel() for s in per_layer.values())
    k = int(round(amount * total))
    caps = {n: s.numel() - math.ceil(min_density * s.numel()) for n, s in per_layer.items()}
    if k > sum(caps.values()):
        raise ValueError(
            f"amount: {amount} cannot be reached while every layer keeps min_density="
            f"{min_density} of its weights; lower the amount or min_density."
        )
    # Only each layer's `cap` lowest scores are eligible; the k lowest eligible scores win.
    eligible = [torch.sort(s.reshape(-1)).values[: caps[n]] for n, s in per_layer.items()]
    owner = torch.cat([torch.full((len(e),), i) for i, e in enumerate(eligible)])
    chosen = torch.topk(torch.cat(eligible), k, largest=False, sorted=False).indices
    counts = torch.bincount(owner[chosen], minlength=len(eligible)).tolist()
    capped = [n for (n, cap), c in zip(caps.items(), counts) if c == cap and c > 0]
    unconstrained = _uncapped_counts(per_layer, k)
    starved = [n for n in capped if unconstrained[n] > caps[n]]
    if starved:
        warnings.warn(
            "global pruning would have removed (nearly) all weights of "
            f"{', '.join(starved)}; each keeps min_density={min_density} of its weights "
            "instead and the other layers are pruned a little more. Consider per-layer "
            "scope or sensitivity-guided ratios.",
            stacklevel=3,
        )
    return {
        n: _expand(_mask_from_scores(s, c), weights[n], granularity)
        for (n, s), c in zip(per_layer.items(), counts)
    }


def _uncapped_counts(per_layer: dict[str, torch.Tensor], k: int) -> dict[str, int]:
    """Units each layer would lose under plain pooled ranking (for the warning)."""
    flat = torch.cat([s.reshape(-1) for s in per_layer.values()])
    owner = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(per_layer.values())])
    chosen = (
        torch.topk(flat, k, largest=False, sorted=False).indices
        if k
        else torch.tensor([], dtype=torch.long)
    )
    counts = torch.bincount(owner[chosen], minlength=len(per_layer)).tolist()
    return dict(zip(per_layer, counts))
