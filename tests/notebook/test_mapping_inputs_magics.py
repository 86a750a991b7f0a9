"""Hugging Face-style models in the magics: mapping inputs, dict outputs (issue 11).

The notebook layer passes whatever ``--input`` / ``--calibrate`` name to the engine as it
is: a tokenizer's ``BatchEncoding`` or a dict of tensors is neither wrapped in a tuple nor
refused there. The first tests check exactly that with the engine call spied on; the
end-to-end tests below them need the engine to accept mappings (core helper: inputs;
speedup/sensitivity helper: dict outputs; quantize helper: mapping calibration batches).
"""

from collections import UserDict
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import nbcompress as nc
from nbcompress.notebook.magics import _core, _quantize, _sensitivity, _speedup
from tests.helpers import assert_same_state, snapshot


class Encoding(UserDict):
    """Like transformers' ``BatchEncoding``: a mapping of tensors with attribute access."""

    def __getattr__(self, name):
        try:
            return self.data[name]
        except KeyError:
            raise AttributeError(name) from None


class HFStyle(nn.Module):
    """``forward(input_ids, attention_mask)`` returning a dict, as transformers models do."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.ff = nn.Linear(16, 32)
        self.out = nn.Linear(32, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, input_ids, attention_mask=None):
        h = self.out(torch.relu(self.ff(self.embed(input_ids))))
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return {"last_hidden_state": h, "logits": self.head(h.mean(dim=1))}


def encoding(batch: int = 4, length: int = 7) -> Encoding:
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, 50, (batch, length), generator=g)
    return Encoding(input_ids=ids, attention_mask=torch.ones(batch, length))


@pytest.fixture
def ns(shell):
    torch.manual_seed(0)
    shell.user_ns.update(
        hf=HFStyle().eval(),
        enc=encoding(),
        plain={"input_ids": encoding()["input_ids"]},
        batches=[encoding(8), encoding(8, 5)],
    )
    return shell


def magic(shell, line):
    name, _, rest = line.partition(" ")
    return shell.run_line_magic(name, rest)


class Spy:
    """Stands in for an engine function; records what the magic passed."""

    def __init__(self, returns=None):
        self.calls, self.returns = [], returns

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.returns


# The notebook layer hands mapping inputs over unchanged.


@pytest.mark.parametrize("name", ["enc", "plain"])
def test_summary_and_speedup_pass_a_mapping_input_unchanged(ns, monkeypatch, name):
    summary, speedup = Spy("summary"), Spy("speedup")
    monkeypatch.setattr(_core, "summary", summary)
    monkeypatch.setattr(_speedup, "speedup", speedup)
    assert magic(ns, f"summary hf --input {name}") == "summary"
    assert magic(ns, f"speedup hf --input {name}") == "speedup"
    assert summary.calls[0][0][1] is ns.user_ns[name]
    assert speedup.calls[0][0][1] is ns.user_ns[name]


def test_prune_and_sensitivity_pass_the_remembered_mapping_unchanged(ns, monkeypatch):
    compare, sweep = Spy("comparison"), Spy(SimpleNamespace(notes=[]))
    monkeypatch.setattr(_core, "compare_change", compare)
    monkeypatch.setattr(_sensitivity, "sensitivity", sweep)
    monkeypatch.setattr(_core, "summary", Spy())
    magic(ns, "summary hf --input enc")
    assert magic(ns, "prune hf 0.5") == "comparison"
    assert compare.calls[0][0][2] is ns.user_ns["enc"]
    magic(ns, "sensitivity hf --no-widget")
    assert sweep.calls[0][1]["example_inputs"] is ns.user_ns["enc"]


def test_quantize_passes_mapping_input_and_calibration_batches_unchanged(ns, monkeypatch):
    quantize = Spy()
    monkeypatch.setattr(_quantize, "quantize_", quantize)
    monkeypatch.setattr(_quantize, "quantize_report", Spy("report"))
    assert magic(ns, "quantize hf int8 --mode static --calibrate batches --input enc") == "report"
    kwargs = quantize.calls[0][1]
    assert kwargs["calibrate"] is ns.user_ns["batches"]
    assert kwargs["example_inputs"] is ns.user_ns["enc"]


# End to end: these need the engine helpers' changes (see the module docstring).


def test_summary_on_a_batch_encoding(ns):
    transformers = pytest.importorskip("transformers")
    ns.user_ns["tokens"] = transformers.BatchEncoding(dict(encoding()))
    s = magic(ns, "summary hf --input tokens --repeats 2")
    assert s.latency is not None and s.layer("ff")["output"] == (4, 7, 32)


def test_prune_with_a_mapping_input_and_undo(ns):
    hf = ns.user_ns["hf"]
    saved = snapshot(hf)
    report = magic(ns, "prune hf 0.5 --input enc")
    assert report.after.latency is not None
    magic(ns, "undo hf")
    assert_same_state(hf, saved)


def test_speedup_with_a_mapping_input_compares_the_dict_output(ns):
    hf = ns.user_ns["hf"]
    saved = snapshot(hf)
    report = magic(ns, "speedup hf --input enc --repeats 3")
    assert report.rows
    assert_same_state(hf, saved)


def test_sensitivity_proxy_on_a_dict_output_model(ns):
    hf = ns.user_ns["hf"]
    saved = snapshot(hf)
    result = magic(ns, "sensitivity hf --input enc --ratios 0.5,0.9 --no-widget")
    assert result.proxy and result.complete
    # The proxy compares the dict's tensors: pruning must move it off the baseline.
    assert any(curve[-1] != result.baseline for curve in result.curves.values())
    assert_same_state(hf, saved)


def test_static_quantize_calibrated_on_a_list_of_mappings(ns):
    hf = ns.user_ns["hf"]
    saved = snapshot(hf)
    report = magic(ns, "quantize hf int8 --mode static --calibrate batches --layers ff,out")
    assert report.mode == "int8 static" and sorted(report.quantized) == ["ff", "out"]
    magic(ns, "undo hf")
    assert_same_state(hf, saved)
    assert nc.history(hf) == []
