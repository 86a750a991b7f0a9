"""The explorer's Check button measures a suggestion against uniform and global L1."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nbcompress
from nbcompress import zoo
from nbcompress.notebook.widgets import SensitivityExplorer
from tests.helpers import assert_same_state, snapshot

RATIOS = [0.3, 0.5, 0.7, 0.8, 0.9, 0.95]


@pytest.fixture(scope="module")
def setup():
    data = zoo.load_digits(8, seed=0)
    torch.manual_seed(0)
    model = zoo.train(zoo.LeNet300(), data.x_train, data.y_train, epochs=4, seed=0)
    x, y = data.x_test[:200], data.y_test[:200]

    def accuracy(m: nn.Module) -> float:
        return zoo.accuracy(m, x, y)

    return model, accuracy


def test_check_measures_against_the_baselines_and_apply_uses_its_choice(setup):
    model, accuracy = setup
    result = nbcompress.sensitivity(model, accuracy, ratios=RATIOS, progress=False)
    assert "fc3" not in result.layers  # the output layer is left alone, as %prune leaves it
    explorer = SensitivityExplorer(result, model, accuracy)
    before = snapshot(model)
    explorer.target_value.value = 0.8  # typing a target measures nothing
    assert result.evaluations == 1 + len(result.layers) * len(RATIOS)
    explorer.check_button.click()
    assert "Measured accuracy at the same sparsity" in explorer.status.value
    assert "uniform L1" in explorer.status.value and "global L1" in explorer.status.value
    assert_same_state(model, before)  # measuring changed nothing
    checked = nbcompress.engine.sensitivity.registry.latest_suggestion(model)
    assert explorer.ratios == pytest.approx({n: round(r, 4) for n, r in checked.ratios.items()})
    explorer.apply_button.click()
    step = nbcompress.history(model)[-1]
    assert step.name == "prune"
    assert ("reconstruct" in step.detail) == checked.reconstruct
    measured = accuracy(model)
    assert measured == pytest.approx(checked.measured, abs=1e-9)  # what Check measured
    nbcompress.undo_(model)
    assert_same_state(model, before)


def test_check_needs_a_sparsity_target(setup):
    model, accuracy = setup
    result = nbcompress.sensitivity(model, accuracy, ratios=RATIOS, progress=False)
    explorer = SensitivityExplorer(result, model, accuracy)
    explorer.target_kind.value = "max_drop"
    explorer.check_button.click()
    assert "switch the target to sparsity" in explorer.status.value


def test_check_works_on_a_loaded_result_with_the_explorers_model(setup, tmp_path):
    model, accuracy = setup
    result = nbcompress.sensitivity(model, accuracy, ratios=RATIOS, progress=False)
    path = tmp_path / "sweep.json"
    result.save(path)
    loaded = nbcompress.SensitivityResult.load(path)  # attached to no model
    explorer = SensitivityExplorer(loaded, model, accuracy)
    before = snapshot(model)
    explorer.target_value.value = 0.8
    explorer.check_button.click()
    assert "Measured accuracy at the same sparsity" in explorer.status.value
    assert_same_state(model, before)
