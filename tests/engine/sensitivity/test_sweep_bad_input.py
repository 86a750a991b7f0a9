"""Bad evaluate results and bad example inputs: one line naming the argument, model untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nbcompress as nc
from nbcompress.engine.sensitivity.guard import Fingerprint


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize(
    ("evaluate", "error", "match"),
    [
        (lambda m: float("nan"), ValueError, r"^evaluate: returned nan on the unpruned model"),
        (lambda m: "0.9", TypeError, r"^evaluate: .* returned str '0.9'; it must return one"),
        (lambda m: torch.ones(3), TypeError, r"^evaluate: .* returned Tensor"),
    ],
)
def test_a_bad_evaluate_result_is_one_line_and_the_model_is_untouched(evaluate, error, match):
    model = _model()
    fingerprint = Fingerprint.of(model)
    with pytest.raises(error, match=match) as info:
        nc.sensitivity(model, evaluate, ratios=[0.5], progress=False)
    assert "\n" not in str(info.value)
    assert not fingerprint.changed_in(model)


def test_nan_at_a_pruned_point_is_recorded_as_collapsed():
    model = _model()
    fingerprint = Fingerprint.of(model)
    dense = model[2].weight.detach().clone()

    def accuracy(m):  # breaks once the last layer is pruned hard
        zeros = int((m[2].weight == 0).sum()) - int((dense == 0).sum())
        return float("nan") if zeros > 12 else 0.9

    r = nc.sensitivity(model, accuracy, ratios=[0.3, 0.9], include_output=True, progress=False)
    assert r.curves["2"][0] == 0.9 and r.curves["2"][1] != r.curves["2"][1]
    assert any("2: evaluate returned NaN at ratio 0.9" in n for n in r.notes)
    assert r.complete and not fingerprint.changed_in(model)


def test_a_wrongly_shaped_proxy_input_names_example_inputs():
    model = _model()
    fingerprint = Fingerprint.of(model)
    with pytest.raises(ValueError, match=r"^example_inputs: the model failed") as info:
        nc.sensitivity(model, example_inputs=torch.randn(2, 5), progress=False)
    assert "\n" not in str(info.value)
    assert not fingerprint.changed_in(model)
