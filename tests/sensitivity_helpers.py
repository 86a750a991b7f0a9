"""A small model with a metric that pruning can really lower, for sensitivity tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tests.helpers import mlp


def mlp_with_agreement() -> tuple[nn.Sequential, torch.Tensor, Callable[[nn.Module], float]]:
    """An MLP, an input, and the fraction of rows whose argmax still matches the dense model."""
    model = mlp()
    x = torch.randn(64, 16)
    target = model(x).argmax(1).detach()

    def agreement(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m(x).argmax(1) == target).float().mean())

    return model, x, agreement
