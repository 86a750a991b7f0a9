"""Small models for the structural-removal core tests (BN, residual, grouped, concat, flatten)."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """Conv+BN stem, a residual block, a grouped conv, a concat, a depthwise conv, 2 Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(16)
        self.g = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.b1 = nn.Conv2d(16, 8, 1)
        self.b2 = nn.Conv2d(16, 8, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(16 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.bn_a(self.a(x)) + x)
        x = torch.relu(self.g(x))
        x = torch.cat([self.b1(x), self.b2(x)], 1)
        x = torch.relu(self.dw(x))
        x = torch.flatten(self.pool(x), 1)
        return self.fc2(torch.relu(self.fc1(x)))


def tiny() -> tuple[TinyNet, torch.Tensor]:
    """A seeded TinyNet with non-trivial BN statistics, and an input batch."""
    torch.manual_seed(0)
    model = TinyNet()
    with torch.no_grad():
        for bn in (model.bn, model.bn_a):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
    return model.eval(), torch.randn(2, 3, 16, 16)


def state(model: nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    """Every parameter and buffer: object id and a copy of the value."""
    return {k: (id(v), v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()}


def same_state(model: nn.Module, saved: dict[str, tuple[int, torch.Tensor]]) -> bool:
    """Whether the model holds the same objects with the same values (bit-exact)."""
    now = model.state_dict(keep_vars=True)
    if now.keys() != saved.keys():
        return False
    return all(
        id(v) == saved[k][0] and v.shape == saved[k][1].shape and torch.equal(v, saved[k][1])
        for k, v in now.items()
    )
