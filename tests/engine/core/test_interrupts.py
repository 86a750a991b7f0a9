"""Ctrl-C cannot cut recording, rollback or undo in half (issue 11: F3, F17, F18)."""

import contextlib
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import nbcompress as nc
from nbcompress.engine.core.history import transaction, trial
from nbcompress.engine.core.interrupts import deferred_interrupts
from nbcompress.engine.core.snapshot import ModuleState, SavedTensor
from tests.helpers import assert_same_state, mlp, snapshot


@pytest.fixture(autouse=True)
def _sigint_raises():
    """Ctrl-C raises KeyboardInterrupt here even when the runner ignores SIGINT.

    A background job of a non-interactive shell (``cmd &``) starts with SIGINT ignored, and
    Python then installs no handler; these tests send real SIGINTs and expect the default.
    """
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _same(model: nn.Module, saved: dict) -> bool:
    state = model.state_dict()
    return state.keys() == saved.keys() and all(
        v.dtype == saved[k].dtype and torch.equal(v, saved[k]) for k, v in state.items()
    )


def _interrupt_once(monkeypatch, cls, name: str, at: int) -> list[int]:
    """Make the ``at``-th call of ``cls.name`` raise KeyboardInterrupt (once); count calls."""
    original = getattr(cls, name)
    calls = [0]

    def patched(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, patched)
    return calls


def test_deferred_interrupts_delivers_sigint_after_the_block_and_restores_the_handler():
    before = signal.getsignal(signal.SIGINT)
    done = []
    with pytest.raises(KeyboardInterrupt), deferred_interrupts():
        with deferred_interrupts():  # nested: the outer block delivers
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            done.append("inner")
        done.append("outer")
    assert done == ["inner", "outer"]
    assert signal.getsignal(signal.SIGINT) is before
    with deferred_interrupts():  # nothing pending: nothing raised
        pass


def test_deferred_interrupts_is_a_no_op_off_the_main_thread():
    seen = []

    def worker():
        with deferred_interrupts():
            seen.append(signal.getsignal(signal.SIGINT))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [signal.getsignal(signal.SIGINT)]


def _big_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(512, 512) for _ in range(12)])


def test_real_sigints_during_prune_leave_either_no_change_or_exactly_one_step():
    # F3: 12 of 40 real SIGINTs left the model pruned with an empty history.
    model = _big_model()
    saved = snapshot(model)
    start = time.perf_counter()
    nc.prune_(model, 0.3)
    duration = time.perf_counter() - start
    nc.undo_(model)
    rng = random.Random(11)
    outcomes = {"unchanged": 0, "recorded": 0, "finished": 0}
    for _ in range(30):
        timer = threading.Timer(
            rng.uniform(0, 1.2 * duration), os.kill, (os.getpid(), signal.SIGINT)
        )
        try:
            timer.start()
            nc.prune_(model, 0.3)
            timer.join()
            time.sleep(0.02)  # let a late signal arrive here, not in the checks below
            outcomes["finished"] += 1
        except KeyboardInterrupt:
            timer.join()
        steps = len(nc.history(model))
        if _same(model, saved):
            assert steps == 0, "model unchanged but a step was recorded"
            outcomes["unchanged"] += 1
        else:
            assert steps == 1, "model changed without exactly one step"
            outcomes["recorded"] += 1
            nc.undo_(model)
        assert_same_state(model, saved)
    assert outcomes["unchanged"] > 0  # some interrupts really hit prune_


def _count_calls(monkeypatch, cls, name: str, action) -> int:
    calls = _interrupt_once(monkeypatch, cls, name, at=0)
    action()
    monkeypatch.undo()
    return calls[0]


def test_ctrl_c_at_every_point_while_the_step_is_recorded_rolls_back(monkeypatch):
    # F3, deterministic: a KeyboardInterrupt while prune_ records its step.
    model = mlp()
    saved = snapshot(model)
    n = _count_calls(monkeypatch, SavedTensor, "compress", lambda: nc.prune_(model, 0.5))
    nc.undo_(model)
    assert n > 1
    for at in range(1, n + 1):
        _interrupt_once(monkeypatch, SavedTensor, "compress", at)
        with pytest.raises(KeyboardInterrupt):
            nc.prune_(model, 0.5)
        monkeypatch.undo()
        assert nc.history(model) == []
        assert_same_state(model, saved)


def _trial_prune(model: nn.Module) -> None:
    with trial(model):
        nc.prune_(model, 0.5, include_output=True)


def _failing_edit(model: nn.Module) -> None:
    with transaction(model, "edit") as tx:
        for layer in (model[0], model[2]):
            tx.save(layer)
            with torch.no_grad():
                layer.weight.zero_()
        raise RuntimeError("boom")


@pytest.mark.parametrize(("cls", "name"), [(SavedTensor, "restore"), (ModuleState, "restore")])
@pytest.mark.parametrize("edit", [_trial_prune, _failing_edit])
def test_ctrl_c_at_every_point_of_a_rollback_still_restores_everything(
    monkeypatch, cls, name, edit
):
    # F17: an interrupt in a trial's rollback left the layer pruned.
    model = mlp()
    saved = snapshot(model)

    def run_once():
        with contextlib.suppress(RuntimeError):
            edit(model)

    n = _count_calls(monkeypatch, cls, name, run_once)
    assert n > 0
    for at in range(1, n + 1):
        _interrupt_once(monkeypatch, cls, name, at)
        with pytest.raises(KeyboardInterrupt):
            edit(model)
        monkeypatch.undo()
        assert_same_state(model, saved)
        assert nc.history(model) == []


@pytest.mark.parametrize(("cls", "name"), [(SavedTensor, "restore"), (ModuleState, "restore")])
def test_ctrl_c_at_every_point_of_undo_all_leaves_a_consistent_model(monkeypatch, cls, name):
    # F18: an interrupted undo_(all=True) left a mixed state and a misleading refusal.
    model = mlp()
    states = [snapshot(model)]

    def prune_three_times():
        for amount in (0.3, 0.5, 0.7):
            nc.prune_(model, amount, include_output=True)
            states.append(snapshot(model))

    prune_three_times()
    n = _count_calls(monkeypatch, cls, name, lambda: nc.undo_(model, all=True))
    for at in range(1, n + 1):
        del states[1:]
        prune_three_times()
        _interrupt_once(monkeypatch, cls, name, at)
        with pytest.raises(KeyboardInterrupt):
            nc.undo_(model, all=True)
        monkeypatch.undo()
        assert_same_state(model, states[len(nc.history(model))])
        nc.undo_(model, all=True) if nc.history(model) else None
        assert_same_state(model, states[0])


def test_a_ctrl_c_landing_on_the_trials_rollback_line_waits_for_the_rollback():
    import sys

    import nbcompress.engine.core.history as history_module
    from nbcompress.engine.core.history import trial

    model = torch.nn.Linear(4, 4)
    before = model.weight.detach().clone()
    source = Path(history_module.__file__).read_text().splitlines()
    line = max(i for i, text in enumerate(source, 1) if text.strip() == "tx.rollback()")
    fired: list[int] = []

    def tracer(frame, event, arg):
        if frame.f_code.co_filename == history_module.__file__ and frame.f_code.co_name == "trial":

            def on_line(f, e, a):
                if e == "line" and f.f_lineno == line and not fired:
                    fired.append(1)
                    signal.raise_signal(signal.SIGINT)  # the user's Ctrl-C, right there
                return on_line

            return on_line
        return None

    sys.settrace(tracer)
    try:
        with pytest.raises(KeyboardInterrupt), trial(model) as tx:
            tx.save(model)
            with torch.no_grad():
                model.weight.zero_()
    finally:
        sys.settrace(None)
    assert fired and torch.equal(model.weight, before)
