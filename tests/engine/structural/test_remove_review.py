"""Regressions from the issue-13 review: training-only branches, stale graph cache, frozen
layers, training flags after undo, tied weights, and bad bounds / quantized layers."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from core_models import same_state, state
from torch import nn

from nbcompress.engine.core.history import history, undo_
from nbcompress.engine.prune.prune import prune_
from nbcompress.engine.structural import graph, remove
from nbcompress.engine.structural.child import run_bounded
from nbcompress.engine.structural.remove import remove_


class _Aux(nn.Module):
    """An auxiliary head that only runs in training mode (as GoogLeNet's, Inception's)."""

    def __init__(self, strict: bool = False) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3)
        self.bn = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3)
        self.fc = nn.Linear(16, 2)
        self.aux = nn.Linear(16, 2)
        self.strict = strict

    def forward(self, x):
        h = self.bn(self.c1(x)).relu()
        out = self.fc(self.c2(h).relu().mean((2, 3)))
        if self.training:
            if self.strict and h.shape[1] != 16:  # a width the graph cannot see
                raise RuntimeError("aux expects 16 channels")
            return out, self.aux(h.mean((2, 3)))
        return out


def _x(n=2, size=8):
    torch.manual_seed(1)
    return torch.randn(n, 3, size, size)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_training_only_branch_is_in_the_graph_and_both_modes_run(mode):
    torch.manual_seed(0)
    model, x = getattr(_Aux(), mode)(), _x()
    tracked = model.bn.num_batches_tracked.clone()
    rng = torch.get_rng_state()
    remove_(model, 0.5, example_inputs=x)
    assert model.c1.out_channels < 16 and model.aux.in_features == model.c1.out_channels
    assert model.training == (mode == "train")
    assert torch.equal(model.bn.num_batches_tracked, tracked)  # no trace of the checks
    assert torch.equal(torch.get_rng_state(), rng)
    model.eval()
    assert model(x).shape == (2, 2)
    model.train()
    out, aux = model(x)
    assert out.shape == aux.shape == (2, 2)


def test_a_training_forward_that_breaks_after_removal_rolls_back():
    torch.manual_seed(0)
    model, x = _Aux(strict=True).train(), _x()
    saved = state(model)
    flags = {n: m.training for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="in training mode fails after removal") as err:
        remove_(model, 0.5, example_inputs=x)
    assert len(str(err.value).splitlines()) == 1
    assert same_state(model, saved) and not history(model)
    assert {n: m.training for n, m in model.named_modules()} == flags


class _Config:
    def __init__(self) -> None:
        self.skip = False


class _Skip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 2)
        self.skip = False
        self.config = _Config()  # as Hugging Face modules hold theirs

    def forward(self, x):
        h = self.c1(x).relu()
        g = self.c2(h).relu()
        if self.skip or self.config.skip:
            g = g + h
        return self.fc(g.mean((2, 3)))


@pytest.mark.parametrize("flag", ["module", "config"])
def test_the_graph_cache_sees_a_python_attribute_that_changes_the_forward(monkeypatch, flag):
    torch.manual_seed(0)
    model, x = _Skip().eval(), _x()
    builds = []
    real = graph.run_bounded
    monkeypatch.setattr(graph, "run_bounded", lambda *a, **k: builds.append(1) or real(*a, **k))
    remove_(model, 0.5, example_inputs=x)
    undo_(model)
    remove_(model, 0.5, example_inputs=x)  # same model, same attributes: cached
    undo_(model)
    assert len(builds) == 1
    (model if flag == "module" else model.config).skip = True
    remove_(model, 0.5, example_inputs=x)
    assert len(builds) == 2
    plan = history(model)[-1].info["plan"]
    # The residual couples c1 and c2: the same channels go from both.
    assert plan[("c1", "out")] == plan[("c2", "out")]
    assert model(x).shape == (2, 2)


def _seq():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 5),
    ).eval()


@pytest.mark.parametrize("frozen", ["all", "first conv", "backbone"])
def test_frozen_layers_are_pruned_and_stay_frozen(frozen):
    model, x = _seq(), _x()
    if frozen == "all":
        model.requires_grad_(False)
    elif frozen == "first conv":
        model[0].requires_grad_(False)
    else:
        model[:5].requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    remove_(model, 0.5, example_inputs=x)
    assert model[0].out_channels == 8 and model[3].out_channels == 16
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def _constant_channels():
    """A model in training mode whose zeroed channels carry BatchNorm shifts (to fold)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 3),
    )
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_()
            bn.bias.uniform_()
    model.train()
    prune_(model, 0.5, granularity="channel")
    return model, _x(4)


def test_undo_after_removal_with_folding_keeps_training_flags_exact():
    model, x = _constant_channels()
    saved = state(model)
    remove_(model, 0.5, example_inputs=x)
    assert any("folded" in n for n in history(model)[-1].info["notes"])
    assert all(m.training for m in model.modules())
    undo_(model)
    assert same_state(model, saved)
    assert all(m.training for m in model.modules())


def test_rollback_after_folding_keeps_training_flags_exact(monkeypatch):
    model, x = _constant_channels()
    saved, steps = state(model), len(history(model))

    def fail(*args, **kwargs):
        raise ValueError("model: the forward fails after removal (test)")

    monkeypatch.setattr(remove, "_verify", fail)
    with pytest.raises(ValueError, match="test"):
        remove_(model, 0.5, example_inputs=x)
    assert same_state(model, saved) and len(history(model)) == steps
    assert all(m.training for m in model.modules())


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.mid = nn.Embedding(50, 16), nn.Linear(16, 32)
        self.back, self.head = nn.Linear(32, 16), nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight  # tied, as an LM head to its embedding

    def forward(self, x):
        return self.head(self.back(self.mid(self.emb(x)).relu()))


def test_tied_weights_are_refused_or_left_tied_with_ignore():
    torch.manual_seed(0)
    model, x = _Tied().eval(), torch.randint(0, 50, (4, 7))
    saved = state(model)
    with pytest.raises(ValueError, match=r"emb\.weight and head\.weight .*ignore=") as err:
        remove_(model, 0.3, example_inputs=x)
    assert len(str(err.value).splitlines()) == 1
    assert same_state(model, saved) and not history(model)
    remove_(model, 0.3, example_inputs=x, ignore=["emb", "head"])
    assert model.mid.out_features < 32 and model.head.weight is model.emb.weight


def test_removal_after_quantization_says_to_remove_first():
    from nbcompress.engine.quantize.quantize import quantize_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    quantize_(model, "dynamic")
    with pytest.raises(ValueError, match="quantized.*remove channels first"):
        remove_(model, 0.3, example_inputs=torch.randn(8, 64))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"timeout": 0}, ValueError, "timeout: expected a number > 0"),
        ({"timeout": -1}, ValueError, "timeout: expected a number > 0"),
        ({"memory": -5}, ValueError, "memory: expected a finite number > 0"),
        ({"memory": float("inf")}, ValueError, "memory: expected a finite number > 0"),
        ({"memory": "4G"}, TypeError, r"memory: expected a number such as 4 << 30"),
        ({"timeout": True}, TypeError, "timeout: expected a number"),
    ],
)
def test_bad_bounds_are_refused_before_any_work(kwargs, error, match):
    model, x = _seq(), _x()
    saved = state(model)
    with pytest.raises(error, match=match):
        remove_(model, 0.3, example_inputs=x, **kwargs)
    assert same_state(model, saved)


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_child_reports_its_exit_code():
    with pytest.raises(ValueError, match=r"child exit code -9"):
        run_bounded(_die, timeout=30)


def test_round_to_too_large_names_round_to():
    model, x = _seq(), _x()
    with pytest.raises(ValueError, match=r"round_to: 64 leaves no channel.*lower round_to"):
        remove_(model, 0.3, example_inputs=x, round_to=64)


class _LayerNorm2d(nn.LayerNorm):
    """ConvNeXt's channels-first LayerNorm: its own forward normalises dimension 1."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def test_a_channels_first_layernorm_subclass_is_named_not_mismeasured():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3), _LayerNorm2d(16), nn.Conv2d(16, 16, 1), nn.Flatten(), nn.LazyLinear(4)
    )
    x = _x(2, 8)
    model(x)
    model.eval()
    remove_(model, 0.5, example_inputs=x)
    assert model[1].normalized_shape == (8,) and model(x).shape == (2, 4)
    assert any("not checked" in n and "_LayerNorm2d" in n for n in history(model)[-1].info["notes"])
