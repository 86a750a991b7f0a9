"""Issue 11: a training evaluate, structured outputs, interrupted restores, real models."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
from torch import nn

import nbcompress as nc
from nbcompress.engine.core.snapshot import ModuleState, SavedTensor
from nbcompress.engine.sensitivity import ladder
from nbcompress.engine.sensitivity.entries import PrunedEntries
from nbcompress.engine.sensitivity.evaluate import EvaluationError
from nbcompress.engine.sensitivity.guard import Fingerprint, ModelNotRestored
from nbcompress.engine.sensitivity.ladder import SortedEntries
from nbcompress.engine.sensitivity.refine import refine
from tests.helpers import assert_same_state, cnn, mlp, snapshot
from tests.real_models import BUILDERS


def _trainer(model: nn.Module, x: torch.Tensor, steps: int = 1, momentum: float = 0.9):
    """An evaluate that fine-tunes briefly (optimizer steps), then measures."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum)

    def finetuned(m):
        for _ in range(steps):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
        with torch.no_grad():
            return float(-m(x).pow(2).mean())

    return finetuned


def test_an_evaluate_that_trains_leaves_the_model_bit_exact():
    torch.manual_seed(0)
    model, x = mlp(), torch.randn(8, 16)
    before = snapshot(model)
    result = nc.sensitivity(model, _trainer(model, x, steps=2), ratios=[0.5], progress=False)
    assert_same_state(model, before)
    assert all(p.grad is None for p in model.parameters())
    assert result.complete and any("evaluate trained" in n for n in result.notes)


def test_each_point_starts_from_the_model_as_it_was():
    # With the fine-tuning put back after every call, a point does not depend on the ones
    # measured before it: sweeping one layer alone gives the same value (plain SGD: no
    # optimizer state carries over between calls).
    torch.manual_seed(0)
    model, x = mlp(), torch.randn(8, 16)
    twin = copy.deepcopy(model)
    every = nc.sensitivity(
        model, _trainer(model, x, momentum=0), ratios=[0.5], include_output=True, progress=False
    )
    alone = nc.sensitivity(
        twin, _trainer(twin, x, momentum=0), ratios=[0.5], layers="4", progress=False
    )
    assert every.curves["4"] == alone.curves["4"] and every.baseline == alone.baseline


def test_a_manual_gradient_step_is_put_back_too():
    torch.manual_seed(0)
    model, x = cnn(), torch.randn(4, 1, 8, 8)
    before = snapshot(model)

    def manual_sgd(m):
        m(x).sum().backward()
        with torch.no_grad():
            for p in m.parameters():
                p.data.add_(p.grad, alpha=-0.1)  # .data: no version bump, saved by the hook
        return 1.0

    nc.sensitivity(model, manual_sgd, ratios=[0.5], progress=False)
    assert_same_state(model, before)


def test_a_write_without_a_gradient_step_is_refused_naming_evaluate():
    model = mlp()

    def rescales(m):
        with torch.no_grad():
            m[0].weight.mul_(0.5)
        return 1.0

    with pytest.raises(EvaluationError, match=r"evaluate: rescales\(model\) .*changed the mo"):
        nc.sensitivity(model, rescales, ratios=[0.5], progress=False)


def test_a_hidden_write_is_caught_by_the_final_checksum_not_claimed_restored():
    model = mlp()

    def hidden(m):  # .data writes bump no version counter
        m[2].bias.data.add_(1.0)
        return 1.0

    with pytest.raises(ModelNotRestored, match=r"sensitivity: the model differs .* 2\.bias") as err:
        nc.sensitivity(model, hidden, ratios=[0.5], progress=False)
    assert err.value.names == ["2.bias"] and err.value.result is not None


def test_refine_and_prune_to_with_a_training_evaluate():
    torch.manual_seed(0)
    model, x = mlp(), torch.randn(8, 16)
    before = snapshot(model)
    refine(model, _trainer(model, x), 0.5, budget=4)
    assert_same_state(model, before)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nc.prune_to_(model, _trainer(model, x), 0.5, stages=2, ratios=[0.3, 0.6, 0.9],
                     progress=False)  # fmt: skip
    for key, value in model.state_dict().items():  # pruned, never fine-tuned
        kept = value != 0
        assert torch.equal(value[kept], before[key][kept]), key
    nc.undo_(model)
    assert_same_state(model, before)


@dataclasses.dataclass
class _Out:
    ids: torch.Tensor
    first: torch.Tensor
    second: torch.Tensor


class _TwoHeads(nn.Module):
    """A shared body and two heads; ``kind`` picks the output structure."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.a, self.b, self.kind = (
            nn.Linear(8, 16),
            nn.Linear(16, 6),
            nn.Linear(16, 6),
            kind,
        )

    def forward(self, x):
        h = torch.relu(self.body(x))
        ids = torch.arange(len(x))
        first, second = self.a(h), self.b(h)
        if self.kind == "dict":
            return {"input_ids": ids, "token_embeddings": first, "sentence_embedding": second}
        if self.kind == "tuple":
            return ids, (first, second)
        return _Out(ids, first, second)


@pytest.mark.parametrize("kind", ["dict", "tuple", "dataclass"])
def test_the_proxy_compares_every_tensor_of_a_structured_output(kind):
    model, x = _TwoHeads(kind), torch.randn(16, 8)
    before = snapshot(model)
    result = nc.sensitivity(model, example_inputs=x, ratios=[0.9], layers="b", progress=False)
    assert result.baseline == pytest.approx(1.0) and "2 output tensors" in result.metric
    assert result.curves["b"][0] < 0.999  # the second tensor is compared, not just the first
    assert_same_state(model, before)


def test_the_proxy_refuses_an_output_without_floating_tensors():
    class Labels(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return {"label": self.fc(x).argmax(1)}

    with pytest.raises(TypeError, match="the model returned none .*dict.*--eval"):
        nc.sensitivity(
            Labels(), example_inputs=torch.randn(2, 4), ratios=[0.5], include_output=True,
            progress=False,
        )  # fmt: skip


def _interrupt_restore(monkeypatch, times: int | None, cls: type = SavedTensor):
    """Make ``cls.restore`` raise KeyboardInterrupt (the first ``times`` calls, or all)."""
    original, calls = cls.restore, []

    def restore(self):
        calls.append(1)
        if times is None or len(calls) <= times:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(cls, "restore", restore)


def _rollback_case(kind: str, monkeypatch=None) -> tuple[nn.Module, str]:
    """A model and granularity whose trials restore through ``kind``'s ``restore``.

    A plain weight is restored from its zeroed entries: a prefix of its L1 order
    (SortedEntries), or found chunk by chunk when no order is kept (PrunedEntries); a removed
    channel's bias from the trial's transaction (SavedTensor); a parametrized weight is
    pruned by ``prune_ratios_`` inside the trial, which saves the module (ModuleState).
    """
    torch.manual_seed(0)
    model = mlp()
    if kind == "PrunedEntries":
        monkeypatch.setattr(ladder, "MAX_ELEMENTS", 0)  # too large to keep an order
    if kind == "ModuleState":
        for i in (0, 2, 4):
            nn.utils.parametrizations.weight_norm(model[i])
    return model, "channel" if kind == "SavedTensor" else "element"


_CLASSES = {
    "PrunedEntries": PrunedEntries,
    "SavedTensor": SavedTensor,
    "ModuleState": ModuleState,
    "SortedEntries": SortedEntries,
}


@pytest.mark.parametrize("kind", sorted(_CLASSES))
def test_ctrl_c_inside_a_trials_rollback_is_finished_and_verified(monkeypatch, kind):
    (model, granularity), x = _rollback_case(kind, monkeypatch), torch.randn(8, 16)
    before = snapshot(model)
    _interrupt_restore(monkeypatch, times=1, cls=_CLASSES[kind])  # the first point's rollback
    result = nc.sensitivity(
        model, lambda m: float(m(x).sum().detach()), ratios=[0.5], granularity=granularity,
        progress=False,
    )  # fmt: skip
    monkeypatch.undo()
    assert_same_state(model, before)
    assert not result.complete
    assert any("Interrupted" in n and "restored (verified by checksum)" in n for n in result.notes)


@pytest.mark.parametrize("kind", ["PrunedEntries", "SavedTensor", "SortedEntries"])
def test_a_restore_that_keeps_failing_is_never_called_restored(monkeypatch, kind):
    (model, granularity), x = _rollback_case(kind, monkeypatch), torch.randn(8, 16)
    _interrupt_restore(monkeypatch, times=None, cls=_CLASSES[kind])
    with pytest.raises(ModelNotRestored, match="could not be restored"):
        nc.sensitivity(
            model, lambda m: float(m(x).sum().detach()), ratios=[0.5], granularity=granularity,
            progress=False,
        )  # fmt: skip


def test_fingerprint_sees_nan_and_negative_zero():
    t = torch.tensor([0.0, 1.0, float("nan")])
    fp = Fingerprint([("t", t)])
    assert fp.changed([("t", t.clone())]) == []
    assert fp.changed([("t", torch.tensor([-0.0, 1.0, float("nan")]))]) == ["t"]
    assert fp.changed([]) == ["t"]


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("proxy", [True, False])
def test_sensitivity_on_real_architectures(name, proxy):
    model, x = BUILDERS[name]()
    inputs = x if isinstance(x, tuple) else (x,)
    before = snapshot(model)

    def evaluate(m):
        with torch.no_grad():
            return float(m(*inputs).float().pow(2).mean())

    kwargs = {"example_inputs": x} if proxy else {"evaluate": evaluate}
    result = nc.sensitivity(model, ratios=[0.5, 0.9], progress=False, **kwargs)
    assert result.complete and all(None not in c for c in result.curves.values())
    assert_same_state(model, before)


def test_ctrl_c_inside_a_refine_rollback_still_leaves_the_model_restored(monkeypatch):
    model, x = mlp(), torch.randn(8, 16)
    before = snapshot(model)
    _interrupt_restore(monkeypatch, times=1)
    with pytest.raises(KeyboardInterrupt):
        refine(model, lambda m: float(m(x).sum().detach()), 0.5, budget=4)
    monkeypatch.undo()
    assert_same_state(model, before)


def test_the_proxy_never_updates_batchnorm_of_a_train_mode_model():
    # The proxy measures after apply_suggestion_ too: in train mode that forward would move
    # the running statistics, which the step does not save and undo cannot bring back.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32), nn.Linear(32, 4)
    ).train()
    x = torch.randn(8, 16)
    saved = snapshot(model)
    result = nc.sensitivity(model, example_inputs=x, progress=False, ratios=[0.25, 0.5])
    result.suggest(0.3)
    nc.apply_suggestion_(model)
    nc.undo_(model)
    assert model.training and all(m.training for m in model.modules())
    assert_same_state(model, saved)
