"""``%prune --remove`` through a real InteractiveShell: options, report, %summary, %undo."""

from __future__ import annotations

import pytest
import torch
from IPython.core.error import UsageError

import nbcompress as nc
from nbcompress.engine.core.compare import Comparison
from tests.engine.sensitivity.group_models import n_params, param_ids, run_magic, with_model
from tests.helpers import assert_same_state, snapshot


@pytest.fixture
def ns(shell):
    return with_model(shell)


magic = run_magic


def test_prune_remove_gives_a_smaller_dense_model_and_reports_params_macs_latency(ns):
    model, x = ns.user_ns["model"], ns.user_ns["x"]
    before, out_before = n_params(model), model(x)
    report = magic(ns, "prune model 0.5 --remove --input x")
    assert isinstance(report, Comparison)
    assert n_params(model) < before
    assert model.stem.out_channels == 8 and model.stem.weight.shape[0] == 8
    assert model(x).shape == out_before.shape
    assert nc.history(model)[-1].name == "remove"
    text = str(report)
    assert report.notes[0].startswith("Parameters ") and "MACs (est.)" in report.notes[0]
    assert "fewer" in report.notes[0]
    assert "rebuild any optimizer" in text
    assert sum("optimizer" in note for note in [report.title, *report.notes]) == 1  # said once
    assert "Model latency (measured, before/after interleaved)" in text
    assert report.speed_ratio is not None
    assert "Unstructured zeros" not in text  # the zeroing caveat is not about removal
    assert report.after.totals["params"] < report.before.totals["params"]
    assert report.after.totals["MACs (est.)"] < report.before.totals["MACs (est.)"]


def test_undo_after_prune_remove_restores_the_model_bit_exactly_with_the_same_parameters(ns):
    model = ns.user_ns["model"]
    saved, ids, before = snapshot(model), param_ids(model), n_params(model)
    magic(ns, "prune model 0.5 --remove --input x --round-to 4")
    assert n_params(model) < before
    magic(ns, "undo model")
    assert_same_state(model, saved)
    assert param_ids(model) == ids
    assert nc.history(model) == []


def test_round_to_keeps_channel_counts_multiples_of_it(ns):
    model = ns.user_ns["model"]
    magic(ns, "prune model 0.3 --remove --input x --round-to 8")
    for conv in (model.stem, model.conv1, model.conv3):
        assert conv.out_channels % 8 == 0
    assert model.conv3.out_channels < 24 or model.stem.out_channels < 16


def test_remove_without_an_input_is_one_line_naming_input(ns):
    model = ns.user_ns["model"]
    saved = snapshot(model)
    with pytest.raises(UsageError, match=r"^--input: --remove traces the model") as err:
        magic(ns, "prune model 0.3 --remove")
    assert "\n" not in str(err.value)
    assert_same_state(model, saved)
    assert nc.history(model) == []


def test_a_remembered_input_serves_remove(ns):
    model = ns.user_ns["model"]
    magic(ns, "summary model --input x --no-latency")
    magic(ns, "prune model 0.25 --remove")
    assert nc.history(model)[-1].name == "remove"


@pytest.mark.parametrize(
    "options",
    ["--granularity element", "--granularity block", "--blocks"],
)
def test_remove_with_a_weight_granularity_is_refused(ns, options):
    model = ns.user_ns["model"]
    saved = snapshot(model)
    with pytest.raises(UsageError, match=r"^--granularity \w+: --remove removes whole channels"):
        magic(ns, f"prune model 0.3 --remove --input x {options}")
    assert_same_state(model, saved)


def test_remove_with_granularity_channel_or_structured_is_accepted(ns):
    model = ns.user_ns["model"]
    magic(ns, "prune model 0.25 --remove --input x --structured")
    assert nc.history(model)[-1].name == "remove"


@pytest.mark.parametrize(
    "option", ["--round-to 8", "--heads 0.25", "--ffn 0.5", '--ignore "conv1"']
)
def test_removal_options_without_remove_are_refused(ns, option):
    model = ns.user_ns["model"]
    saved = snapshot(model)
    name = option.split()[0]
    with pytest.raises(UsageError, match=rf"^{name}: only used with --remove"):
        magic(ns, f"prune model 0.3 --input x {option}")
    assert_same_state(model, saved)


@pytest.mark.parametrize("option", ["--keep-masks", "--reconstruct", "--types Conv2d"])
def test_masking_options_with_remove_are_refused(ns, option):
    with pytest.raises(UsageError, match=rf"^{option.split()[0]}: not used with --remove"):
        magic(ns, f"prune model 0.3 --remove --input x {option}")


def test_out_of_range_heads_is_refused_when_parsed(ns):
    with pytest.raises(UsageError, match="--heads"):
        magic(ns, "prune model --remove --input x --heads 1.5")


def test_ignore_keeps_a_layer_whole(ns):
    model = ns.user_ns["model"]
    magic(ns, 'prune model 0.5 --remove --input x --ignore "conv1"')
    assert model.conv1.out_channels == 16


def test_summary_after_removal_counts_the_new_shapes_and_says_channels_were_removed(ns):
    model, x = ns.user_ns["model"], ns.user_ns["x"]
    dense = magic(ns, "summary model --input x --no-latency")
    assert not any("physically removed" in n for n in dense.notes)
    magic(ns, "prune model 0.5 --remove --input x")
    after = magic(ns, "summary model --input x --no-latency")
    assert after.totals["params"] == n_params(model)
    assert after.totals["params"] < dense.totals["params"]
    assert after.totals["MACs (est.)"] < dense.totals["MACs (est.)"]
    assert after.layer("stem")["output"] == (8, 8, 12, 12)
    assert any("Channels were physically removed" in n for n in after.notes)
    magic(ns, "undo model")
    assert not any("physically removed" in n for n in nc.summary(model, x).notes)


def test_speedup_after_removal_measures_the_dense_smaller_model_and_says_so(ns):
    model = ns.user_ns["model"]
    magic(ns, "prune model 0.5 --remove --input x")
    assert model.stem.out_channels == 8  # timed as the smaller model it is now
    report = magic(ns, "speedup model --input x --repeats 3")
    assert report.notes[0].startswith("Channels were physically removed")
    assert "sparse kernels can only speed up zeros left inside it" in report.notes[0]
    assert all(r["sparsity"] < 0.5 for r in report.rows)  # removed, not zeroed
    assert torch.isfinite(torch.tensor(report.dense.median))


def test_suggested_with_remove_needs_a_group_suggestion(ns):
    model = ns.user_ns["model"]
    nc.sensitivity(model, ns.user_ns["fid"], ratios=[0.5], progress=False).suggest(0.3, check=False)
    saved = snapshot(model)
    with pytest.raises(UsageError, match=r"^--remove: the latest suggestion is per-layer"):
        magic(ns, "prune model --suggested --remove --input x")
    assert_same_state(model, saved)


def test_layers_restricts_removal_to_the_groups_rooted_there(ns):
    model = ns.user_ns["model"]
    magic(ns, 'prune model 0.5 --remove --input x --layers "conv1"')
    assert model.conv1.out_channels == 8 and model.conv2.in_channels == 8
    assert model.stem.out_channels == 16 and model.conv3.out_channels == 24


def test_every_removal_option_reaches_remove_(ns, monkeypatch):
    from nbcompress.engine.structural import remove

    seen = {}

    def fake(model, amount, **options):
        seen.update(options, amount=amount)
        return model

    monkeypatch.setattr(remove, "remove_", fake)
    magic(
        ns, 'prune model --remove --input x --heads 0.25 --ffn 0.5 --round-to 8 '
        '--ignore "bn1,conv3" --layers "conv*" --include-output --method wanda',
    )  # fmt: skip
    assert seen["amount"] == 0.0  # heads/ffn alone: no channel amount
    assert seen["example_inputs"] is ns.user_ns["x"]
    assert (seen["heads"], seen["ffn"], seen["round_to"]) == (0.25, 0.5, 8)
    assert seen["ignore"] == ["bn1", "conv3"] and seen["layers"] == ["conv*"]
    assert seen["include_output"] is True and seen["importance"] == "wanda"


def test_suggested_with_remove_after_a_sweep_without_budget_names_the_group_sweep(ns):
    model = ns.user_ns["model"]
    magic(ns, "sensitivity model --eval fid --remove --input x --ratios 0.5 --no-widget")
    saved = snapshot(model)
    hint = "%sensitivity model --eval f --remove --input x --target-sparsity 0.3"
    with pytest.raises(UsageError, match=r"^--suggested: no suggestion recorded") as err:
        magic(ns, "prune model --suggested --remove --input x")
    assert hint in str(err.value)
    assert_same_state(model, saved)
    assert nc.history(model) == []
