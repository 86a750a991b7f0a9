"""Issue 11 through %prune and %undo: Ctrl-C, sub-module steps, pruning a quantized model."""

from collections import OrderedDict

import pytest
import torch
from IPython.core.error import UsageError
from torch import nn

import nbcompress as nc
from nbcompress.engine.core.history import History
from nbcompress.notebook.magics import _core
from tests.helpers import assert_same_state, mlp, snapshot, zero_fraction


def encoder_model() -> nn.Sequential:
    encoder = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
    return nn.Sequential(OrderedDict(encoder=encoder, head=nn.Linear(32, 4)))


@pytest.fixture
def ns(shell):
    shell.user_ns.update(model=mlp(), enc=encoder_model(), x=torch.randn(4, 16))
    return shell


def magic(shell, line):
    name, _, rest = line.partition(" ")
    return shell.run_line_magic(name, rest)


# F16: %prune is all-or-nothing under Ctrl-C, and says so.


def test_ctrl_c_in_the_after_measurement_restores_the_model_and_says_so(ns, monkeypatch, capsys):
    """Needs the core helper's compare_change (undo when 'after' is interrupted)."""
    from nbcompress.engine.core import compare

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    model = ns.user_ns["model"]
    saved = snapshot(model)
    monkeypatch.setattr(compare, "measure_pair", interrupted)
    with pytest.raises(KeyboardInterrupt):
        magic(ns, "prune model 0.5 --input x")
    err = capsys.readouterr().err
    assert err.strip() == "Interrupted: the model is restored (nothing was changed)."
    assert_same_state(model, saved)
    assert nc.history(model) == []


def test_ctrl_c_in_the_after_summary_restores_the_model(ns, monkeypatch, capsys):
    """Needs the core helper's compare_change (undo when 'after' is interrupted)."""
    from nbcompress.engine.core import compare

    real, calls = compare.summary, []

    def second_call_interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the 'after' summary
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    model = ns.user_ns["model"]
    saved = snapshot(model)
    monkeypatch.setattr(compare, "summary", second_call_interrupted)
    with pytest.raises(KeyboardInterrupt):
        magic(ns, "prune model 0.5")
    assert "the model is restored" in capsys.readouterr().err
    assert_same_state(model, saved)
    assert nc.history(model) == []


def test_the_ctrl_c_line_is_read_from_the_record(ns, monkeypatch, capsys):
    # Whatever the engine did, the line says what the user has: here a recorded step.
    def prune_then_interrupted(model, change, *args, **kwargs):
        change(model)
        raise KeyboardInterrupt

    monkeypatch.setattr(_core, "compare_change", prune_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        magic(ns, "prune model 0.5")
    err = capsys.readouterr().err.strip()
    assert err == "Interrupted after the change was recorded: %undo model reverts it."
    assert [s.name for s in nc.history(ns.user_ns["model"])] == ["prune"]

    def interrupted_before(model, change, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(_core, "compare_change", interrupted_before)
    with pytest.raises(KeyboardInterrupt):
        magic(ns, "prune model 0.5")
    assert capsys.readouterr().err.strip().startswith("Interrupted: the model is restored")


# %undo on a parent: steps recorded on sub-modules count.


def test_undo_list_shows_sub_module_steps_with_their_module(ns):
    """Needs the core helper's history (sub-module steps listed, History.where)."""
    magic(ns, "prune enc.encoder 0.5")
    magic(ns, "prune enc 0.3 --layers head --include-output")
    magic(ns, "prune enc.encoder 0.6")
    listed = magic(ns, "undo enc --list")
    assert isinstance(listed, History)
    assert [r["module"] for r in listed.rows] == ["encoder", "", "encoder"]
    text = str(listed).splitlines()
    assert text[1].split()[:3] == ["step", "module", "operation"] and "undo memory" in text[1]
    assert [line.split()[1] for line in text[3:]] == ["encoder", "prune", "encoder"]


def test_undo_list_shows_the_steps(ns):
    magic(ns, "prune model 0.5")
    listed = magic(ns, "undo model --list")
    assert isinstance(listed, History) and [s.name for s in listed] == ["prune"]
    title, header, rule, row = str(listed).splitlines()
    assert title.startswith("History: 1 step(s), undo memory")
    assert row.split()[:2] == ["1", "prune"] and "50% l1" in row


def test_undo_on_the_parent_reverts_a_sub_module_step(ns, capsys):
    """Needs the core helper's undo_ (a parent undoes its sub-modules' steps)."""
    enc = ns.user_ns["enc"]
    saved = snapshot(enc)
    magic(ns, "prune enc.encoder 0.5")
    assert zero_fraction(enc.encoder[0].weight) == pytest.approx(0.5, abs=0.02)
    left = magic(ns, "undo enc")
    assert "Undid 'prune' on enc.encoder; 0 step(s) remain." in capsys.readouterr().out
    assert list(left) == [] and nc.history(enc.encoder) == []
    assert_same_state(enc, saved)


def test_undo_all_on_the_parent_reverts_every_step_in_order(ns, capsys):
    """Needs the core helper's undo_ (a parent undoes its sub-modules' steps)."""
    enc = ns.user_ns["enc"]
    saved = snapshot(enc)
    magic(ns, "prune enc.encoder 0.5")
    magic(ns, "prune enc 0.5 --include-output")
    magic(ns, "prune enc.encoder 0.7")
    magic(ns, "undo enc --all")
    out = capsys.readouterr().out
    assert "Undid 'prune' on enc.encoder, 'prune', 'prune' on enc.encoder; 0 step(s)" in out
    assert_same_state(enc, saved)


# %prune after %quantize: say the model is quantized, and how to go back.


def test_prune_after_quantize_says_the_model_is_quantized_and_how_to_undo(ns):
    model = ns.user_ns["model"]
    magic(ns, "quantize model int8 --mode weight --repeats 2")
    saved = snapshot(model)
    with pytest.raises(UsageError) as info:
        magic(ns, "prune model 0.5")
    message = str(info.value)
    assert message.startswith("--types: the model has no layer of type Linear")
    assert "model was quantized (%quantize)" in message and "%undo model" in message
    assert "\n" not in message
    assert_same_state(model, saved)
    assert [s.name for s in nc.history(model)] == ["quantize"]


def test_speedup_after_quantize_says_the_model_is_quantized(ns):
    magic(ns, "quantize model int8 --mode weight --repeats 2")
    with pytest.raises(UsageError, match=r"model was quantized \(%quantize\).*%undo model"):
        magic(ns, "speedup model --input x --repeats 3")


def test_a_quantized_sub_module_is_named_with_its_path(ns):
    magic(ns, "quantize enc.encoder int8 --mode weight --repeats 2")
    with pytest.raises(UsageError, match=r"enc\.encoder was quantized \(%quantize\)"):
        magic(ns, "prune enc 0.5 --layers encoder.*")


def test_a_plain_missing_type_is_not_blamed_on_quantization(ns):
    with pytest.raises(UsageError) as info:
        magic(ns, "prune model 0.5 --types Conv2d")
    assert str(info.value) == "--types: the model has no layer of type Conv2d."


class FailsOncePruned(nn.Module):
    """A model whose forward raises once any weight is zero: 'after' fails, 'before' not."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((self.a.weight == 0).any()):
            raise KeyError("input_ids")
        return self.b(torch.relu(self.a(x)))


def test_an_error_in_the_after_measurement_never_leaves_a_silent_change(ns):
    model = FailsOncePruned()
    ns.user_ns["fragile"] = model
    saved = snapshot(model)
    with pytest.raises(UsageError) as info:
        magic(ns, "prune fragile 0.5 --input x")
    assert str(info.value).startswith("--input: ") and "input_ids" in str(info.value)
    if nc.history(model):  # the engine left the step: the line must say so
        assert str(info.value).endswith("The change was recorded: %undo fragile reverts it.")
    else:  # the core helper's compare_change rolled it back
        assert_same_state(model, saved)


def test_ctrl_c_in_quantize_says_the_model_is_restored(ns, capsys):
    model = ns.user_ns["model"].eval()
    saved, calls = snapshot(model), []

    def interrupted_after_quantizing(m):
        calls.append(1)
        if len(calls) == 2:  # the metric of the quantized model
            raise KeyboardInterrupt
        return 1.0

    ns.user_ns["ev"] = interrupted_after_quantizing
    with pytest.raises(KeyboardInterrupt):
        magic(ns, "quantize model int8 --input x --eval ev --repeats 2")
    assert capsys.readouterr().err.strip() == (
        "Interrupted: the model is restored (nothing was changed)."
    )
    assert len(calls) == 2
    assert_same_state(model, saved)
    assert nc.history(model) == []
