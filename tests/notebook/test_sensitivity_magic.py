"""%sensitivity through a real InteractiveShell, and %prune --suggested after it."""

import json

import pytest
import torch
from IPython.core.error import UsageError

import nbcompress as nc
from nbcompress.engine.core.compare import Comparison
from nbcompress.engine.sensitivity.registry import latest, latest_suggestion
from nbcompress.engine.sensitivity.result import SensitivityResult
from nbcompress.engine.sensitivity.staged import StagedReport
from nbcompress.notebook.magics import _sensitivity
from tests.helpers import assert_refused, assert_same_state, snapshot, zero_fraction
from tests.sensitivity_helpers import mlp_with_agreement


@pytest.fixture
def ns(shell):
    model, x, agreement = mlp_with_agreement()

    def boom(m):
        raise RuntimeError("no validation data")

    shell.user_ns.update(model=model, x=x, agreement=agreement, boom=boom, three=3)
    return shell


def run(shell, line):
    return shell.run_line_magic("sensitivity", line)


def test_magic_returns_the_result_and_leaves_the_model_unchanged(ns, capsys):
    saved = snapshot(ns.user_ns["model"])
    result = run(ns, "model --eval agreement --ratios 0.3,0.6 --layers 0,2")
    assert isinstance(result, SensitivityResult)
    assert result.layers == ["0", "2"] and result.ratios == [0.3, 0.6]
    assert result.metric == "agreement" and result.complete
    assert latest(ns.user_ns["model"]) is result
    assert_same_state(ns.user_ns["model"], saved)
    assert "sensitivity [4/4" in capsys.readouterr().out  # plain-text progress, on stdout


def test_target_sparsity_then_prune_suggested_then_undo(ns, capsys):
    model = ns.user_ns["model"]
    saved = snapshot(model)
    run(ns, "model --eval agreement --ratios 0.3,0.6,0.9 --target-sparsity 0.5")
    out = capsys.readouterr().out
    assert "Suggestion for sparsity 50%" in out and "%prune model --suggested" in out
    suggestion = latest_suggestion(model)
    assert suggestion.sparsity >= 0.5
    report = ns.run_line_magic("prune", "model --suggested")
    assert isinstance(report, Comparison)  # %prune returns one type, whatever the options
    measured = report.result.measured  # the ApplyReport of apply_suggestion_
    assert measured == ns.user_ns["agreement"](model)  # measured with the sweep's eval
    assert f"predicted {suggestion.predicted:.4g}, measured {measured:.4g}" in str(report)
    for name, ratio in suggestion.ratios.items():
        assert zero_fraction(model.get_submodule(name).weight) == pytest.approx(ratio, abs=0.01)
    ns.run_line_magic("undo", "model")
    assert_same_state(model, saved)


def test_proxy_lower_is_better_max_drop_and_save(ns, tmp_path, capsys):
    path = tmp_path / "sweep.json"
    result = run(ns, f"model --input x --ratios 0.5,0.9 --max-drop 0.05 --save {path}")
    assert result.proxy and json.loads(path.read_text())["proxy"] is True
    assert SensitivityResult.load(path) == result
    assert "Suggestion for max drop 0.05" in capsys.readouterr().out

    def loss(m):
        return 1.0 - ns.user_ns["agreement"](m)

    ns.user_ns["loss"] = loss
    result = run(ns, "model --eval loss --lower-is-better --ratios 0.9 --metric err")
    assert not result.higher_is_better and result.metric == "err"


def test_failing_eval_is_one_usage_error_with_the_model_restored(ns, tmp_path):
    model = ns.user_ns["model"]
    saved = snapshot(model)
    with pytest.raises(UsageError, match="--eval: boom\\(model\\) raised RuntimeError"):
        run(ns, "model --eval boom --ratios 0.5")
    assert_same_state(model, saved)
    calls = []

    def late_failure(m):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk gone")
        return 1.0

    ns.user_ns["late"] = late_failure
    path = tmp_path / "partial.json"
    with pytest.raises(UsageError, match=r"Partial results are kept: .*latest\(model\)"):
        run(ns, f"model --eval late --ratios 0.5,0.9 --save {path}")
    assert_same_state(model, saved)
    partial = SensitivityResult.load(path)
    assert partial.curves["0"] == [1.0, None] and not partial.complete


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("model --eval three --ratios 0.5", "--eval: expected a function"),
        ("model --eval agreement --ratios 0.5,1.5", r"ratios\[1\]: 1.5 is outside"),
        ("model --eval agreement --ratios a,b", "--ratios: 'a,b' is not a comma-separated"),
        ("model --eval agreement --layers nothing*", "--layers: pattern 'nothing\\*'"),
        ("model --eval undefined_fn", "--eval: 'undefined_fn' is not defined"),
        ("model --eval agreement --target-sparsity 1.2", "--target-sparsity: 1.2 is outside"),
        ("model --eval agreement --target-sparsity 0.5 --max-drop 0.1", "give one of the two"),
        ("model", "--eval: give an evaluation function"),
        ("nomodel --eval agreement", "model: 'nomodel' is not defined"),
        ("model --bogus", "--bogus: %[a-z]+ has no such option"),
        ("model --eval agreement --apply", "--apply: give the budget"),
        ("model --eval agreement --target-sparsity 0.8 --stages 3", "--stages: .*--apply"),
        ("model --eval agreement --max-drop 0.1 --stages 3 --apply", "--stages: .*--apply"),
        ("model --eval agreement --target-sparsity 0.8 --stages 0 --apply", "--stages: 0 must"),
        ("model --eval agreement --max-drop -0.1", "--max-drop: -0.1 must be >= 0"),
        ("model --eval agreement --objective flops", "--objective: invalid choice: 'flops'"),
        ("model --eval agreement --granularity planet", "--granularity: 'planet' is unknown"),
        (
            "model --eval agreement --target-sparsity 0.9 --stages 2 --apply --ratios 0.5",
            "stage 2 of 2: target_sparsity: 90.0% cannot be reached",
        ),
    ],
)
def test_bad_input_is_one_usage_error_and_the_model_untouched(ns, line, match):
    saved = snapshot(ns.user_ns["model"])
    with pytest.raises(UsageError, match=match):
        run(ns, line)
    assert_same_state(ns.user_ns["model"], saved)


def test_unreachable_target_keeps_the_sweep(ns, capsys):
    result = run(ns, "model --eval agreement --ratios 0.3 --target-sparsity 0.9")
    assert isinstance(result, SensitivityResult)
    assert "No suggestion: target_sparsity: 90.0% cannot be reached" in capsys.readouterr().out
    assert latest_suggestion(ns.user_ns["model"]) is None


def test_help_is_the_docstring(ns):
    doc = ns.find_line_magic("sensitivity").__doc__
    assert "L1 sensitivity sweep" in doc and "--lower-is-better" in doc


def test_in_a_notebook_the_plot_updates_live_and_the_explorer_is_shown(ns, monkeypatch):
    pytest.importorskip("nbcompress.notebook.widgets")
    shown, updates = [], []

    class Handle:
        def update(self, obj):
            updates.append(obj)

    def fake_display(obj, display_id=False):
        shown.append(obj)
        return Handle() if display_id else None

    monkeypatch.setattr(_sensitivity, "in_notebook", lambda shell: True)
    monkeypatch.setattr("IPython.display.display", fake_display)
    result = run(ns, "model --eval agreement --ratios 0.5,0.9 --target-sparsity 0.4")
    # 2 layers × 2 ratios: the output layer is left alone by default, from the first update on.
    assert len(updates) >= 2 and "<progress value='4' max='4'" in updates[-1].data
    assert all("max='4'" in u.data for u in updates)
    assert "<img" in updates[0].data  # live; the end gives way to the explorer's plot
    assert "<img" not in updates[-1].data
    assert " elapsed, ETA 0 s" in updates[-1].data and "ETA" in updates[0].data
    assert "Suggestion" in [type(o).__name__ for o in shown]
    explorer = [o for o in shown if type(o).__name__ == "SensitivityExplorer"]
    assert len(explorer) == 1 and explorer[0].result is result
    assert explorer[0].model is ns.user_ns["model"]
    shown.clear()
    run(ns, "model --eval agreement --ratios 0.5 --no-widget")
    assert not [o for o in shown if type(o).__name__ == "SensitivityExplorer"]
    with pytest.raises(UsageError, match=r"--eval: boom"):
        run(ns, "model --eval boom --ratios 0.5")
    # No stale "starting…" display, and no extra line when no point was evaluated.
    assert updates[-1].data == ""


def test_api_and_magic_agree(ns):
    via_magic = run(ns, "model --eval agreement --ratios 0.4,0.8")
    via_api = nc.sensitivity(
        ns.user_ns["model"], ns.user_ns["agreement"], ratios=[0.4, 0.8], progress=False
    )
    assert via_magic.curves == via_api.curves and via_magic.baseline == via_api.baseline


def test_stages_apply_prunes_in_stages_and_one_undo_reverts_all(ns, capsys):
    model = ns.user_ns["model"]
    saved = snapshot(model)
    result = run(ns, "model --eval agreement --target-sparsity 0.6 --stages 2 --apply")
    assert isinstance(result, SensitivityResult)  # one return type, whatever the options
    report = nc.history(model)[-1].info["report"]
    assert isinstance(report, StagedReport) and len(report.stages) == 2
    assert report.result is result
    assert report.measured == ns.user_ns["agreement"](model)
    for name, ratio in report.ratios.items():
        assert zero_fraction(model.get_submodule(name).weight) == pytest.approx(ratio, abs=0.01)
    captured = capsys.readouterr()
    assert "Staged sensitivity pruning to sparsity 60.0% in 2 stage(s)" in captured.out
    assert "stage 2/2: sparsity" in captured.out  # progress: stdout, never stderr
    assert len(nc.history(model)) == 1
    ns.run_line_magic("undo", "model")
    assert_same_state(model, saved)


def test_apply_applies_the_one_sweep_suggestion(ns, capsys):
    model = ns.user_ns["model"]
    saved = snapshot(model)
    result = run(ns, "model --eval agreement --ratios 0.3,0.6,0.9 --target-sparsity 0.5 --apply")
    suggestion = latest_suggestion(model)
    assert latest(model) is result and suggestion.sparsity >= 0.5
    for name, ratio in suggestion.ratios.items():
        assert zero_fraction(model.get_submodule(name).weight) == pytest.approx(ratio, abs=0.01)
    out = capsys.readouterr().out
    assert "Applied suggestion for sparsity 50%" in out and "%prune model --suggested" not in out
    ns.run_line_magic("undo", "model")
    assert_same_state(model, saved)


def test_proxy_explorer_gets_the_input_so_evaluate_works(ns, monkeypatch):
    pytest.importorskip("nbcompress.notebook.widgets")
    shown = []

    class Handle:
        def update(self, obj):
            pass

    def fake_display(obj, display_id=False):
        shown.append(obj)
        return Handle() if display_id else None

    monkeypatch.setattr(_sensitivity, "in_notebook", lambda shell: True)
    monkeypatch.setattr("IPython.display.display", fake_display)
    run(ns, "model --input x --ratios 0.5,0.9")
    (explorer,) = [o for o in shown if type(o).__name__ == "SensitivityExplorer"]
    # Without the input the explorer has nothing to measure a proxy setting with.
    assert explorer.evaluate is not None
    assert explorer.evaluate(ns.user_ns["model"]) == pytest.approx(1.0)


def test_workers_2_runs_the_sweep_and_its_refinement_on_a_local_dask_cluster(ns, capsys):
    pytest.importorskip("distributed")
    model = ns.user_ns["model"]
    x = ns.user_ns["x"]
    reference = model(x).detach()

    def closeness(m):  # continuous, so that early stops and refinement moves happen
        with torch.no_grad():
            return -float(((m(x) - reference) ** 2).mean())

    ns.user_ns["closeness"] = closeness
    saved = snapshot(model)
    line = "model --eval closeness --early-stop 0.001 --target-sparsity 0.45 --refine 6"
    serial = run(ns, line)
    serial_suggestion = latest_suggestion(model)
    assert "No suggestion" not in capsys.readouterr().err
    remote = run(ns, line + " --workers 2")  # the one LocalCluster of the test suite
    err = capsys.readouterr().out  # a progress line (stdout)
    assert "dask: started a local cluster of 2 worker processes on 127.0.0.1" in err, err
    assert_same_state(model, saved)
    assert any("early stop" in n for n in serial.notes)
    assert remote.curves == serial.curves and remote.evaluations == serial.evaluations
    assert remote.notes[:-1] == serial.notes
    assert remote.notes[-1].startswith("Evaluated on 2 worker(s) (ClientExecutor)")
    suggestion = latest_suggestion(model)
    assert suggestion.ratios == serial_suggestion.ratios
    assert suggestion.measured == serial_suggestion.measured
    assert suggestion.refinement.steps == serial_suggestion.refinement.steps


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("model --eval agreement --workers 0", "--workers: 0 must be >= 1"),
        (
            "model --eval agreement --workers 2 --remove --input x",
            "^--workers / --executor: --remove",
        ),
        ("model --eval agreement --executor three", "^--executor: expected a concurrent.futures"),
        ("model --eval agreement --executor tcp://127.0.0.1:9", "^--executor: no dask scheduler"),
    ],
    ids=["workers-0", "remove", "not-an-executor", "no-scheduler"],
)
def test_bad_workers_or_executor_is_one_usage_error(ns, line, match):
    assert_refused(ns, "sensitivity", line, match)
