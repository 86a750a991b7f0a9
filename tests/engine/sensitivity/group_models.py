"""A small CNN with BatchNorm and a residual addition, for the group-sweep and removal tests."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ResCNN(nn.Module):
    """stem → residual block (two convs, BN, add) → strided conv → pooled Linear head.

    Coupled groups: the stem's channels (its BN, both residual operands, conv1's and conv3's
    inputs), conv1's (its BN, conv2's inputs) and conv3's (its BN, the head's inputs).
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 24, 3, padding=1, stride=2)
        self.bn3 = nn.BatchNorm2d(24)
        self.head = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        y = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(y)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.head(x.mean((2, 3)))


def res_cnn(seed: int = 0) -> ResCNN:
    """A seeded ResCNN in eval mode with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = ResCNN()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def batch(seed: int = 1, n: int = 8) -> torch.Tensor:
    """A seeded input batch for ResCNN."""
    return torch.randn(n, 3, 12, 12, generator=torch.Generator().manual_seed(seed))


def fidelity(model: nn.Module, x: torch.Tensor) -> callable:
    """``evaluate(m)``: minus the mean squared difference to ``model``'s output now."""
    with torch.no_grad():
        reference = model(x).clone()

    def evaluate(m: nn.Module) -> float:
        with torch.no_grad():
            return -float(((m(x) - reference) ** 2).mean())

    return evaluate


def param_ids(model: nn.Module) -> dict[str, int]:
    """Identity of every parameter by name (undo must restore the very objects)."""
    return {n: id(p) for n, p in model.named_parameters()}


def n_params(model: nn.Module) -> int:
    """Parameters of ``model`` (removal makes it smaller)."""
    return sum(p.numel() for p in model.parameters())


def with_model(shell):  # noqa: ANN001, ANN201 - an IPython shell, returned for the fixture
    """Put a seeded ResCNN ``model``, its batch ``x`` and ``fid`` (evaluate) in the namespace."""
    model, x = res_cnn(), batch()
    shell.user_ns.update(model=model, x=x, fid=fidelity(model, x))
    return shell


def run_magic(shell, line: str):  # noqa: ANN001, ANN201
    """``run_magic(shell, "prune model 0.5")``: a line magic by its full line."""
    name, _, rest = line.partition(" ")
    return shell.run_line_magic(name, rest)
