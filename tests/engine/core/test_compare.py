import copy

import pytest
import torch
from torch import nn

import nbcompress as nc
from nbcompress.engine.core.compare import frozen_copy
from tests.helpers import assert_same_state, snapshot


def _fine_tuned_with_kept_masks() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 4)
    )
    x = torch.randn(8, 16)
    nc.prune_(model, 0.5, keep_masks=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).pow(2).mean().backward()  # leaves each masked weight a non-leaf tensor
    opt.step()
    return model, x


def _fine_tuned_with_torch_masks() -> tuple[nn.Module, torch.Tensor]:
    # torch.nn.utils.prune leaves the masked weight a non-leaf tensor after a training
    # forward (nbcompress's own kept masks detach it after each forward).
    model, x = _fine_tuned_with_kept_masks()
    nc.remove_masks_(model)
    for i in (0, 2):
        torch.nn.utils.prune.l1_unstructured(model[i], "weight", 0.5)
    model(x).pow(2).mean().backward()
    return model, x


def test_frozen_copy_works_where_deepcopy_refuses_and_computes_the_same():
    model, x = _fine_tuned_with_torch_masks()
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(model)  # torch's own limit: why compare_change needs frozen_copy
    twin = frozen_copy(model)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
    assert all(p is not q for p, q in zip(twin.parameters(), model.parameters(), strict=True))


def test_compare_change_after_kept_masks_and_fine_tuning():
    model, x = _fine_tuned_with_kept_masks()
    report = nc.compare_change(model, nc.remove_masks_, x, repeats=3)
    assert report.before.latency is not None and report.after.latency is not None
    assert "weight_orig" not in " ".join(model.state_dict())


def test_compare_change_on_a_model_with_torch_prune_masks():
    model, x = _fine_tuned_with_torch_masks()
    report = nc.compare_change(model, lambda m: nc.prune_(m, 0.7, types="Linear"), x, repeats=3)
    assert report.before.latency is not None and report.after.latency is not None


def test_compare_change_leaves_the_model_as_it_was_when_the_change_fails():
    model, x = _fine_tuned_with_kept_masks()
    saved = snapshot(model)

    def failing(m: nn.Module) -> None:
        nc.prune_(m, 1.5)

    with pytest.raises(ValueError, match="amount"):
        nc.compare_change(model, failing, x, repeats=3)
    assert_same_state(model, saved)
