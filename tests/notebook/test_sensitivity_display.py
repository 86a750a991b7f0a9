"""%sensitivity in a notebook shows its curves once, and nothing that is not an error as one.

A real IPython InteractiveShell runs the cells; the frontend is simulated by recording what
``IPython.display.display`` receives (the live view is one display updated in place, so its
last update is what stays on screen).
"""

import pytest
from IPython.core.error import UsageError

from nbcompress.engine.sensitivity.refine import Refinement
from nbcompress.engine.sensitivity.stagereport import StagedReport
from nbcompress.notebook.magics import _sensitivity
from tests.sensitivity_helpers import mlp_with_agreement


class Frontend:
    """What a notebook shows: displayed objects, and the live view's last state."""

    def __init__(self):
        self.shown, self.updates = [], []

    def display(self, obj, display_id=False):
        self.shown.append(obj)
        frontend = self

        class Handle:
            def update(self, new):
                frontend.updates.append(new)

        return Handle() if display_id else None

    def explorers(self):
        return [o for o in self.shown if type(o).__name__ == "SensitivityExplorer"]


@pytest.fixture
def notebook(shell, monkeypatch):
    model, x, agreement = mlp_with_agreement()
    formatter = shell.display_formatter.formatters["text/html"]
    monkeypatch.setattr(formatter, "enabled", True)  # as in a notebook frontend
    shell.user_ns.update(model=model, x=x, agreement=agreement, html_of=formatter)
    frontend = Frontend()
    monkeypatch.setattr(_sensitivity, "in_notebook", lambda shell: True)
    monkeypatch.setattr("IPython.display.display", frontend.display)
    return shell, frontend


def test_the_curves_are_shown_once_with_the_explorer(notebook):
    pytest.importorskip("nbcompress.notebook.widgets")
    shell, frontend = notebook
    cell = "r = %sensitivity model --eval agreement --ratios 0.5,0.9\nhere = html_of(r)"
    assert shell.run_cell(cell, store_history=True).success
    assert any("<img" in u.data for u in frontend.updates[:-1])  # drawn live while it ran
    assert "<img" not in frontend.updates[-1].data  # then gives way to the explorer's plot
    assert "explorer below" in frontend.updates[-1].data
    assert len(frontend.explorers()) == 1
    here = shell.user_ns["here"]
    assert "<img" not in here and "<table>" in here and "plotted above" in here
    # In a later cell the result shows its plot as usual.
    assert shell.run_cell("later = html_of(r)", store_history=True).success
    assert "<img" in shell.user_ns["later"]


def test_without_the_explorer_the_live_plot_stays_and_the_result_shows_its_table(notebook):
    shell, frontend = notebook
    cell = "r = %sensitivity model --eval agreement --ratios 0.5 --no-widget\nhere = html_of(r)"
    assert shell.run_cell(cell, store_history=True).success
    assert "<img" in frontend.updates[-1].data and not frontend.explorers()
    assert "<img" not in shell.user_ns["here"]


def test_a_sweep_refused_before_it_started_adds_no_line_of_its_own(notebook):
    shell, frontend = notebook
    with pytest.raises(UsageError, match="--eval: give an evaluation function"):
        shell.run_line_magic("sensitivity", "model")
    assert frontend.updates[-1].data == ""  # no "sweep stopped: see the error." line


def test_notes_and_no_suggestion_go_to_normal_output(notebook, capsys):
    shell, _ = notebook
    shell.run_line_magic(
        "sensitivity", "model --eval agreement --ratios 0.3 --target-sparsity 0.9 --no-widget"
    )
    captured = capsys.readouterr()
    assert "No suggestion: target_sparsity: 90.0% cannot be reached" in captured.out
    assert captured.err == ""


def test_stage_progress_goes_to_normal_output_in_a_notebook(notebook, capsys):
    shell, _ = notebook
    shell.run_line_magic(
        "sensitivity", "model --eval agreement --target-sparsity 0.5 --stages 2 --apply"
    )
    captured = capsys.readouterr()
    assert "prune_to_: 1/2 stages" in captured.out and captured.err == ""


def _staged(measured, predicted, refined):
    rows = [{"stage": 1, "target": 0.5, "sparsity": 0.5, "predicted": 0.9, "measured": 0.9}]
    refinement = None
    if refined:
        rows.append(
            {"stage": "refined (from curves)", "target": 0.9, "sparsity": 0.9,
             "predicted": predicted, "measured": measured}
        )  # fmt: skip
        refinement = Refinement(
            ratios={}, measured=measured, target=0.9, sparsity=0.9, start="curves", steps=[],
            metric="acc", higher_is_better=True, evaluations=3, seconds=1.0, predicted=predicted,
        )  # fmt: skip
    return StagedReport(0.9, rows, 0.95, "acc", True, 10, 2.0, refinement=refinement)


def test_the_refined_row_predicted_against_measured_gets_a_comment():
    text = str(_staged(0.5043, 0.391, refined=True))
    assert "measured better than predicted" in text and "first sweep's curves" in text
    assert "measured worse than predicted" in str(_staged(0.2, 0.391, refined=True))
    assert "Predicted:" not in str(_staged(0.9, 0.9, refined=False))  # nothing to explain
