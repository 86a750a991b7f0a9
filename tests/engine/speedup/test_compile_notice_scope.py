"""sparsify_, speedup and quantize_ each say at most one line about kernel compilation.

Every sparse forward inside them runs within one notice session (its depth is above 0),
so the kernels first compiled during the whole call are summed into one line at the end.
"""

from __future__ import annotations

import torch
from torch import nn

import nbcompress as nc
from nbcompress.kernels import notices


class _Depth(nn.Module):
    """Records the notice depth each time the model runs."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(notices.depth())
        return x


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8), _Depth()).eval()
    nc.prune_(model, 0.9)
    model[3].seen.clear()  # prune_ runs the model too (outside any notice session)
    return model


def test_speedup_and_sparsify_run_inside_one_notice_session():
    x = torch.randn(16, 64)
    for call in (lambda m: nc.speedup(m, x), lambda m: nc.sparsify_(m, x)):
        model = _model()
        call(model)
        assert model[3].seen and min(model[3].seen) >= 1


def test_quantize_runs_inside_one_notice_session():
    model = _model()
    nc.quantize_(model, "dynamic", example_inputs=torch.randn(16, 64))
    assert model[3].seen and min(model[3].seen) >= 1
    assert notices.depth() == 0  # closed again after the call
