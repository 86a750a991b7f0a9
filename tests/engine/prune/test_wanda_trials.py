"""Wanda and reconstruction in sensitivity trials, refinement and staged pruning."""

import pytest
import torch

import nbcompress as nc
from nbcompress.engine.prune.calibrate import calibration_inputs, collect_stats
from nbcompress.engine.prune.prune import prune_ratios_
from nbcompress.engine.sensitivity.entries import prune_in_trial
from nbcompress.engine.sensitivity.guard import layer_trial
from nbcompress.engine.sensitivity.refine import refine
from nbcompress.engine.sensitivity.staged import prune_to_
from tests.helpers import assert_same_state, mlp, snapshot


def test_a_trial_rescores_one_layer_from_statistics_collected_once():
    torch.manual_seed(0)
    model, x = mlp(), torch.randn(32, 16)
    layers = {n: model.get_submodule(n) for n in ("0", "2")}
    stats = collect_stats(model, calibration_inputs(x), layers)
    twin = mlp()
    twin.load_state_dict(model.state_dict())
    prune_ratios_(twin, {"2": 0.6}, method="wanda", example_inputs=x)
    saved = snapshot(model)
    with layer_trial(model, {"2": layers["2"]}) as trial:
        prune_in_trial(model, trial, {"2": 0.6}, "element", method="wanda", stats=stats)
        assert torch.equal(model[2].weight, twin[2].weight)
    assert_same_state(model, saved)


@pytest.mark.parametrize("granularity", ["block", "channel"])
def test_a_trial_with_wanda_units_matches_prune_ratios(granularity):
    torch.manual_seed(1)
    model, x = mlp(), torch.randn(32, 16)
    stats = collect_stats(model, calibration_inputs(x), {"0": model[0]})
    twin = mlp()
    twin.load_state_dict(model.state_dict())
    prune_ratios_(twin, {"0": 0.5}, method="wanda", example_inputs=x, granularity=granularity)
    with layer_trial(model, {"0": model[0]}) as trial:
        prune_in_trial(model, trial, {"0": 0.5}, granularity, method="wanda", stats=stats)
        assert torch.equal(model[0].weight, twin[0].weight)
        assert torch.equal(model[0].bias, twin[0].bias)


def test_a_wanda_trial_without_statistics_is_refused():
    model = mlp()
    with layer_trial(model, {"0": model[0]}) as trial, pytest.raises(ValueError, match="^stats:"):
        prune_in_trial(model, trial, {"0": 0.5}, "element", method="wanda")


def loss_on(x: torch.Tensor, dense: torch.nn.Module):
    with torch.no_grad():
        target = dense(x).clone()

    def evaluate(model):
        with torch.no_grad():
            return float((model(x) - target).square().mean())

    return evaluate


@pytest.mark.parametrize("reconstruct", [False, True])
def test_refine_measures_wanda_allocations_and_leaves_the_model(reconstruct):
    torch.manual_seed(2)
    model, x = mlp(), torch.randn(64, 16)
    saved = snapshot(model)
    evaluate = loss_on(x, model)
    kwargs = dict(budget=4, higher_is_better=False, layers=["0", "2"])
    plain = refine(model, evaluate, 0.6, **kwargs)
    wanda = refine(
        model, evaluate, 0.6, method="wanda", example_inputs=x, reconstruct=reconstruct, **kwargs
    )
    assert_same_state(model, saved)
    assert wanda.measured != plain.measured
    # What refine measured is what prune_ratios_ then gives.
    prune_ratios_(model, wanda.ratios, method="wanda", example_inputs=x, reconstruct=reconstruct)
    assert evaluate(model) == pytest.approx(wanda.measured, rel=1e-5)


def test_refine_with_wanda_needs_calibration_inputs():
    model = mlp()
    with pytest.raises(ValueError, match=r"^example_inputs: method='wanda' needs calibration"):
        refine(model, loss_on(torch.randn(4, 16), model), 0.5, method="wanda")


def test_prune_to_passes_the_method_to_its_stages_and_refinement(monkeypatch):
    from nbcompress.engine.sensitivity import staged

    torch.manual_seed(3)
    model, x = mlp(), torch.randn(64, 16)
    seen = []
    real = staged.prune_ratios_

    def spy(model, ratios, **kwargs):
        seen.append(kwargs)
        return real(model, ratios, **kwargs)

    monkeypatch.setattr(staged, "prune_ratios_", spy)
    # The sweep does not take method= yet (the lead wires sweep.py): L1 sweeps, wanda stages.
    monkeypatch.setattr(staged, "sensitivity", _l1_sweep(staged.sensitivity))
    saved = snapshot(model)
    prune_to_(
        model, loss_on(x, model), 0.5, stages=2, higher_is_better=False, progress=False,
        method="wanda", example_inputs=x, reconstruct=True, ratios=[0.25, 0.5, 0.75],
    )  # fmt: skip
    assert seen and all(k["method"] == "wanda" and k["reconstruct"] for k in seen)
    nc.undo_(model)
    assert_same_state(model, saved)


def _l1_sweep(real):
    def sweep(model, evaluate, **options):
        options.pop("method", None), options.pop("reconstruct", None)
        return real(model, evaluate, **options)

    return sweep
