"""The sweep's shortcuts: replayed prefixes and one sort per layer change no number."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import nbcompress as nc
from nbcompress.engine.prune.prune import prune_ratios_
from nbcompress.engine.sensitivity import prefix as prefix_module
from nbcompress.engine.sensitivity.evaluate import eta_status
from nbcompress.engine.sensitivity.guard import layer_trial
from nbcompress.engine.sensitivity.ladder import Ladder
from nbcompress.engine.sensitivity.prefix import Prefix
from nbcompress.engine.sensitivity.sweep import DEFAULT_RATIOS
from tests.helpers import assert_same_state, bits, snapshot


def _sweep(model, x, **kwargs):
    return nc.sensitivity(model, example_inputs=x, progress=False, **kwargs)


def _no_replay(monkeypatch):
    monkeypatch.setattr(prefix_module, "BUDGET", -1)  # every plan over budget: full forwards


def _resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32)


def test_default_grid_reaches_the_target_region():
    assert DEFAULT_RATIOS[:9] == pytest.approx([0.1 * i for i in range(1, 10)])
    assert DEFAULT_RATIOS[9:] == (0.95, 0.98, 0.99)
    torch.manual_seed(0)
    r = _sweep(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), torch.randn(6, 4))
    assert r.ratios == list(DEFAULT_RATIOS)
    one = _sweep(nn.Linear(4, 3), torch.randn(6, 4), ratios=[0.5], include_output=True)
    assert one.ratios == [0.5]


def test_replayed_prefixes_give_the_curves_of_full_forwards(monkeypatch):
    model, x = _resnet()
    before = snapshot(model)
    layers = ["conv1", "layer2.0.conv2", "layer2.0.downsample.0", "layer4.1.conv1", "fc"]
    fast = _sweep(model, x, ratios=[0.3, 0.9], layers=layers)
    assert_same_state(model, before)
    _no_replay(monkeypatch)
    slow = _sweep(model, x, ratios=[0.3, 0.9], layers=layers)
    assert fast.curves == slow.curves  # bit for bit: the replay is the dense run's values
    assert_same_state(model, before)
    assert not any("forward" in vars(m) for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_a_layer_after_its_prefix_is_replayed_and_the_first_is_not():
    model, x = _resnet()
    layers = {n: m for n, m in model.named_modules() if n in ("conv1", "layer3.0.conv1", "fc")}
    prefix = Prefix(model.eval(), (x,), layers)
    assert set(prefix.plans) == {"layer3.0.conv1", "fc"}
    with prefix.replaying("fc") as on:
        assert on
        assert torch.equal(model(x), prefix.output)
    assert not any("forward" in vars(m) for m in model.modules())


class _SideEffects(nn.Module):
    """An in-place activation whose result is used through its input, and a tied weight."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.act = nn.Linear(6, 6), nn.ReLU(inplace=True)
        self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6)
        self.d = nn.Linear(6, 3)
        self.d.weight = nn.Parameter(self.a.weight[:3].detach().clone())
        self.tied = nn.Linear(6, 6)
        self.tied.weight = self.a.weight  # the same tensor as a layer called before it

    def forward(self, x):
        y = self.a(x)
        self.act(y)  # the result is only in y, changed in place
        z = self.b(y) + self.c(y)
        return self.d(self.tied(z))


def test_calls_with_side_effects_run_for_real(monkeypatch):
    torch.manual_seed(0)
    model, x = _SideEffects(), torch.randn(5, 6)
    before = snapshot(model)
    fast = _sweep(model, x, ratios=[0.5, 0.9])
    prefix = Prefix(model.eval(), (x,), dict(model.named_children()))
    assert "tied" not in prefix.plans  # a called-before layer holds its weight
    assert all(model.act not in plan for plan in prefix.plans.values())
    _no_replay(monkeypatch)
    assert fast.curves == _sweep(model, x, ratios=[0.5, 0.9]).curves
    assert_same_state(model, before)


def test_one_sort_per_layer_zeroes_what_prune_ratios_zeroes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 40), nn.Conv2d(3, 8, 3))
    with torch.no_grad():  # ties, a signed zero and a NaN
        w = model[0].weight
        w[:, :10], w[0, 0], w[1, 1], w[2, 2] = 0.5, -0.0, -0.5, float("nan")
    before = snapshot(model)
    ladder = Ladder(model, "element")
    for name in ("0", "1"):
        for ratio in (0.1, 0.37, 0.5, 0.9, 0.99):
            expected = copy.deepcopy(model)
            prune_ratios_(expected, {name: ratio})
            with layer_trial(model, {name: model[int(name)]}) as trial:
                ladder.prune(trial, name, ratio)
                got = bits(model[int(name)].weight.detach().clone())
            assert torch.equal(got, bits(expected[int(name)].weight.detach())), (name, ratio)
            assert_same_state(model, before)


def test_a_collapsed_layer_fills_its_larger_ratios_without_evaluating():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        model[0].weight.fill_(0.01)  # all 16 weights tie: ratio 0.97 zeroes every one
    x = torch.randn(16, 4)
    r = _sweep(model, x, ratios=[0.3, 0.97, 0.98, 0.99], layers=["0"])
    assert r.curves["0"][1] == pytest.approx(0.0, abs=0.02)  # features no longer vary
    assert r.curves["0"][2:] == [r.curves["0"][1]] * 2
    assert r.evaluations == 1 + 2
    assert any("0: collapsed at ratio 0.97" in n and "not evaluated" in n for n in r.notes)
    assert r.filled == {"0": [2, 3]}  # which points were filled in, kept and saved


def test_filled_points_survive_save_and_load_and_are_drawn_hollow(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        model[0].weight.fill_(0.01)
    r = _sweep(model, torch.randn(16, 4), ratios=[0.3, 0.97, 0.98, 0.99], layers=["0"])
    path = tmp_path / "r.json"
    r.save(path)
    assert nc.SensitivityResult.load(path).filled == {"0": [2, 3]}
    fig = r.plot("curves")
    hollow = [ln for ln in fig.axes[0].lines if ln.get_markerfacecolor() == "white"]
    assert len(hollow) == 1 and list(hollow[0].get_xdata()) == [0.98, 0.99]


def test_progress_says_evaluations_elapsed_and_eta(capsys):
    assert eta_status(0, 10, 0.0) == "0/10 evaluations, 0 s elapsed, ETA —"
    assert eta_status(2, 10, 4.0) == "2/10 evaluations, 4 s elapsed, ETA 16 s"
    assert eta_status(5, 100, 30.0, measured=3).endswith("ETA 15 min 50 s")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    nc.sensitivity(model, example_inputs=torch.randn(6, 4), ratios=[0.2, 0.5], include_output=True)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2  # one per layer, on stdout
    assert lines[0].startswith("sensitivity [2/4 evaluations, ") and "ETA " in lines[0]
    assert "ETA 0 s" in lines[1]
