"""Item 6 end to end: remove_ of channels that were already zeroed leaves the output unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nbcompress.engine.core.history import history, undo_

remove_ = pytest.importorskip("nbcompress.engine.structural.remove").remove_

ZEROED = [1, 3, 4, 6]  # a quarter of 16 channels


def _zeroed(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Zero channels the way masks do, so that BatchNorm emits only its shift there.

    The kept channels get large weights so that group L1 ranks the zeroed ones lowest.
    """
    with torch.no_grad():
        conv.weight.mul_(100.0)
        conv.weight[ZEROED] = 0
        if conv.bias is not None:
            conv.bias[ZEROED] = 0
        bn.weight.fill_(5.0)
        bn.weight[ZEROED] = 0
        bn.bias.uniform_(0.5, 1.5)  # positive: non-zero after the ReLU
        bn.running_mean.uniform_(-1.0, 1.0)
        bn.running_var.uniform_(0.5, 2.0)


def _net(k: int, padding: int) -> nn.Sequential:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 8, k, padding=padding),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    _zeroed(model[0], model[1])
    return model.eval()


X = torch.randn(4, 3, 8, 8)


def test_removing_zeroed_channels_leaves_the_output_unchanged() -> None:
    model = _net(k=1, padding=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = model(X)
    remove_(model, {"0": 0.25}, example_inputs=X)
    assert model[0].out_channels == 12 and model[3].in_channels == 12
    torch.testing.assert_close(model(X), expected, rtol=1e-5, atol=1e-5)
    assert any("folded the constant values of 4" in n for n in history(model)[-1].info["notes"])
    undo_(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_padded_consumer_reports_the_change_it_causes() -> None:
    model = _net(k=3, padding=1)
    expected = model(X)
    remove_(model, {"0": 0.25}, example_inputs=X)
    notes = history(model)[-1].info["notes"]
    [note] = [n for n in notes if "zero-padded" in n]
    assert note.startswith("3: 4 removed input channel(s)")
    assert (model(X) - expected).abs().max() > 1e-3  # the note is about a real change
