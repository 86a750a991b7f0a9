"""The speedup report reads: the chosen column says why, notes are whole, progress on stdout."""

from __future__ import annotations

import pytest
import torch
from matplotlib.ticker import FuncFormatter

import nbcompress as nc
from nbcompress.engine.speedup import speedup as speedup_module
from nbcompress.notebook.display.speedup import layer_label, ms_label
from tests.engine.speedup.test_speedup import FAST, SLOW, _fake_timer, _pruned_mlp

pytestmark = pytest.mark.filterwarnings("ignore:nbcompress. sparse kernel")


def test_chosen_column_names_the_path_and_its_measured_gain(monkeypatch):
    _fake_timer(monkeypatch, FAST)
    report = nc.speedup(_pruned_mlp(), torch.randn(4, 32))
    row = report.rows[0]
    assert row["path"] == "sparse fp32" and row["chosen"] == "sparse fp32: 5.00× vs dense"
    # Sparse int8 was faster (0.1 vs 0.2) but not allowed: said once, with how to allow it.
    int8 = [n for n in report.notes if n.startswith("sparse int8 was fastest but not allowed")]
    assert len(int8) == 1 and "--int8" in int8[0] and "0 10.00×" in int8[0]
    text = str(report)
    assert "max |Δ| (tol.)" in text and " vs dense" in text
    assert "Not applied (--apply / apply=True installs it): 3 layers on sparse kernels" in text


def test_dense_rows_say_the_best_sparse_ratio(monkeypatch):
    _fake_timer(monkeypatch, SLOW)
    with pytest.warns(UserWarning, match="no layer measured faster"):
        report = nc.speedup(_pruned_mlp(), torch.randn(4, 32), apply=True)
    assert [r["chosen"] for r in report.rows] == ["dense: best sparse 0.50×"] * 3
    assert report.outcome == "No layer measured faster on the sparse kernels; model left dense."


def test_a_gain_under_min_gain_is_within_noise(monkeypatch):
    _fake_timer(monkeypatch, {**SLOW, "csr": 0.98})
    report = nc.speedup(_pruned_mlp(), torch.randn(4, 32))
    assert report.rows[0]["chosen"] == "dense: sparse fp32 1.02×, within noise (±5%)"


def test_an_applied_choice_reads_as_a_sentence(monkeypatch):
    _fake_timer(monkeypatch, FAST)
    model = _pruned_mlp()
    report = nc.speedup(model, torch.randn(4, 32), apply=True)
    assert report.outcome == "Applied: 3 layers on sparse kernels: 3.33× faster end to end."
    nc.undo_(model)


@pytest.mark.parametrize("length", [40, 159, 160])
def test_a_backend_warning_is_whole_or_cut_at_a_word(length):
    words = ("torch.quantize_per_tensor with dtype torch.quint8 and torch.qint8 " * 4)[:length]
    note = speedup_module._whole(words)
    if length < 160:
        assert note == words
    else:
        assert note.endswith(" …") and words.startswith(note[:-2])
        assert words[len(note) - 2] == " "  # the cut falls between two words


def test_progress_goes_to_stdout_with_eta_and_total_time(monkeypatch, capsys):
    _fake_timer(monkeypatch, FAST)
    seen = []
    nc.speedup(_pruned_mlp(), torch.randn(4, 32), progress=lambda *a: seen.append(a))
    assert seen == [(1, 3, "0"), (2, 3, "2"), (3, 3, "head"), (3, 3, "timing the whole model")]
    nc.speedup(_pruned_mlp(), torch.randn(4, 32), progress=True)
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert lines[0] == "speedup: 0 layers, 0.0 s elapsed"  # shown at once: total not known yet
    assert lines[-1].startswith("speedup: 3 layers in ") and "(done)" in lines[-1]
    assert out.err == ""
    nc.speedup(_pruned_mlp(), torch.randn(4, 32), progress=False)
    assert capsys.readouterr().out == ""


def test_plot_reads_in_milliseconds_with_layer_names(monkeypatch):
    _fake_timer(monkeypatch, FAST)
    report = nc.speedup(_pruned_mlp(), torch.randn(4, 32))
    fig = report.plot()
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["0\nLinear", "2\nLinear", "head"]
    assert isinstance(ax.yaxis.get_major_formatter(), FuncFormatter)
    assert ax.get_ylabel() == "time per call (ms)"
    assert [ms_label(v) for v in (0.05, 0.2, 2, 150, 1500)] == ["0.05", "0.2", "2", "150", "1,500"]
    assert layer_label({"layer": "features.3", "type": "Conv2d"}) == "features.3\nConv2d"
