"""A cheap, seeded evaluate for search tests: how close the pruned outputs stay to dense."""

from __future__ import annotations

import torch
from torch import nn


class Fidelity:
    """``-MSE`` between the model's outputs and its dense outputs on fixed random batches."""

    def __init__(self, model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(32, *shape, generator=gen)
        with torch.no_grad():
            self.dense = model(self.x)
        self.calls = 0

    def __call__(self, model: nn.Module) -> float:
        self.calls += 1
        with torch.no_grad():
            return -float(((model(self.x) - self.dense) ** 2).mean())
