"""Example inputs: mappings (Hugging Face / sentence-transformers), one-line errors (F16, F21)."""

from collections import UserDict

import pytest
import torch
from torch import nn

import nbcompress as nc
from nbcompress.engine.core import compare as compare_module
from nbcompress.engine.core.compare import compare_change
from nbcompress.engine.core.summary import capture_calls
from nbcompress.engine.core.validation import as_inputs, call_model, run_forward
from tests.helpers import assert_same_state, mlp, snapshot


class KeywordModel(nn.Module):
    """Hugging Face style: named keyword arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 8)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids) * attention_mask.unsqueeze(-1)
        return {"last_hidden_state": self.proj(h)}


class Features(nn.Module):
    """sentence-transformers style: the dict of features is one argument, extended in place."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 8)

    def forward(self, features: dict):
        h = self.proj(self.embed(features["input_ids"]))
        features["sentence_embedding"] = h.mean(1)
        return features


def _batch():
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 6))
    return UserDict({"input_ids": ids, "attention_mask": torch.ones(2, 6)})  # BatchEncoding-like


@pytest.mark.parametrize("model", [KeywordModel(), nn.Sequential(Features())])
def test_a_mapping_is_passed_as_the_forward_asks_everywhere_an_input_is_taken(model):
    batch = _batch()
    inputs = as_inputs(batch)
    out = run_forward(model, inputs)
    assert isinstance(out, dict)
    assert set(batch) == {"input_ids", "attention_mask"}  # the user's dict is not extended
    calls = capture_calls(model, {n: m for n, m in model.named_modules() if n}, inputs)
    assert any(n.endswith("proj") for n in calls)
    report = nc.summary(model, batch)
    assert "input_ids" in report.inputs
    saved = snapshot(model)
    comparison = compare_change(model, lambda m: nc.prune_(m, 0.5, include_output=True), batch)
    assert comparison.after.latency is not None
    nc.undo_(model)
    assert_same_state(model, saved)


def test_a_hugging_face_model_takes_a_batch_encoding_as_keywords():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    model = transformers.BertModel(config).eval()
    batch = transformers.BatchEncoding(dict(_batch()))
    out = call_model(model, as_inputs(batch))
    assert out.last_hidden_state.shape == (2, 6, 16)


def test_a_forward_whose_one_parameter_is_a_key_gets_keywords():
    class OneKey(nn.Module):
        def forward(self, input_ids):
            return input_ids * 2

    assert torch.equal(
        call_model(OneKey(), as_inputs({"input_ids": torch.ones(2)})), 2 * torch.ones(2)
    )


def test_a_mapping_without_tensors_is_refused_in_one_line():
    with pytest.raises(TypeError, match="example_inputs: .*return_tensors='pt'"):
        as_inputs({"input_ids": [[1, 2, 3]]})


@pytest.mark.parametrize("error", [KeyError("input_ids"), AssertionError("shape"), LookupError()])
def test_any_error_of_the_forward_is_one_line_naming_example_inputs(error):
    class Broken(nn.Module):
        def forward(self, x):
            raise error

    with pytest.raises(ValueError, match=f"example_inputs: .*{type(error).__name__}") as info:
        run_forward(Broken(), (torch.ones(2, 3),))
    assert "\n" not in str(info.value)


def test_an_empty_batch_is_refused_naming_the_argument():
    with pytest.raises(ValueError, match=r"calibrate: the batch is empty .*\(0, 16\)"):
        as_inputs(torch.zeros(0, 16), "calibrate")
    with pytest.raises(ValueError, match="example_inputs: the batch is empty"):
        as_inputs({"input_ids": torch.zeros(0, 6, dtype=torch.long)})


@pytest.mark.parametrize("fail_in", ["summary", "measure_pair"])
def test_compare_change_undoes_the_change_when_measuring_after_it_is_interrupted(
    monkeypatch, fail_in
):
    # F16: %prune committed, then Ctrl-C while measuring "after" left the model pruned.
    model = mlp()
    saved = snapshot(model)
    original = getattr(compare_module, fail_in)
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == (2 if fail_in == "summary" else 1):
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(compare_module, fail_in, interrupted)
    with pytest.raises(KeyboardInterrupt):
        compare_change(model, lambda m: nc.prune_(m, 0.5), torch.randn(4, 16), repeats=2)
    assert_same_state(model, saved)
    assert nc.history(model) == []


def test_compare_change_keeps_earlier_steps_when_it_undoes_its_own(monkeypatch):
    model = mlp()
    nc.prune_(model, 0.3)
    saved = snapshot(model)
    monkeypatch.setattr(compare_module, "compare", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        compare_change(model, lambda m: nc.prune_(m, 0.6))
    assert_same_state(model, saved)
    assert [s.name for s in nc.history(model)] == ["prune"]
