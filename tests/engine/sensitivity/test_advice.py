"""A suggestion is checked by measurement against uniform and global L1, and never loses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nbcompress as nc
from nbcompress.engine.sensitivity.registry import latest_suggestion
from nbcompress.engine.sensitivity.result import SensitivityResult
from tests.helpers import assert_same_state, snapshot

RATIOS = [0.2, 0.4, 0.6, 0.8, 0.9, 0.95]


def uneven() -> nn.Sequential:
    """Three hidden layers of very different sizes, and a small head."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 8), nn.ReLU(), nn.Linear(8, 48), nn.ReLU(),
        nn.Linear(48, 4),
    )  # fmt: skip


def zeros(module: nn.Module) -> float:
    return float((module.weight == 0).float().mean())


def worst_layer(model: nn.Module) -> float:
    """A metric on which layers interact: only the most pruned layer counts.

    Alone, a layer pruned at r costs r² (so the curves favour pruning big layers hard);
    together, the cost is the largest r² — uniform ratios are the optimum.
    """
    hidden = [m for m in list(model)[:-1] if isinstance(m, nn.Linear)]
    return 1.0 - max(zeros(m) for m in hidden) ** 2


def test_a_suggestion_that_measures_worse_than_uniform_is_replaced_by_uniform() -> None:
    model = uneven()
    before = snapshot(model)
    result = nc.sensitivity(
        model, worst_layer, ratios=RATIOS, progress=False, layers=["0", "2", "4"]
    )
    curve_only = result.suggest(0.7, check=False)
    assert curve_only.refinement is None and curve_only.measured is None
    assert max(curve_only.ratios.values()) > 0.75  # the curves' choice is uneven
    checked = result.suggest(0.7)  # the sweep's own evaluate measures by default
    assert checked.chosen == "uniform L1"
    assert checked.ratios == pytest.approx(dict.fromkeys(["0", "2", "4"], 0.7), abs=0.02)
    assert checked.measured == pytest.approx(worst_layer_at(model, checked.ratios))
    text = str(checked)
    assert "uniform L1" in text and "over the better of uniform and global L1" in text
    assert checked.refinement.evaluations == 3
    assert latest_suggestion(model) is checked
    assert_same_state(model, before)  # every measurement was rolled back


def worst_layer_at(model: nn.Module, ratios: dict[str, float]) -> float:
    with nc.trial(model):
        nc.prune_ratios_(model, ratios)
        return worst_layer(model)


def test_a_good_curve_suggestion_is_kept_and_its_margin_stated(monkeypatch) -> None:
    model = uneven()
    x = torch.randn(32, 64)
    reference = model(x).detach()

    def fidelity(m: nn.Module) -> float:
        with torch.no_grad():
            return -float(((m(x) - reference) ** 2).mean())

    result = nc.sensitivity(model, fidelity, ratios=RATIOS, progress=False)
    checked = result.suggest(0.6)
    measured = {
        s["step"].removeprefix("candidate: "): s["measured"] for s in checked.refinement.steps
    }
    assert set(measured) == {"uniform L1", "global L1", "curve suggestion"}
    assert checked.chosen.removesuffix(", re-fitted") in measured
    assert checked.notes[0].startswith("Measured fidelity at the same sparsity: uniform L1")
    # The sweep recorded the batches fidelity() fed the model: re-fitted candidates are
    # measured too (LeNet-sized layers are cheap), and one is kept only if it is better.
    assert checked.notes[1].startswith("Re-fitted by least squares on the evaluation's inputs")
    assert checked.reconstruct and checked.measured > max(measured.values())
    assert checked.calibration is not None
    assert any(n.startswith("The target is a share of the") for n in checked.notes)
    assert f"{checked.chosen}, best measured: 6 evaluations" in str(checked)  # 3 plain + 3 re-fit
    plain = result.suggest(0.6, reconstruct=False)
    assert not plain.reconstruct and plain.measured == max(measured.values())
    assert plain.chosen in measured and plain.evaluations == 3


def test_proxy_sweeps_are_checked_on_the_proxy_and_loaded_results_are_not() -> None:
    model = uneven()
    x = torch.randn(16, 64)
    result = nc.sensitivity(model, example_inputs=x, ratios=RATIOS, progress=False)
    checked = result.suggest(0.5)
    assert checked.refinement is not None and 0 < checked.measured <= 1 + 1e-6
    data = result.to_dict()
    data.pop("format")
    loaded = SensitivityResult(**data)  # as loaded from JSON: attached to no model
    suggestion = loaded.suggest(0.5)
    assert suggestion.refinement is None


def test_what_the_target_is_a_share_of_and_unchecked_budgets_say_so() -> None:
    model = uneven()
    result = nc.sensitivity(
        model, worst_layer, ratios=RATIOS, progress=False, layers=["0", "2", "4"]
    )
    by_drop = result.suggest(max_drop=0.2)
    assert by_drop.refinement is None
    assert any("Not checked against uniform and global L1" in n for n in by_drop.notes)
    share = result.suggest(0.5, check=False).notes[0]
    assert "3 analysed layer(s)" in share and "output layer 6" in share
    with pytest.raises(TypeError, match="check: expected True, False or None"):
        result.suggest(0.5, check="yes")


def test_an_evaluate_that_raises_during_the_check_leaves_the_model_as_it_was() -> None:
    model = uneven()
    before = snapshot(model)
    calls = {"n": 0}

    def flaky(m: nn.Module) -> float:
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("data gone")
        return worst_layer(m)

    result = nc.sensitivity(
        model, worst_layer, ratios=RATIOS, progress=False, layers=["0", "2", "4"]
    )
    with pytest.raises(Exception, match="data gone"):
        result.suggest(0.7, evaluate=flaky)
    assert_same_state(model, before)


@pytest.mark.parametrize("bad", [0, 0.0, 1.0, 1.5, -0.1, float("nan")])
def test_a_target_outside_the_open_unit_interval_is_one_clear_line(bad: float) -> None:
    model = uneven()
    before = snapshot(model)
    result = nc.sensitivity(model, worst_layer, ratios=RATIOS, progress=False)
    with pytest.raises(ValueError, match=r"target_sparsity: .*(outside|prunes nothing)"):
        result.suggest(bad)
    assert_same_state(model, before)


def test_a_target_global_l1_cannot_reach_is_checked_against_uniform_alone() -> None:
    """Global L1 keeps 5% of every layer: at 96% it refuses, and the check goes on without it."""
    model = uneven()
    result = nc.sensitivity(model, worst_layer, ratios=[*RATIOS, 0.98, 0.99], progress=False)
    checked = result.suggest(0.96)
    names = [s["step"] for s in checked.refinement.steps]
    assert names == ["candidate: uniform L1", "candidate: curve suggestion"]
    assert any("No global L1 candidate" in n for n in checked.refinement.notes)


def test_a_wanda_sweep_is_checked_and_applied_with_wanda_masks() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 20) * torch.linspace(0.05, 5, 20)  # uneven input norms: wanda != L1
    model = nn.Sequential(
        nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
    )
    reference = model(x).detach()

    def fidelity(m: nn.Module) -> float:
        with torch.no_grad():
            return -float(((m(x) - reference) ** 2).mean())

    result = nc.sensitivity(model, fidelity, ratios=RATIOS, progress=False, method="wanda")
    suggestion = result.suggest(0.8, reconstruct=False)
    assert suggestion.method == "wanda"
    assert any("pruned with wanda" in n for n in suggestion.notes)
    report = nc.apply_suggestion_(model, suggestion)
    assert report.measured == pytest.approx(suggestion.measured)
    applied = {n: model.get_submodule(n).weight == 0 for n in ("0", "2")}
    nc.undo_(model)
    ratios = {n: r for n, r in suggestion.ratios.items() if r > 0}
    nc.prune_ratios_(model, ratios, method="wanda", example_inputs=[x])
    assert all(torch.equal(applied[n], model.get_submodule(n).weight == 0) for n in ratios)


def test_a_suggestion_says_when_the_model_changed_since_the_sweep() -> None:
    model = uneven()
    result = nc.sensitivity(model, worst_layer, ratios=RATIOS, progress=False)
    nc.prune_(model, 0.3)
    notes = result.suggest(0.7).notes
    assert any("The model changed since the sweep" in n for n in notes)
