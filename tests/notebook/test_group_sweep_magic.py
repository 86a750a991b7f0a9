"""``%sensitivity --remove`` (a sweep over coupled groups), ``%prune --suggested`` after it,
and the explorer applying a group setting by removal and undoing it (Python API)."""

from __future__ import annotations

import copy

import pytest
from IPython.core.error import UsageError

import nbcompress as nc
from nbcompress.engine.sensitivity.registry import latest, latest_suggestion
from nbcompress.engine.structural.remove import remove_
from nbcompress.notebook.widgets import SensitivityExplorer
from tests.engine.sensitivity.group_models import (
    batch,
    fidelity,
    n_params,
    param_ids,
    res_cnn,
    run_magic,
    with_model,
)
from tests.helpers import assert_same_state, snapshot


@pytest.fixture
def ns(shell):
    return with_model(shell)


magic = run_magic


def test_sensitivity_remove_sweeps_groups_then_prune_suggested_removes_then_undo(ns, capsys):
    model = ns.user_ns["model"]
    saved, ids, before = snapshot(model), param_ids(model), n_params(model)
    result = magic(
        ns, "sensitivity model --eval fid --granularity channel --remove --input x "
        "--ratios 0.25,0.5 --target-sparsity 0.3 --no-widget",
    )  # fmt: skip
    assert result.remove and latest(model) is result
    assert "head" not in result.layers and "conv2" in result.layers
    assert_same_state(model, saved)
    out = capsys.readouterr().out
    assert "%prune model --suggested" in out
    suggestion = latest_suggestion(model)
    assert suggestion.remove
    report = magic(ns, "prune model --suggested")
    assert nc.history(model)[-1].name == "remove"
    assert n_params(model) < before
    assert report.notes[0].startswith("Parameters ")  # sizes before → after first
    assert any(n.startswith("evaluate: predicted") for n in report.notes)
    assert " of 56 channels removed in " in report.title  # remove_'s detail kept in the step
    assert sum("rebuild any optimizer" in n for n in [report.title, *report.notes]) == 1
    magic(ns, "undo model")
    assert_same_state(model, saved)
    assert param_ids(model) == ids


def test_remove_implies_channel_granularity(ns):
    result = magic(ns, "sensitivity model --eval fid --remove --input x --ratios 0.5 --no-widget")
    assert result.remove and result.granularity == "channel"


def test_sensitivity_apply_with_remove_applies_by_removal(ns):
    model = ns.user_ns["model"]
    before = n_params(model)
    line = "sensitivity model --eval fid --remove --input x --ratios 0.25,0.5"
    magic(ns, f"{line} --target-sparsity 0.3 --apply")
    assert nc.history(model)[-1].name == "remove"
    assert n_params(model) < before


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("--eval fid --remove", r"^--input: --remove traces the model"),
        ("--eval fid --remove --input x --granularity element", r"^--granularity element: "),
        (
            "--eval fid --remove --input x --target-sparsity 0.5 --stages 3 --apply",
            r"^--stages: not available with --remove",
        ),
        ("--eval fid --remove --input x --types Conv2d", r"^--types: not available"),
        ("--eval fid --remove --input x --reconstruct", r"^--reconstruct: not available"),
    ],
)
def test_bad_group_sweep_options_are_one_line_and_leave_the_model_alone(ns, options, message):
    saved = snapshot(ns.user_ns["model"])
    with pytest.raises(UsageError, match=message):
        magic(ns, f"sensitivity model {options}")
    assert latest(ns.user_ns["model"]) is None  # no sweep ran
    assert_same_state(ns.user_ns["model"], saved)


def test_explorer_applies_a_group_setting_by_removal_and_undoes_it():
    model, x = res_cnn(), batch()
    evaluate = fidelity(model, x)
    saved, ids, before = snapshot(model), param_ids(model), n_params(model)
    result = nc.sensitivity(
        model, evaluate, granularity="channel", remove=True, example_inputs=x,
        ratios=[0.25, 0.5], progress=False,
    )  # fmt: skip
    explorer = SensitivityExplorer(result, model, evaluate, example_inputs=x)
    explorer.set_ratios({"conv2": 0.5, "conv1": 0.25})
    measured = explorer.evaluate_setting()
    expected = copy.deepcopy(model)
    remove_(expected, {"conv2": 0.5, "conv1": 0.25}, example_inputs=x)
    assert measured == evaluate(expected)
    # The readout counts the setting removed as a whole (coupled groups do not add up).
    assert f"{n_params(expected):,}" in explorer.readout.value
    assert "swept group(s)" in explorer.readout.value
    assert_same_state(model, saved)  # Evaluate and the readout leave the model as it was
    explorer.apply()
    assert "applied" in explorer.status.value
    assert nc.history(model)[-1].name == "remove"
    assert n_params(model) == n_params(expected) < before
    assert model.stem.out_channels == 8
    explorer.undo()
    assert "undone: remove" in explorer.status.value
    assert_same_state(model, saved)
    assert param_ids(model) == ids
    explorer.close()


def test_explorer_check_of_a_group_sweep_measures_against_uniform_removal():
    model, x = res_cnn(), batch()
    evaluate = fidelity(model, x)
    saved = snapshot(model)
    result = nc.sensitivity(
        model, evaluate, granularity="channel", remove=True, example_inputs=x,
        ratios=[0.25, 0.5], progress=False,
    )  # fmt: skip
    explorer = SensitivityExplorer(result, model, evaluate, example_inputs=x)
    explorer.target_value.value = 0.3
    explorer.check_button.click()
    assert "uniform removal" in explorer.status.value
    assert_same_state(model, saved)
    explorer.close()
