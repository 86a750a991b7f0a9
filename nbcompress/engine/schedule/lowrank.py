"""Low-rank layers: a Linear or Conv2d split by SVD into two thinner layers, and the rank rule.

``W ≈ U·V`` with ``U = U_r·√Σ_r`` and ``V = √Σ_r·V_rᵀ`` (the singular values split evenly,
so that neither factor carries all the scale). A Linear becomes ``Linear(in→r, no bias)``
then ``Linear(r→out, bias)``; a k×k Conv2d becomes a k×k conv with ``r`` output channels
(same stride, padding, dilation) then a 1×1 conv ``r→out`` with the bias.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import nn

__all__ = [
    "LowRankConv2d",
    "LowRankLinear",
    "check_energy",
    "choose_rank",
    "factor_layer",
    "max_rank",
    "singular_values",
]


class LowRankLinear(nn.Sequential):
    """A Linear layer as two: ``first`` (in→rank, no bias) then ``second`` (rank→out, bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank


class LowRankConv2d(nn.Sequential):
    """A Conv2d as two: a k×k conv to ``rank`` channels, then a 1×1 conv to ``out_channels``."""

    def __init__(self, conv: nn.Conv2d, rank: int) -> None:
        super().__init__()
        self.first = nn.Conv2d(
            conv.in_channels,
            rank,
            conv.kernel_size,  # type: ignore[arg-type]
            stride=conv.stride,  # type: ignore[arg-type]
            padding=conv.padding,  # type: ignore[arg-type]
            dilation=conv.dilation,  # type: ignore[arg-type]
            bias=False,
            padding_mode=conv.padding_mode,
        )
        self.second = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None)
        self.in_channels, self.out_channels, self.rank = conv.in_channels, conv.out_channels, rank


def _matrix(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a 2-D matrix ``out × (in·kh·kw)`` in float64."""
    w = layer.weight.detach()
    return w.reshape(w.shape[0], -1).double()


def max_rank(layer: nn.Module) -> int:
    """The full rank of the layer's weight matrix: ``min(out, in·kh·kw)``."""
    rows, cols = _matrix(layer).shape
    return min(rows, cols)


def singular_values(layer: nn.Module) -> torch.Tensor:
    """Singular values of the layer's weight matrix, largest first (float64)."""
    return torch.linalg.svdvals(_matrix(layer))


def check_energy(energy: Any) -> float:
    """Return ``energy`` as a float in (0, 1], else raise one line naming ``energy=``."""
    if isinstance(energy, bool) or not isinstance(energy, numbers.Real):
        raise TypeError(
            f"energy: expected a number in (0, 1] such as 0.9, got {type(energy).__name__} "
            f"{energy!r}."
        )
    value = float(energy)
    if math.isnan(value) or not 0 < value <= 1:
        raise ValueError(
            f"energy: {energy!r} is outside (0, 1]; it is the fraction of Σσ² kept, e.g. "
            "energy=0.9."
        )
    return value


def choose_rank(sigma: torch.Tensor, *, rank: int | float | None, energy: float | None) -> int:
    """The rank to keep: ``rank`` (count or fraction of the full rank) or by ``energy``.

    ``energy=e`` keeps the smallest ``r`` with ``Σ_{i≤r} σᵢ² ≥ e · Σ σᵢ²`` (the fraction of
    the squared Frobenius norm kept); a float ``rank`` is a fraction of ``min(in, out)``.
    """
    full = len(sigma)
    if rank is not None:
        if isinstance(rank, float):
            return max(1, min(full, round(rank * full)))
        return int(rank)
    assert energy is not None
    power = sigma.square()
    total = float(power.sum())
    if total == 0:
        return 1
    kept = torch.cumsum(power, 0) / total
    # Tolerance: float rounding must not make energy=1.0 ask for more than the full rank.
    return min(full, int(torch.searchsorted(kept, energy - 1e-12)) + 1)


def factor_layer(layer: nn.Linear | nn.Conv2d, rank: int) -> LowRankLinear | LowRankConv2d:
    """The two-layer low-rank replacement of ``layer`` at ``rank`` (truncated SVD)."""
    u, s, vh = torch.linalg.svd(_matrix(layer), full_matrices=False)
    root = s[:rank].sqrt()
    left = u[:, :rank] * root  # out × r
    right = root[:, None] * vh[:rank]  # r × (in·kh·kw)
    new: LowRankLinear | LowRankConv2d
    if isinstance(layer, nn.Linear):
        new = LowRankLinear(layer.in_features, layer.out_features, rank, layer.bias is not None)
    else:
        new = LowRankConv2d(layer, rank)
    w = layer.weight
    new = new.to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.first.weight.copy_(right.reshape(new.first.weight.shape))
        new.second.weight.copy_(left.reshape(new.second.weight.shape))
        if layer.bias is not None:
            new.second.bias.copy_(layer.bias)
    new.train(layer.training)
    return new
