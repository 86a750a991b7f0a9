"""Staged sensitivity pruning (prune_to_): one undoable step, all-or-nothing."""

import pytest
import torch

import nbcompress as nc
from nbcompress.engine.core import history
from nbcompress.engine.sensitivity.evaluate import EvaluationError
from nbcompress.engine.sensitivity.registry import latest, latest_suggestion
from nbcompress.engine.sensitivity.staged import stage_targets
from tests.helpers import assert_same_state, snapshot, zero_fraction
from tests.sensitivity_helpers import mlp_with_agreement

RATIOS = [0.2, 0.4, 0.6, 0.8, 0.9]


@pytest.fixture
def setup():
    return mlp_with_agreement()


def overall_sparsity(model, names=None):
    """Zero share of the Linear weights, or of the layers named (those staged pruning prunes)."""
    weights = [
        m.weight
        for n, m in model.named_children()
        if isinstance(m, torch.nn.Linear) and (names is None or n in names)
    ]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def test_stage_targets_halve_first_then_fall_geometrically_in_density_or_follow_the_list():
    assert stage_targets(0.9, 1) == [0.9]
    assert stage_targets(0.9, 2) == [0.5, 0.9]
    targets = stage_targets(0.9, 5)
    assert targets[0] == 0.5 and targets[-1] == 0.9
    densities = [1 - t for t in targets]
    shares = [b / a for a, b in zip(densities, densities[1:], strict=False)]
    assert shares == pytest.approx([0.2**0.25] * 4, abs=1e-5)  # same share removed each stage
    # Below half the weights: geometric from the dense model.
    low = [1 - t for t in stage_targets(0.4, 3)]
    assert [b / a for a, b in zip([1.0, *low], low, strict=False)] == pytest.approx(
        [0.6 ** (1 / 3)] * 3, abs=1e-5
    )
    assert stage_targets(0.8, [0.5, 0.7]) == [0.5, 0.7, 0.8]
    assert stage_targets(0.8, [0.5, 0.8]) == [0.5, 0.8]
    with pytest.raises(ValueError, match="stages: .* must ascend and stay below"):
        stage_targets(0.8, [0.7, 0.5])
    with pytest.raises(ValueError, match="stages: .* must ascend and stay below"):
        stage_targets(0.6, [0.5, 0.7])
    with pytest.raises(ValueError, match="stages: expected at least 1"):
        stage_targets(0.8, 0)
    with pytest.raises(TypeError, match="stages: expected a number of stages or a list"):
        stage_targets(0.8, "4")
    with pytest.raises(ValueError, match="target_sparsity"):
        stage_targets(1.2, 3)


def test_prune_to_reaches_the_target_as_one_step_and_undo_restores_bit_exactly(setup):
    model, _, agreement = setup
    saved = snapshot(model)
    report = nc.prune_to_(model, agreement, 0.7, stages=3, ratios=RATIOS, progress=False)
    assert [row["stage"] for row in report.stages] == [1, 2, 3]
    assert [row["target"] for row in report.stages] == stage_targets(0.7, 3)
    assert all(row["sparsity"] >= row["target"] - 1e-9 for row in report.stages)
    # The target is a share of the layers pruned: the output layer is left alone by default.
    assert set(report.ratios) == {"0", "2"} and zero_fraction(model[4].weight) == 0
    pruned = overall_sparsity(model, report.ratios)
    assert pruned == pytest.approx(report.stages[-1]["sparsity"], abs=0.01)
    assert pruned >= 0.7 - 0.01
    for name, ratio in report.ratios.items():
        assert zero_fraction(model.get_submodule(name).weight) == pytest.approx(ratio, abs=0.01)
    assert report.measured == agreement(model)
    assert report.evaluations > 3 * len(RATIOS)
    assert "Staged sensitivity pruning to sparsity 70.0% in 3 stage(s)" in str(report)
    assert "measured" in report._repr_html_()
    assert [step.name for step in nc.history(model)] == ["prune"]
    assert "in 3 stage(s)" in nc.history(model)[0].detail
    # The last suggestion was for an intermediate model: %prune --suggested must not reuse it.
    assert latest_suggestion(model) is None
    nc.undo_(model)
    assert_same_state(model, saved)
    assert nc.history(model) == []


def test_each_stage_sweeps_the_model_pruned_by_the_previous_stages(setup):
    model, _, agreement = setup
    report = nc.prune_to_(model, agreement, 0.6, stages=[0.4], ratios=RATIOS, progress=False)
    first = report.stages[0]
    assert first["target"] == 0.4 and report.stages[1]["target"] == 0.6
    last_sweep = report.result
    assert latest(model) is last_sweep
    # The last sweep started from the first stage's ratios, not from the dense model.
    assert sum(last_sweep.start.values()) > 0
    assert last_sweep.sparsity_of({}) == pytest.approx(first["sparsity"], abs=0.01)


@pytest.mark.parametrize("fail_at", ["second sweep", "second measurement"])
def test_a_failure_in_any_stage_rolls_every_stage_back(setup, fail_at):
    model, x, agreement = setup
    saved = snapshot(model)
    before = nc.sensitivity(model, agreement, ratios=[0.5], progress=False)
    calls, measurements = [], []
    # Baseline + layers × ratios of the dense model (2 layers: the output layer is left alone).
    sweep_calls = 1 + 2 * len(RATIOS)

    def flaky(m):
        calls.append(1)
        # Outside a sweep's trial only the staged transaction is open: a measurement.
        measurements.extend([1] if len(history._ACTIVE[m]) == 1 else [])
        if fail_at == "second sweep" and len(calls) == sweep_calls + 3:
            raise RuntimeError("validation data gone")
        if fail_at == "second measurement" and len(measurements) == 2:
            raise RuntimeError("validation data gone")
        return agreement(m)

    with pytest.raises(EvaluationError, match="validation data gone"):
        nc.prune_to_(model, flaky, 0.6, stages=[0.4], ratios=RATIOS, progress=False)
    assert len(calls) > sweep_calls + 1  # the first stage really was applied, then undone
    assert len(measurements) == (1 if fail_at == "second sweep" else 2)
    assert_same_state(model, saved)
    assert nc.history(model) == []
    assert latest(model) is before  # the registry does not point at a rolled-back sweep


@pytest.mark.parametrize("where", ["sweep", "measurement"])
def test_ctrl_c_in_a_later_stage_rolls_everything_back_and_propagates(setup, where):
    model, _, agreement = setup
    saved = snapshot(model)
    calls = []
    sweep_calls = 1 + 2 * len(RATIOS)  # as above: 2 layers swept
    # The sweep turns Ctrl-C into a partial result; prune_to_ must still stop and undo.
    measurements = []

    def interrupted(m):
        calls.append(1)
        measurements.extend([1] if len(history._ACTIVE[m]) == 1 else [])
        if where == "sweep" and len(calls) == sweep_calls + 5:
            raise KeyboardInterrupt
        if where == "measurement" and len(measurements) == 2:
            raise KeyboardInterrupt
        return agreement(m)

    with pytest.raises(KeyboardInterrupt):
        nc.prune_to_(model, interrupted, 0.6, stages=[0.4], ratios=RATIOS, progress=False)
    assert len(calls) > sweep_calls + 1
    assert len(measurements) == (1 if where == "sweep" else 2)
    assert_same_state(model, saved)
    assert nc.history(model) == []


def test_proxy_metric_is_measured_against_the_unpruned_model(setup, capsys):
    model, x, _ = setup
    report = nc.prune_to_(model, None, 0.5, stages=2, ratios=RATIOS, example_inputs=x)
    assert report.metric.startswith("proxy ") and any("Proxy metric" in n for n in report.notes)
    measured = [row["measured"] for row in report.stages]
    # Measured against the dense output each time, so pruning more can only lose agreement
    # here; a per-stage reference would restart at 1.0.
    assert 0 < measured[-1] < 1 and report.baseline == pytest.approx(1.0)
    out = capsys.readouterr()
    # Progress is normal output (stdout), never the stderr box of a notebook.
    assert "stage 2/2: sparsity" in out.out and "prune_to_: 2 stages in" in out.out
    assert "prune_to_" not in out.err


def test_unreachable_stage_target_is_one_clear_error_with_the_model_untouched(setup):
    model, _, agreement = setup
    saved = snapshot(model)
    with pytest.raises(ValueError, match="stage 1 of 1: target_sparsity: 95.0% cannot be"):
        nc.prune_to_(model, agreement, 0.95, stages=1, ratios=[0.5, 0.9], progress=False)
    assert_same_state(model, saved)
    assert nc.history(model) == []
