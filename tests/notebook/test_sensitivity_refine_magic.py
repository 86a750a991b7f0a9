"""%sensitivity --refine N through a real InteractiveShell: refined suggestion and staged run."""

import pytest
import torch
from IPython.core.error import UsageError

import nbcompress as nc
from nbcompress.engine.sensitivity.registry import latest_suggestion
from tests.helpers import assert_same_state, snapshot, zero_fraction
from tests.sensitivity_helpers import mlp_with_agreement


@pytest.fixture
def ns(shell):
    model, x, _ = mlp_with_agreement()
    reference = model(x).detach()

    def distance(m):
        with torch.no_grad():
            return float(((m(x) - reference) ** 2).mean())

    shell.user_ns.update(model=model, distance=distance)
    return shell


def run(shell, line):
    return shell.run_line_magic("sensitivity", line)


def test_refine_measures_the_suggestion_and_leaves_the_model_unchanged(ns, capsys):
    model = ns.user_ns["model"]
    saved = snapshot(model)
    run(ns, "model --eval distance --lower-is-better --ratios 0.3,0.6,0.9 "
        "--target-sparsity 0.6 --refine 20")  # fmt: skip
    suggestion = latest_suggestion(model)
    assert suggestion.refinement is not None and suggestion.measured is not None
    candidates = [s["measured"] for s in suggestion.refinement.steps if "candidate" in s["step"]]
    assert suggestion.measured <= min(candidates)
    out = capsys.readouterr().out
    assert "measured" in out and "Refined allocation for sparsity 60.0%" in out
    assert_same_state(model, saved)


def test_stages_with_refine_apply_the_refined_allocation_in_one_undo_step(ns, capsys):
    model = ns.user_ns["model"]
    saved = snapshot(model)
    run(
        ns, "model --eval distance --lower-is-better --ratios 0.3,0.6,0.9 "
        "--target-sparsity 0.6 --stages 2 --refine 20 --apply",
    )  # fmt: skip
    report = nc.history(model)[-1].info["report"]
    assert report.refinement is not None and report.measured == ns.user_ns["distance"](model)
    for name, ratio in report.ratios.items():
        assert zero_fraction(model.get_submodule(name).weight) == pytest.approx(ratio, abs=0.01)
    out = capsys.readouterr().out
    assert "2 stage(s) + measured refinement" in out
    assert "Refined allocation for sparsity 60.0%" in out and "candidate: staged" in out
    assert len(nc.history(model)) == 1
    ns.run_line_magic("undo", "model")
    assert_same_state(model, saved)


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("model --eval distance --target-sparsity 0.6 --refine -1", "--refine: -1 must be >= 0"),
        ("model --eval distance --max-drop 0.1 --refine 10", "--refine: refines a --target"),
        ("model --input model --target-sparsity 0.6 --refine 10", "--refine: .* give --eval"),
        ("model --eval distance --target-sparsity 0.6 --refine x", "--refine: invalid int value"),
    ],
)
def test_bad_refine_options_are_one_usage_error_and_the_model_untouched(ns, line, match):
    saved = snapshot(ns.user_ns["model"])
    with pytest.raises(UsageError, match=match):
        run(ns, line)
    assert_same_state(ns.user_ns["model"], saved)


def test_help_documents_refine(ns):
    assert "--refine 100" in ns.find_line_magic("sensitivity").__doc__
