"""Wanda importance: ``|W_ij| · ‖X_j‖₂``, compared within each output row (Sun et al., 2024).

A weight matters as much as it moves its output: the weight's magnitude times the norm of
the input feature it multiplies, over calibration inputs (see
:mod:`~nbcompress.engine.prune.calibrate`). For element granularity every output row loses
the same share of its weights, as in the paper; blocks and channels sum their elements'
scores and compete across the layer, as with L1.
"""

from __future__ import annotations

import torch

from nbcompress.engine.prune.calibrate import LayerStats
from nbcompress.engine.prune.masks import mask_of, unit_scores, unit_source, units
from nbcompress.engine.prune.select import CHUNK

__all__ = ["wanda_mask", "wanda_scores"]


def _row_norms(weight: torch.Tensor, stats: LayerStats, start: int, stop: int) -> torch.Tensor:
    """Input norms seen by output rows ``start:stop`` (each row reads its group's inputs)."""
    norms = stats.norms()
    per_group = weight.shape[0] // norms.shape[0]
    return norms[torch.arange(start, stop) // per_group]


def _row_scores(w2d: torch.Tensor, stats: LayerStats, start: int, stop: int) -> torch.Tensor:
    rows = w2d[start:stop]
    s = rows.abs().float() * _row_norms(w2d, stats, start, stop)
    return torch.where(rows == 0, -1.0, s)  # already pruned: removed first, never revived


def wanda_scores(weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    """Element scores ``|W_ij| · ‖X_j‖₂`` shaped like ``weight`` (zeros score -1).

    Args:
        weight: A Linear / Conv1d / Conv2d weight, outputs along dim 0.
        stats: The layer's input statistics (``sq`` of shape ``(groups, d)``).
    """
    w2d = weight.detach().reshape(weight.shape[0], -1)
    return _row_scores(w2d, stats, 0, w2d.shape[0]).reshape(weight.shape)


def wanda_mask(
    weight: torch.Tensor, amount: float, stats: LayerStats, granularity: str = "element"
) -> torch.Tensor:
    """Keep-mask removing ``amount`` of ``weight`` by Wanda scores.

    Element granularity: each output row loses its ``round(amount · row length)``
    lowest-scoring weights (existing zeros first; ties by position), computed a chunk of
    rows at a time. Block / channel: the summed scores of each unit, ranked across the layer.

    Returns:
        A boolean tensor shaped like ``weight``; ``False`` marks removed weights.
    """
    if granularity != "element":
        s = unit_scores(wanda_scores(weight, stats).clamp_min(0), weight, granularity)
        k = int(round(amount * units(weight, granularity)))
        return mask_of(weight, k, unit_source(s), granularity)
    w2d = weight.detach().reshape(weight.shape[0], -1)
    mask = torch.ones(w2d.shape, dtype=torch.bool)
    k = int(round(amount * w2d.shape[1]))
    if k == 0:
        return mask.reshape(weight.shape)
    step = max(1, CHUNK // max(w2d.shape[1], 1))
    for start in range(0, w2d.shape[0], step):
        stop = min(start + step, w2d.shape[0])
        drop = torch.sort(_row_scores(w2d, stats, start, stop), dim=1, stable=True).indices
        mask[start:stop].scatter_(1, drop[:, :k], False)
    return mask.reshape(weight.shape)
