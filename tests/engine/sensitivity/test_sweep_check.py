"""SweepCheck (is the model still the swept one, and why not) and SettingCosts after changes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import nbcompress as nc
import nbcompress.engine.sensitivity.setting as setting_module
from nbcompress.engine.core.history import history_token
from nbcompress.engine.sensitivity.evaluate import layer_sparsity
from nbcompress.engine.sensitivity.setting import SettingCosts, SweepCheck, model_footprint
from nbcompress.engine.sensitivity.sweep import sensitivity
from tests.sensitivity_helpers import mlp_with_agreement


@pytest.fixture
def swept() -> tuple[nn.Module, object]:
    model, _, agreement = mlp_with_agreement()
    return model, sensitivity(model, agreement, ratios=[0.3, 0.6, 0.9], progress=False)


def test_the_swept_model_has_no_reason_also_after_prune_and_undo(swept):
    model, result = swept
    check = SweepCheck(result, model)
    assert check.reason() is None
    nc.prune_(model, 0.5)
    nc.undo_(model)
    assert check.reason() is None
    assert check.effective({"0": 0.3}) == {"0": 0.3}


def test_a_step_elsewhere_is_named_with_the_layer_that_changed(swept):
    model, result = swept
    check = SweepCheck(result, model)
    nc.prune_(model, 0.9)
    assert check.reason() == (
        "a prune step in another cell; 0 90.0% sparse (swept at 0.0%) and 1 more layer(s)"
    )
    nc.quantize_(model)
    assert check.reason().startswith("2 compression steps in another cell; 0 removed or replaced")


def test_own_steps_and_undone_steps_are_told_apart(swept):
    model, result = swept
    nc.prune_(model[2], 0.2, include_output=True)  # before the check: part of its start
    result.start["2"] = layer_sparsity(model[2], "element")  # as a sweep would record it
    check = SweepCheck(result, model)
    before = history_token(model)
    nc.prune_(model, {"0": 0.6})
    check.mark_own(before)
    assert check.reason() == "the setting applied here; 0 60.0% sparse (swept at 0.0%)"
    nc.undo_(model, all=True)
    assert check.reason() == "a step undone; 2 0.0% sparse (swept at 20.1%)"


def test_without_a_token_a_model_pruned_before_the_check_is_judged_by_its_sparsity(swept):
    model, result = swept
    nc.prune_(model, 0.5)
    check = SweepCheck(result, model)  # steps at sweep time unknown
    assert check.token is None
    assert "0 50.0% sparse (swept at 0.0%)" in check.reason()
    nc.undo_(model)
    assert check.reason() is None  # no "a step undone" false alarm


def test_a_token_from_sweep_time_sees_steps_taken_before_the_check(swept):
    model, result = swept
    token = history_token(model)
    nc.quantize_(model)
    nc.undo_(model)
    nc.prune_(model, {"0": 0.0001})  # changes nothing measurable at this size
    assert SweepCheck(result, model).reason() is None  # without the token: unseen
    assert SweepCheck(result, model, token).reason() == "a prune step in another cell"


def test_effective_ratios_never_go_below_the_sparsity_now(swept):
    model, result = swept
    check = SweepCheck(result, model)
    nc.prune_(model, 0.6)
    assert check.effective({"0": 0.3, "2": 0.8}) == pytest.approx({"0": 0.6, "2": 0.8}, abs=1e-3)
    with torch.no_grad():
        model[0].weight.zero_()
    assert check.effective({"0": 0.3}) == {"0": 0.9999}  # a ratio stays below 1


def test_setting_costs_are_exact_for_a_layer_already_sparser_than_its_ratio(swept):
    model, _ = swept
    costs = SettingCosts(model)
    nc.prune_(model, 0.6)
    for ratios in ({"0": 0.3, "2": 0.2}, {"0": 0.8, "2": 0.5}):
        twin = copy.deepcopy(model)
        nc.prune_(twin, ratios)
        assert costs.setting(ratios) == model_footprint(twin), ratios


def test_setting_costs_come_back_with_an_undo_without_measuring_again(swept, monkeypatch):
    model, _ = swept
    measured: list[object] = []
    real = setting_module.prune_ratios_

    def counted(*args, **kwargs):
        measured.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(setting_module, "prune_ratios_", counted)
    costs = SettingCosts(model)
    ratios = {"0": 0.5, "2": 0.7}
    dense = costs.setting(ratios)
    assert len(measured) == 2
    nc.prune_(model, 0.3)
    costs.setting(ratios)
    assert len(measured) == 4  # another model: measured anew
    nc.undo_(model)
    assert costs.setting(ratios) == dense and len(measured) == 4  # kept for its history
    with torch.no_grad():
        model[0].weight[:4] = 0  # an edit no step records
    costs.invalidate()
    twin = copy.deepcopy(model)
    nc.prune_(twin, ratios)
    assert costs.setting(ratios) == model_footprint(twin) and len(measured) == 6
