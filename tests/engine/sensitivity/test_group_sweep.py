"""Sensitivity over coupled channel groups (issue 13 item 5): sweep, suggestion, apply."""

from __future__ import annotations

import copy

import pytest

import nbcompress as nc
from nbcompress.engine.sensitivity.result import SensitivityResult
from nbcompress.engine.sensitivity.suggestion import apply_suggestion_
from nbcompress.engine.sensitivity.sweep import sensitivity
from nbcompress.engine.structural.remove import remove_
from tests.engine.sensitivity.group_models import batch, fidelity, param_ids, res_cnn
from tests.helpers import assert_same_state, snapshot

RATIOS = [0.25, 0.5]


@pytest.fixture
def setup():
    model, x = res_cnn(), batch()
    return model, x, fidelity(model, x)


def sweep(model, x, evaluate, **options):
    return sensitivity(
        model, evaluate, granularity="channel", remove=True, example_inputs=x, ratios=RATIOS,
        progress=False, **options,
    )  # fmt: skip


def test_a_group_sweep_has_one_entry_per_coupled_group_and_leaves_the_model_bit_exact(setup):
    model, x, evaluate = setup
    saved, ids = snapshot(model), param_ids(model)
    result = sweep(model, x, evaluate)
    assert result.remove and result.complete
    # One entry per group named by its root; the classifier's outputs are never swept.
    assert {"conv1", "conv2", "conv3"} <= set(result.layers)
    assert "head" not in result.layers
    assert all(v is not None for curve in result.curves.values() for v in curve)
    assert all(result.sizes[n] > 0 for n in result.layers)
    assert all(result.macs[n] and result.macs[n] > 0 for n in result.layers)
    assert_same_state(model, saved)
    assert param_ids(model) == ids
    assert nc.history(model) == []


def test_each_point_is_the_metric_of_the_model_with_that_group_physically_removed(setup):
    model, x, evaluate = setup
    result = sweep(model, x, evaluate)
    for root in ("conv2", "conv1"):
        for i, ratio in enumerate(RATIOS):
            removed = copy.deepcopy(model)
            remove_(removed, {root: ratio}, example_inputs=x)
            assert sum(p.numel() for p in removed.parameters()) < sum(
                p.numel() for p in model.parameters()
            )
            assert result.curves[root][i] == evaluate(removed)


def test_the_residual_group_takes_more_parameters_than_conv1s(setup):
    # The residual group (rooted at conv2) couples the stem, both residual operands and
    # their BNs, and the inputs of conv1 and conv3.
    model, x, evaluate = setup
    result = sweep(model, x, evaluate)
    assert result.sizes["conv2"] > result.sizes["conv1"]


def test_remove_needs_an_example_input_and_channel_granularity(setup):
    model, x, evaluate = setup
    saved = snapshot(model)
    with pytest.raises(ValueError, match=r"^example_inputs: .*remove=True"):
        sensitivity(model, evaluate, granularity="channel", remove=True, progress=False)
    with pytest.raises(ValueError, match=r"^remove: .*granularity='channel'"):
        sensitivity(model, evaluate, remove=True, example_inputs=x, progress=False)
    with pytest.raises(ValueError, match=r"^remove: "):
        sensitivity(
            model, evaluate, granularity="channel", remove=True, example_inputs=x,
            reconstruct=True, progress=False,
        )  # fmt: skip
    assert_same_state(model, saved)


def test_the_suggestion_is_checked_against_uniform_removal_and_applied_by_removal(setup):
    model, x, evaluate = setup
    saved, ids = snapshot(model), param_ids(model)
    before = sum(p.numel() for p in model.parameters())
    result = sweep(model, x, evaluate)
    suggestion = result.suggest(0.3)
    assert suggestion.remove
    assert suggestion.chosen in ("curve suggestion", "uniform removal")
    assert "uniform removal" in suggestion.notes[0] and "global L1 is not" in suggestion.notes[0]
    assert_same_state(model, saved)  # the check rolled its removals back
    report = apply_suggestion_(model, evaluate=evaluate)
    assert nc.history(model)[-1].name == "remove"
    # The suggestion's count is what the model really lost, measured before applying.
    assert suggestion.removed == before - sum(p.numel() for p in model.parameters()) > 0
    assert any(n.startswith(f"Applying removes {suggestion.removed:,} of") for n in report.notes)
    assert model(x).shape == (8, 10)
    # The check measured exactly what applying keeps.
    assert report.measured == pytest.approx(suggestion.measured, abs=0, rel=0)
    nc.undo_(model)
    assert_same_state(model, saved)
    assert param_ids(model) == ids


def test_a_group_suggestion_refuses_the_measured_refinement(setup):
    model, x, evaluate = setup
    result = sweep(model, x, evaluate)
    with pytest.raises(ValueError, match=r"^refine: .*group sweep"):
        result.suggest(0.3, evaluate=evaluate, refine=10)


def test_a_proxy_group_sweep_runs_without_an_evaluate_function(setup):
    model, x, _ = setup
    saved = snapshot(model)
    result = sweep(model, x, None)
    assert result.proxy and result.remove
    assert all(v is not None and v <= result.baseline + 1e-6 for v in result.curves["conv2"])
    assert_same_state(model, saved)


def test_a_saved_group_sweep_loads_as_a_group_sweep(setup, tmp_path):
    model, x, evaluate = setup
    result = sweep(model, x, evaluate)
    result.save(tmp_path / "r.json")
    loaded = SensitivityResult.load(tmp_path / "r.json")
    assert loaded.remove is True
    assert "removing coupled channel groups" in str(loaded)
    axes = loaded.plot().axes[0]
    assert axes.get_xlabel() == "fraction of the group's channels removed"
    assert axes.get_title() == "Sensitivity to removing coupled channel groups"


def test_the_ratio_grid_rounds_to_the_group_step_and_repeats_are_evaluated_once(setup):
    # 0.25 and 0.3 of 16 channels both remove 4: the second point is not evaluated again.
    model, x, evaluate = setup
    calls = []

    def counting(m):
        calls.append(1)
        return evaluate(m)

    result = sensitivity(
        model, counting, granularity="channel", remove=True, example_inputs=x,
        ratios=[0.25, 0.26], layers="conv1", progress=False,
    )  # fmt: skip
    assert result.layers == ["conv1"]
    assert result.curves["conv1"][0] == result.curves["conv1"][1]
    assert result.evaluations == 2 == len(calls)  # baseline + one point


def test_a_group_sweep_builds_the_dependency_graph_once(setup, monkeypatch):
    from nbcompress.engine.structural import graph

    model, x, evaluate = setup
    builds, real = [], graph.run_bounded

    def counting(*args, **kwargs):
        builds.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(graph, "run_bounded", counting)
    result = sweep(model, x, evaluate)
    assert result.evaluations > 3
    assert len(builds) == 1


def raising_at_third_call(evaluate, error: BaseException):
    """``evaluate`` that raises ``error`` at its third call (two points in)."""
    calls = []

    def wrapped(m):
        calls.append(1)
        if len(calls) == 3:
            raise error
        return evaluate(m)

    return wrapped


@pytest.mark.parametrize("error", [RuntimeError("validation data gone"), KeyboardInterrupt()])
def test_a_failure_mid_sweep_keeps_the_partial_result_and_restores_the_model(setup, error):
    from nbcompress.engine.sensitivity.evaluate import EvaluationError

    model, x, evaluate = setup
    saved, ids = snapshot(model), param_ids(model)
    failing = raising_at_third_call(evaluate, error)
    if isinstance(error, KeyboardInterrupt):  # Ctrl-C returns the partial result
        partial = sweep(model, x, failing)
        assert any("The model is restored (verified by checksum)." in n for n in partial.notes)
    else:
        with pytest.raises(EvaluationError, match="validation data gone") as err:
            sweep(model, x, failing)
        partial = err.value.result
    assert partial.remove and not partial.complete
    assert partial.curves[partial.layers[0]][0] is not None
    assert_same_state(model, saved)
    assert param_ids(model) == ids
