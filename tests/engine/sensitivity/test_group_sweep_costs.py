"""A group sweep's params/MACs per group: what removing the whole group takes, at most the model.

A layer whose inputs and outputs are both in one group (a residual block's second conv)
shrinks quadratically with the group; extrapolating the first point linearly used to report
more parameters and MACs for such a group than the whole model has.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nbcompress.engine.sensitivity.removal import model_macs
from nbcompress.engine.sensitivity.sweep import sensitivity
from tests.engine.sensitivity.group_models import batch, res_cnn


class Residual(nn.Module):
    """c2 reads and writes the channels of c1 (the residual), so its weight is in×out coupled."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c3, self.fc = nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b1(self.c1(x)).relu()
        h = h + self.b2(self.c2(h)).relu()
        return self.fc(self.c3(h).relu().mean((2, 3)))


def sweep(model, x, ratios):
    return sensitivity(
        model, None, granularity="channel", remove=True, example_inputs=x, ratios=ratios,
        progress=False,
    )  # fmt: skip


def totals(model, x):
    return sum(p.numel() for p in model.parameters()), model_macs(model, (x,))


def test_a_group_coupled_in_and_out_costs_at_most_the_model_and_exactly_its_layers():
    model, x = residual()
    params, macs = totals(model, x)
    result = sweep(model, x, [0.1, 0.5])
    for root in result.layers:
        assert 0 < result.sizes[root] <= params, root
        assert 0 < result.macs[root] <= macs, root
    (root,) = [r for r in result.layers if r != "c3"]
    # The whole residual group takes c1, b1, c2, b2 and c3's weight: all but c3's bias and fc.
    kept = model.c3.bias.numel() + sum(p.numel() for p in model.fc.parameters())
    assert result.sizes[root] == params - kept
    fc_macs = x.shape[0] * model.fc.in_features * model.fc.out_features
    assert result.macs[root] == macs - fc_macs


def residual():
    torch.manual_seed(0)
    return Residual().eval(), torch.randn(4, 3, 16, 16)


@pytest.mark.parametrize(
    "make", [residual, lambda: (res_cnn(), batch())], ids=["residual", "res_cnn"]
)
def test_the_cost_does_not_depend_on_which_ratio_measured_it(make):
    model, x = make()
    params, macs = totals(model, x)
    small, large = sweep(model, x, [0.1]), sweep(model, x, [0.5])
    assert small.sizes == large.sizes
    assert small.macs == large.macs
    assert all(0 < s <= params for s in small.sizes.values())
    assert all(0 < m <= macs for m in small.macs.values())
