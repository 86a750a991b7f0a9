"""Listeners of a model's history (on_change) and history tokens.

Each test states one invariant: who is told, when, with what; what the subscription keeps
alive (nothing); and that a raising listener never breaks the edit that triggered it.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import nbcompress as nc
from nbcompress.engine.core.history import (
    Change,
    history_token,
    on_change,
    steps_since,
    transaction,
    trial,
)
from tests.helpers import assert_same_state, mlp, snapshot


class Recorder:
    """Keeps every Change it is told of (subscribed through a bound method)."""

    def __init__(self) -> None:
        self.changes: list[Change] = []

    def __call__(self, change: Change) -> None:
        self.changes.append(change)

    def told(self, change: Change) -> None:
        self.changes.append(change)


def test_recorded_and_undone_steps_are_announced_after_the_model_changed():
    model = mlp()
    seen: list[tuple[str, int, int]] = []

    def listener(change: Change) -> None:
        # Called with the model already in its new state, the step already in the history.
        zero = int((change.model[0].weight == 0).sum())
        seen.append((change.kind, len(nc.history(change.model)), zero))

    on_change(model, listener)
    nc.prune_(model, 0.5)
    nc.undo_(model)
    half = model[0].weight.numel() // 2
    assert seen == [("recorded", 1, half), ("undone", 0, 0)]


def test_the_change_names_the_step_and_the_module():
    model = mlp()
    rec = Recorder()
    on_change(model, rec)
    nc.prune_(model, 0.5)
    (change,) = rec.changes
    assert change.model is model and change.module is model
    assert change.steps == (nc.history(model)[-1],) and change.steps[0].name == "prune"


def test_undo_all_is_one_announcement_with_every_step():
    model = mlp()
    nc.prune_(model, 0.3)
    nc.prune_(model, 0.6)
    steps = list(nc.history(model))
    rec = Recorder()
    on_change(model, rec)
    nc.undo_(model, all=True)
    assert [c.kind for c in rec.changes] == ["undone"]
    assert set(map(id, rec.changes[0].steps)) == set(map(id, steps))


def test_undo_refused_part_way_still_announces_the_steps_it_undid():
    model = nn.Sequential(nn.Linear(200, 200), nn.Linear(200, 2))
    nc.prune_(model, 0.1)  # a sparse diff: refused once the weight changes
    with torch.no_grad():
        model[0].weight.add_(1.0)
    nc.prune_(model, 0.5, include_output=True)
    rec = Recorder()
    on_change(model, rec)
    with pytest.raises(ValueError, match="force=True"):
        nc.undo_(model, all=True)
    assert [(c.kind, len(c.steps)) for c in rec.changes] == [("undone", 1)]
    assert len(nc.history(model)) == 1


def test_steps_on_a_sub_module_or_a_containing_module_are_announced():
    model = mlp()
    parent, child, other = Recorder(), Recorder(), Recorder()
    on_change(model, parent)
    on_change(model[2], child)
    on_change(mlp(), other)
    nc.prune_(model[2], 0.5, include_output=True)  # a sub-module of the watched model
    nc.prune_(model, 0.5)  # a module containing the watched sub-module
    assert [c.module for c in parent.changes] == [model[2], model]
    assert [c.module for c in child.changes] == [model[2], model]
    assert other.changes == []


def test_trials_and_rolled_back_edits_announce_nothing():
    model = mlp()
    rec = Recorder()
    on_change(model, rec)
    with trial(model):
        nc.prune_(model, 0.9)
    with pytest.raises(RuntimeError), transaction(model, "broken") as tx:
        tx.save(model[0])
        model[0].weight.data.zero_()
        raise RuntimeError("part-way")
    assert rec.changes == []
    assert nc.history(model) == []


def test_a_raising_listener_never_breaks_prune_or_undo():
    model = mlp()
    saved = snapshot(model)
    after = Recorder()

    def broken(change: Change) -> None:
        raise RuntimeError("display went away")

    on_change(model, broken)
    on_change(model, after)
    with pytest.warns(RuntimeWarning, match="display went away.*the recorded step stands"):
        nc.prune_(model, 0.5)
    assert len(nc.history(model)) == 1
    assert float((model[0].weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    with pytest.warns(RuntimeWarning, match="the undone step stands"):
        nc.undo_(model)
    assert_same_state(model, saved)
    assert [c.kind for c in after.changes] == ["recorded", "undone"]  # the others still told


def test_a_bound_method_listener_keeps_neither_its_object_nor_the_model_alive():
    model = mlp()
    rec = Recorder()
    subscription = on_change(model, rec.told)
    nc.prune_(model, 0.5)
    assert len(rec.changes) == 1
    rec_ref, model_ref = weakref.ref(rec), weakref.ref(model)
    del rec
    gc.collect()
    assert rec_ref() is None  # not kept alive by the subscription
    assert subscription.callback is None
    nc.prune_(model, 0.7)  # the dead listener is skipped and dropped
    del model
    gc.collect()
    assert model_ref() is None  # nor is the model


def test_remove_stops_a_plain_function_listener():
    model = mlp()
    calls: list[str] = []
    subscription = on_change(model, lambda change: calls.append(change.kind))
    nc.prune_(model, 0.5)
    subscription.remove()
    subscription.remove()  # idempotent
    nc.undo_(model)
    assert calls == ["recorded"]


def test_on_change_rejects_what_is_not_a_model_or_a_callable():
    with pytest.raises(TypeError, match="model: expected an nn.Module"):
        on_change("model", print)
    with pytest.raises(TypeError, match="callback: expected a callable"):
        on_change(mlp(), None)


def test_history_token_is_the_same_after_undo_and_new_after_another_step():
    model = mlp()
    empty = history_token(model)
    assert empty == ()
    nc.prune_(model, 0.5)
    one = history_token(model)
    assert one != empty
    nc.prune_(model, 0.7)
    assert [s.name for s in steps_since(model, one)] == ["prune"]
    nc.undo_(model)
    assert history_token(model) == one and steps_since(model, one) == []
    nc.undo_(model)
    nc.prune_(model, 0.5)  # same edit, new step: not the same history
    assert history_token(model) != one
    # A step on a sub-module is part of the model's token.
    nc.prune_(model[0], 0.2, include_output=True)
    assert len(history_token(model)) == 2
