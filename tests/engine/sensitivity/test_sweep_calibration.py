"""The sweep records what evaluate feeds the model: calibration, and the output layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nbcompress as nc
from nbcompress.engine.core.layers import output_layers
from nbcompress.engine.sensitivity.result import SensitivityResult
from tests.engine.core.test_heads import Branchy
from tests.helpers import assert_same_state, snapshot


def fidelity_of(model: nn.Module, x: torch.Tensor):
    reference = model(x).detach()

    def fidelity(m: nn.Module) -> float:
        with torch.no_grad():
            return -float(
                ((m(x[:6]) - reference[:6]) ** 2).mean() + ((m(x[6:]) - reference[6:]) ** 2).mean()
            )

    return fidelity


def test_evaluate_batches_become_calibration_and_reveal_the_head() -> None:
    torch.manual_seed(0)
    model = Branchy()  # torch.fx cannot trace it: only a forward pass finds its head
    x = torch.randn(10, 8)
    result = nc.sensitivity(model, fidelity_of(model, x), ratios=[0.5, 0.9], progress=False)
    assert [b.tolist() for b in result.calibration] == [x[:6].tolist(), x[6:].tolist()]
    assert output_layers(model).names == ("head",)
    assert "head" not in result.layers and "pooler" in result.layers
    assert any("Output layer head left alone" in n for n in result.notes)
    assert (
        "head"
        in nc.sensitivity(
            model, fidelity_of(model, x), ratios=[0.5], progress=False, include_output=True
        ).layers
    )


def test_a_wanda_sweep_calibrates_on_evaluate_inputs_and_saves_its_method(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )
    before = snapshot(model)
    x = torch.randn(12, 8)
    result = nc.sensitivity(
        model, fidelity_of(model, x), ratios=[0.5, 0.9], progress=False, method="wanda"
    )
    assert result.method == "wanda" and result.complete
    assert_same_state(model, before)
    path = tmp_path / "r.json"
    result.save(path)
    loaded = SensitivityResult.load(path)
    assert loaded.method == "wanda" and loaded.calibration is None  # batches are never saved
    with pytest.raises(ValueError, match="method"):
        nc.sensitivity(model, fidelity_of(model, x), progress=False, method="magic")
    assert_same_state(model, before)


def test_a_proxy_sweep_with_wanda_needs_its_input() -> None:
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="example_inputs"):
        nc.sensitivity(model, None, method="wanda", progress=False)
