import pytest
import torch
from torch import nn

import nbcompress as nc
from nbcompress.engine.core.history import transaction, trial
from nbcompress.engine.prune import step as prune_module
from tests.helpers import assert_same_state, cnn, mlp, snapshot


def test_undo_restores_bit_exactly():
    model = cnn()
    model[0].weight.data[0, 0, 0, 0] = -0.0  # signed zero must come back as -0.0
    saved = snapshot(model)
    nc.prune_(model, 0.5)
    nc.prune_(model, 0.8, method="random")
    nc.prune_(model, 0.3, granularity="channel")
    assert len(nc.history(model)) == 3
    nc.undo_(model)
    assert len(nc.history(model)) == 2
    nc.undo_(model, all=True)
    assert_same_state(model, saved)
    assert nc.history(model) == []


def test_undo_after_kept_masks_and_fine_tuning_is_bit_exact_and_keeps_parameter_ids():
    model = mlp()
    saved = snapshot(model)
    ids = [id(p) for p in model.parameters()]
    nc.prune_(model, 0.5, keep_masks=True)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 16)).sum().backward()
        opt.step()
    nc.undo_(model)
    assert_same_state(model, saved)
    assert [id(p) for p in model.parameters()] == ids
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_undo_refuses_when_weights_changed_since_a_diff_step():
    model = nn.Sequential(nn.Linear(200, 200), nn.Linear(200, 2))
    nc.prune_(model, 0.1)  # 10% changed → stored as a sparse diff
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(ValueError, match="force=True"):
        nc.undo_(model)
    nc.undo_(model, force=True)
    assert nc.history(model) == []


def test_history_memory_is_bounded_and_reported():
    model = nn.Sequential(nn.Linear(400, 400), nn.Linear(400, 2))
    nc.prune_(model, 0.1)
    diff_bytes = nc.history(model).nbytes
    dense_bytes = 400 * 400 * 4
    assert 0 < diff_bytes < dense_bytes / 2  # only changed entries kept
    assert "undo memory" in str(nc.history(model))
    nc.set_history_limit(diff_bytes + 1)
    try:
        with pytest.warns(UserWarning, match="dropped the 1 oldest"):
            nc.prune_(model, 0.2)
        assert len(nc.history(model)) == 1
    finally:
        nc.set_history_limit(4 * 2**30)


def test_nothing_is_lost_when_an_operation_fails_part_way(monkeypatch):
    model = cnn()
    saved = snapshot(model)
    calls = {"n": 0}
    real = prune_module.apply_mask

    def failing(tx, module, mask, *, keep_masks):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure")
        real(tx, module, mask, keep_masks=keep_masks)

    monkeypatch.setattr(prune_module, "apply_mask", failing)
    with pytest.raises(RuntimeError, match="injected"):
        nc.prune_(model, 0.5, keep_masks=True)
    assert calls["n"] == 2
    assert_same_state(model, saved)
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert nc.history(model) == []


def test_nothing_is_lost_on_keyboard_interrupt(monkeypatch):
    model = mlp()
    saved = snapshot(model)
    real = prune_module.apply_mask
    seen = []

    def interrupted(tx, module, mask, *, keep_masks):
        real(tx, module, mask, keep_masks=keep_masks)
        seen.append(module)
        if len(seen) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(prune_module, "apply_mask", interrupted)
    with pytest.raises(KeyboardInterrupt):
        nc.prune_(model, 0.5)
    assert_same_state(model, saved)


def test_replace_and_trial_roll_back_modules():
    model = mlp()
    first = model[0]
    saved = snapshot(model)
    with trial(model) as tx:
        tx.replace("0", nn.Identity())
        nc.prune_(model, 0.5, layers="2")  # joins the trial
        assert isinstance(model[0], nn.Identity)
    assert model[0] is first
    assert_same_state(model, saved)
    assert nc.history(model) == []
    with transaction(model, "swap", "Linear → Identity") as tx:
        tx.replace("0", nn.Identity())
    assert nc.history(model)[-1].nbytes >= first.weight.numel() * 4
    nc.undo_(model)
    assert model[0] is first


def test_undo_without_history_explains():
    with pytest.raises(ValueError, match="nothing to undo"):
        nc.undo_(mlp())


def test_undo_on_the_parent_undoes_the_step_recorded_on_its_sub_module():
    # Issue 11: `%prune model.encoder 0.5` then `%undo model` said "nothing to undo".
    model = nn.Sequential(mlp(), nn.Linear(4, 2))
    saved = snapshot(model)
    nc.prune_(model[0], 0.5)
    assert [s.name for s in nc.history(model)] == ["prune"]
    assert nc.history(model).rows[0]["module"] == "0"
    module_column = [line.split()[1] for line in str(nc.history(model)).splitlines()[3:]]
    assert module_column == ["0"]  # the sub-module the step was made on, in its own column
    nc.undo_(model)
    assert_same_state(model, saved)
    assert nc.history(model) == [] and nc.history(model[0]) == []


def test_undo_on_a_parent_goes_back_most_recent_first_across_its_sub_modules():
    model = nn.Sequential(mlp(), nn.Linear(4, 2))
    states = [snapshot(model)]
    nc.prune_(model[0], 0.5)  # recorded on the sub-module
    states.append(snapshot(model))
    nc.prune_(model, 0.7, include_output=True)  # recorded on the parent
    states.append(snapshot(model))
    nc.prune_(model[0], 0.8)
    states.append(snapshot(model))
    assert [r["module"] for r in nc.history(model).rows] == ["0", "", "0"]
    assert nc.history(model).nbytes == sum(s.nbytes for s in nc.history(model))
    nc.undo_(model)
    assert_same_state(model, states[2])
    assert len(nc.history(model)) == 2 and len(nc.history(model[0])) == 1
    nc.undo_(model, all=True)
    assert_same_state(model, states[0])
    with pytest.raises(ValueError, match="nothing to undo"):
        nc.undo_(model)


def test_history_shows_its_listing_in_ipython_not_the_list_of_steps():
    from IPython.lib.pretty import pretty

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    nc.prune_(model, 0.5, include_output=True)
    text = pretty(nc.history(model))
    assert text == str(nc.history(model)) and "Step(" not in text and "prune" in text
