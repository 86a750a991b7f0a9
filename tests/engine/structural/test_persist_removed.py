"""Save/load next to undo: save leaves the history alone, load records no step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nbcompress.engine.core.history import history, transaction, undo_
from nbcompress.engine.prune.prune import prune_
from nbcompress.engine.structural.fold import fold_constants
from nbcompress.engine.structural.persist import load, save


def _build() -> nn.Sequential:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 1, bias=False),
        nn.Flatten(),
        nn.Linear(6 * 16, 4),
    )
    with torch.no_grad():
        model[1].bias.uniform_(0.5, 1.5)
        model[1].running_mean.uniform_(-1, 0)
    return model.eval()


REMOVED = [2, 5]
X = torch.randn(3, 3, 4, 4)


def _remove(model: nn.Sequential) -> None:
    """Zeroed channels removed the way remove_ does: fold, then shrink, in one undoable step."""
    with torch.no_grad():
        model[0].weight[REMOVED] = 0
        model[0].bias[REMOVED] = 0
    idxs = frozenset(REMOVED)
    plan = {("0", "out"): idxs, ("1", "out"): idxs, ("3", "in"): idxs}
    keep = torch.tensor([i for i in range(8) if i not in idxs])
    with transaction(model, "remove") as tx:
        fold_constants(model, plan, X, tx)
        conv, bn, nxt = model[0], model[1], model[3]
        for m in (conv, bn, nxt):
            tx.save(m)
        with torch.no_grad():
            conv.weight, conv.bias = nn.Parameter(conv.weight[keep]), nn.Parameter(conv.bias[keep])
            bn.weight, bn.bias = nn.Parameter(bn.weight[keep]), nn.Parameter(bn.bias[keep])
            bn.running_mean, bn.running_var = bn.running_mean[keep], bn.running_var[keep]
            nxt.weight = nn.Parameter(nxt.weight[:, keep])
        conv.out_channels = bn.num_features = nxt.in_channels = len(keep)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_removed_model_round_trips_and_its_undo_still_works(tmp_path) -> None:
    model = _build()
    with torch.no_grad():
        model[0].weight[REMOVED] = 0
        model[0].bias[REMOVED] = 0
    original, params = _state(model), dict(model.named_parameters())
    expected = model(X)
    _remove(model)
    torch.testing.assert_close(model(X), expected, rtol=1e-5, atol=1e-5)  # exact removal
    save(model, tmp_path / "m.pt")
    assert [s.name for s in history(model)] == ["remove"]  # save records nothing
    fresh = load(tmp_path / "m.pt", _build())
    assert torch.equal(fresh(X), model(X))
    assert fresh[3].bias is not None  # the bias fold_constants created
    undo_(model)  # the saved model itself is still undoable, bit-exactly
    assert dict(model.named_parameters()) == params
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_load_records_no_step(tmp_path) -> None:
    model = _build()
    _remove(model)
    save(model, tmp_path / "m.pt")
    fresh = load(tmp_path / "m.pt", _build())
    assert len(history(fresh)) == 0
    with pytest.raises(ValueError, match="nothing to undo"):
        undo_(fresh)


def test_the_loaded_model_is_compressed_and_undone_like_any_other(tmp_path) -> None:
    model = _build()
    _remove(model)
    save(model, tmp_path / "m.pt")
    fresh = load(tmp_path / "m.pt", _build())
    loaded = _state(fresh)
    prune_(fresh, 0.5)
    assert not all(torch.equal(v, loaded[k]) for k, v in fresh.state_dict().items())
    undo_(fresh)
    assert all(torch.equal(v, loaded[k]) for k, v in fresh.state_dict().items())


def test_load_over_a_model_with_steps_to_undo_is_refused(tmp_path) -> None:
    model = _build()
    _remove(model)
    save(model, tmp_path / "m.pt")
    other = _build()
    prune_(other, 0.5)
    before = _state(other)
    with pytest.raises(ValueError, match="1 recorded nbcompress step") as err:
        load(tmp_path / "m.pt", other)
    assert "\n" not in str(err.value) and "undo_(model, all=True)" in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    undo_(other)  # its own history is intact
