"""Issue 16 (ux items 3, 7, 10, 14 and explorer log step 3): what the explorer writes.

Accuracy-like metrics read as the notebooks print them (``94.67%``, ``−1.33 pts``), a new
suggestion says which slider settings it replaced, the status and model lines wrap, every
colour follows the theme, and an explorer shown by ``%sensitivity`` follows ``%prune``,
``%undo`` and ``%quantize`` run in later cells of a real shell.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import nbcompress
from nbcompress.engine.sensitivity.sweep import sensitivity
from nbcompress.notebook.magics import _sensitivity
from nbcompress.notebook.widgets import SensitivityExplorer
from nbcompress.notebook.widgets._text import STYLE, MetricText, metric_text
from tests.helpers import mlp

MINUS = "\N{MINUS SIGN}"


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = mlp().eval()
    x = torch.randn(256, 16)
    labels = model(x).argmax(1)

    def accuracy(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m(x).argmax(1) == labels).float().mean())

    result = sensitivity(model, accuracy, ratios=[0.3, 0.6, 0.9], progress=False)
    return model, accuracy, result


def test_metric_text_writes_fractions_as_percent_and_changes_as_points():
    text = MetricText(True)
    assert text.value(0.94667) == "94.67%" and text.value(None) == "—"
    assert text.change(-0.0133) == f"{MINUS}1.33 pts" and text.change(0.002) == "+0.20 pts"
    raw = MetricText(False)
    assert raw.value(0.99983) == "0.99983" and raw.change(-1.6e-05) == f"{MINUS}1.6e{MINUS}05"


def test_an_accuracy_reads_in_percent_in_every_readout(setup):
    model, accuracy, result = setup
    assert metric_text(result).percent
    ex = SensitivityExplorer(result, model, accuracy)
    ex.set_ratios({"0": 0.9, "2": 0.9})
    predicted = result.predict(ex.ratios)
    change = 100 * (predicted - result.baseline)
    assert f"{100 * predicted:.2f}%" in ex.readout.value
    assert f"{change:+.2f} pts".replace("-", MINUS) in ex.readout.value
    assert f"vs baseline {100 * result.baseline:.2f}%" in ex.readout.value
    assert f"baseline {100 * result.baseline:.2f}%" in ex.header.value
    assert re.search(r"Δ [−+]\d+\.\d\d pts", ex._infos["0"].value)
    ex.evaluate_setting()
    assert re.search(r"measured accuracy \d+\.\d\d% at this setting \(predicted \d+\.\d\d%", (
        ex.status.value
    ))  # fmt: skip
    ex.target_value.value = 0.4
    assert re.search(r"predicted accuracy \d+\.\d\d%", ex.status.value)


def test_a_loss_or_a_proxy_keeps_its_own_units(setup):
    model, accuracy, _ = setup
    loss = sensitivity(
        model, lambda m: 2.0 - accuracy(m), ratios=[0.5], higher_is_better=False, progress=False
    )
    proxy = sensitivity(model, example_inputs=torch.randn(8, 16), ratios=[0.5], progress=False)
    assert not metric_text(loss).percent and not metric_text(proxy).percent
    ex = SensitivityExplorer(loss, model)
    predicted = re.sub(r"<[^>]+>", " ", ex.readout.value.split("predicted")[-1])
    assert "%" not in predicted and "pts" not in predicted, predicted


def test_a_new_suggestion_says_which_slider_settings_it_replaced(setup):
    model, accuracy, result = setup
    ex = SensitivityExplorer(result, model, accuracy)
    ex.target_kind.value = "max_drop"  # nothing moved by hand yet: nothing to report
    assert "replaced" not in ex.status.value
    ex.sliders["0"].value = 0.77
    ex.target_kind.value = "sparsity"
    assert ex.status.value.startswith("suggested for sparsity 0.5")
    assert "It replaced the slider(s) you had set: 0 77.0%" in ex.status.value
    ex.target_value.value = 0.6  # the replaced setting is reported once only
    assert "replaced" not in ex.status.value


def test_status_and_model_lines_wrap_and_colours_follow_the_theme(setup):
    model, accuracy, result = setup
    ex = SensitivityExplorer(result, model, accuracy)
    style = ex.children[0]
    assert style.value == STYLE and "white-space: normal" in STYLE
    assert ".nbc-status" in STYLE and ".nbc-model" in STYLE
    assert "nbc-status" in ex.status._dom_classes and "nbc-model" in ex.model_label._dom_classes
    ex.set_ratios({"0": 0.9, "2": 0.9})
    nbcompress.prune_(model, 0.5)  # the layer notes add a red "now 50.0%"
    for html in (ex.readout.value, ex._infos["0"].value):
        # Every colour is a theme variable (light fallback): grey on black was unreadable.
        colours = re.findall(r"color:\s*([^;']+)", html)
        assert len(colours) >= 2 and all(c.startswith("var(--jp-") for c in colours), colours


def test_an_explorer_shown_by_the_magic_follows_later_cells(shell, monkeypatch):
    # ux item 3: the explorer said "model now: … (59.4% zero)" after %undo had restored it.
    shown = []

    class Handle:
        def update(self, obj):
            pass

    def display(obj, display_id=False):
        shown.append(obj)
        return Handle() if display_id else None

    monkeypatch.setattr(_sensitivity, "in_notebook", lambda shell: True)
    monkeypatch.setattr("IPython.display.display", display)
    torch.manual_seed(0)
    shell.user_ns.update(model=mlp(), x=torch.randn(8, 16))
    shell.run_cell("%sensitivity model --input x --ratios 0.5,0.9")
    (ex,) = [o for o in shown if isinstance(o, SensitivityExplorer)]
    dense = ex.model_label.value
    assert ex.warning.layout.display == "none"
    shell.run_cell("%prune model 0.8\ny = 1")
    assert ex.model_label.value != dense and ex.warning.layout.display is None
    assert "the model changed since the sweep (a prune step in another cell" in ex.warning.value
    shell.run_cell("%undo model")
    assert ex.model_label.value == dense and ex.warning.layout.display == "none"
    shell.run_cell("%quantize model int8 --input x --repeats 1\ny = 1")
    assert "a quantize step in another cell" in ex.warning.value
