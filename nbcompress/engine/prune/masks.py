"""Mask strategies: which weights to remove. They compute masks and never edit a model.

Like ``torch.nn.utils.prune``, a small mechanism (``prune.py`` applies masks) is kept apart
from the strategies here. A criterion maps a weight tensor to per-element scores; the
lowest-scoring units — elements, 4 × 1 blocks or output channels — are removed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn

from nbcompress.engine.core.layers import prunable_weights
from nbcompress.engine.prune.select import CHUNK, Scores, capped_counts, keep_mask

__all__ = [
    "BLOCK",
    "CRITERIA",
    "GRANULARITIES",
    "from_output_major",
    "global_counts",
    "global_masks",
    "layer_mask",
    "layer_units",
    "mask_of",
    "output_major",
    "score_source",
    "scores",
    "unit_scores",
    "unit_shape",
    "unit_source",
    "units",
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

_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


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
    return unit_scores(CRITERIA[method](weight, gen), weight, granularity, summed=method == "l1")


def unit_scores(
    s: torch.Tensor, weight: torch.Tensor, granularity: str, *, summed: bool = True
) -> torch.Tensor:
    """Element scores ``s`` of ``weight`` reduced to its units; zero units score -1.

    Args:
        s: Non-negative scores shaped like the (output-major) weight.
        weight: The weight (its zeros mark units already removed).
        granularity: ``"element"``, ``"block"`` or ``"channel"``.
        summed: Sum the scores of a unit (magnitude-like criteria); else take its first
            score (the random criterion).
    """
    if granularity == "channel":
        s = s.reshape(s.shape[0], -1).sum(1) if summed else s.reshape(s.shape[0], -1)[:, 0]
    elif granularity == "block" and summed:
        # Mean over the block's real rows × BLOCK: a last block of fewer rows (out_features
        # not a multiple of 4) must not look small for lack of rows.
        real = _blocks(torch.ones(s.shape[0], 1), 0.0).sum(1)
        s = _blocks(s, 0.0).sum(1) * (BLOCK / real)
    elif granularity == "block":
        s = _blocks(s, 0.0)[:, 0]
    return torch.where(zero_units(weight, granularity), torch.full_like(s, -1.0), s)


def unit_source(s: torch.Tensor) -> Scores:
    """A score source over precomputed unit scores (read in chunks, flat order)."""
    flat = s.reshape(-1)
    return lambda: _chunks(flat)


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


def _expand(unit_mask: torch.Tensor, weight: torch.Tensor, granularity: str) -> torch.Tensor:
    """Broadcast a per-channel or per-block mask to the weight's shape (element: as is)."""
    if granularity == "element":
        return unit_mask
    if granularity == "block":
        rows = unit_mask.repeat_interleave(BLOCK, dim=0)[: weight.shape[0]]
        return rows.reshape(weight.shape).clone()
    return unit_mask.reshape(-1, *([1] * (weight.dim() - 1))).expand_as(weight).clone()


def output_major(weight: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
    """``weight`` with its output channels along dim 0, as the unit reductions expect.

    A ConvTranspose weight is ``(in, out / groups, *kernel)``: its output channel
    ``g * out_per_group + j`` is column ``j`` of group ``g``'s rows. Every other layer
    already has outputs along dim 0 (returned as is).
    """
    if not isinstance(module, _TRANSPOSED) or module.groups is None:
        return weight
    g = module.groups
    cin, per = weight.shape[0], weight.shape[1]
    grouped = weight.reshape(g, cin // g, per, *weight.shape[2:]).transpose(1, 2)
    return grouped.reshape(g * per, cin // g, *weight.shape[2:])


def from_output_major(
    mask: torch.Tensor, weight: torch.Tensor, module: nn.Module | None
) -> torch.Tensor:
    """Inverse of :func:`output_major` for a mask: back to ``weight``'s own layout."""
    if not isinstance(module, _TRANSPOSED) or module.groups is None:
        return mask
    g = module.groups
    cin, per = weight.shape[0], weight.shape[1]
    grouped = mask.reshape(g, per, cin // g, *weight.shape[2:]).transpose(1, 2)
    return grouped.reshape(weight.shape).contiguous()


def unit_shape(weight: torch.Tensor, granularity: str) -> tuple[int, ...]:
    """Shape of the per-unit tensors of an (output-major) weight (scores, zero units)."""
    if granularity == "element":
        return tuple(weight.shape)
    if granularity == "channel":
        return (weight.shape[0],)
    return (-(-weight.shape[0] // BLOCK), weight.numel() // max(weight.shape[0], 1))


def units(weight: torch.Tensor, granularity: str) -> int:
    """Number of removable units of an (output-major) weight."""
    return math.prod(unit_shape(weight, granularity))


def layer_units(module: nn.Module, granularity: str) -> tuple[int, int, int]:
    """``(zero units, units, weights)`` over every prunable weight matrix of a layer.

    The layer-level view of :func:`zero_units` for callers that size or measure a layer
    (sensitivity sweeps): a MultiheadAttention counts its in/out projections, an LSTM its
    gate matrices, a ConvTranspose its output channels (not dim 0).
    """
    zero = total = size = 0
    for w in prunable_weights(module).values():
        z = zero_units(output_major(w.detach(), module), granularity)
        zero, total, size = zero + int(torch.count_nonzero(z)), total + z.numel(), size + w.numel()
    return zero, total, size


def _chunks(flat: torch.Tensor) -> Iterator[torch.Tensor]:
    for i in range(0, flat.numel(), CHUNK):
        yield flat[i : i + CHUNK]


def score_source(
    weight: torch.Tensor, method: str, granularity: str, gen: torch.Generator
) -> Scores:
    """Scores of ``weight``'s units, read in chunks as often as the selection needs.

    Element scores are never held whole: L1 reads the weight's magnitudes chunk by chunk,
    and the random criterion redraws its chunks from a seed taken from ``gen``. Existing
    zeros score lowest (see :func:`scores`).
    """
    if granularity != "element":
        return unit_source(scores(weight, method, granularity, gen))
    flat = weight.detach().reshape(-1)
    if method == "l1":
        return lambda: (c.abs() for c in _chunks(flat))
    if method not in CRITERIA:
        raise ValueError(f"method: {method!r} is unknown; choose one of {sorted(CRITERIA)}.")
    seed = int(torch.randint(2**62, (1,), generator=gen))

    def drawn() -> Iterator[torch.Tensor]:
        local = torch.Generator().manual_seed(seed)
        for c in _chunks(flat):
            yield torch.where(c == 0, -1.0, torch.rand(c.shape, generator=local))

    return drawn


def mask_of(weight: torch.Tensor, k: int, source: Scores, granularity: str) -> torch.Tensor:
    """Keep-mask of an (output-major) ``weight`` removing its ``k`` lowest-scoring units."""
    shape = unit_shape(weight, granularity)
    return _expand(keep_mask(source, k, shape), weight, granularity)


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
        weight: The layer's weight, output channels along dim 0 (see :func:`output_major`).
        amount: Target fraction of zero units afterwards (existing zeros count).
        method: A key of :data:`CRITERIA`.
        granularity: ``"element"``, ``"block"`` (4 × 1 blocks: four consecutive output
            channels / neurons at one input position, see :data:`BLOCK`; a last block of
            fewer rows counts as one unit) or ``"channel"`` (whole output channels / neurons).
        gen: Random generator for the random criterion.

    Returns:
        A boolean tensor shaped like ``weight``; ``False`` marks removed weights.
    """
    gen = gen or torch.Generator().manual_seed(0)
    source = score_source(weight, method, granularity, gen)
    return mask_of(weight, int(round(amount * units(weight, granularity))), source, granularity)


def global_counts(
    weights: dict[str, torch.Tensor],
    sources: dict[str, Scores],
    amount: float,
    *,
    granularity: str = "element",
    min_density: float = 0.05,
) -> dict[str, int]:
    """Units each weight loses when ``amount`` of all units, pooled, are removed.

    Pooled magnitude ranking removes whole layers whose weights happen to be small (a
    recommender lost every Linear weight this way because its embeddings are larger). Each
    weight therefore keeps at least ``min_density`` of its units; the shortfall is taken
    from the others, and a warning names every layer that hit the floor.
    """
    sizes = {n: units(w, granularity) for n, w in weights.items()}
    k = int(round(amount * sum(sizes.values())))
    caps = {n: s - math.ceil(min_density * s) for n, s in sizes.items()}
    if k > sum(caps.values()):
        raise ValueError(
            f"amount: {amount} cannot be reached while every layer keeps min_density="
            f"{min_density} of its weights; lower the amount or min_density."
        )
    names = list(weights)
    counts = capped_counts([sources[n] for n in names], k, [caps[n] for n in names])
    capped = [n for n, c in zip(names, counts) if c == caps[n] and c > 0]
    if capped:
        free = capped_counts([sources[n] for n in names], k, [sizes[n] for n in names])
        starved = [n for n, c in zip(names, free) if n in capped and c > caps[n]]
        if starved:
            warnings.warn(
                "global pruning would have removed (nearly) all weights of "
                f"{', '.join(starved)}; each keeps min_density={min_density} of its weights "
                "instead and the other layers are pruned a little more. Consider per-layer "
                "scope or sensitivity-guided ratios.",
                stacklevel=4,
            )
    return dict(zip(names, counts))


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

    Args:
        weights: Layer name → weight (output channels along dim 0).
        amount: Overall fraction of units to remove.
        method: A key of :data:`CRITERIA`.
        granularity: ``"element"``, ``"block"`` or ``"channel"``.
        min_density: Minimum fraction of units every layer keeps (see :func:`global_counts`).
        gen: Random generator for the random criterion.

    Returns:
        Layer name → boolean keep-mask.
    """
    gen = gen or torch.Generator().manual_seed(0)
    sources = {n: score_source(w, method, granularity, gen) for n, w in weights.items()}
    counts = global_counts(
        weights, sources, amount, granularity=granularity, min_density=min_density
    )
    return {n: mask_of(w, counts[n], sources[n], granularity) for n, w in weights.items()}
