"""sparsify_ calls consecutive swapped sparse Linears as one run: same bits, undoable, hook-safe."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nbcompress as nc
from nbcompress.engine.core.runs import ENV_RUNS, FusedForward, add_run, fused_forward, join_runs
from nbcompress.kernels.modules import SparseLinear
from nbcompress.kernels.run import SparseRun
from tests.engine.speedup.test_actfuse import _mlp
from tests.engine.speedup.test_bnfold import FOLD_FAST
from tests.engine.speedup.test_speedup import _fake_timer
from tests.helpers import assert_same_state, snapshot

pytestmark = pytest.mark.filterwarnings("ignore:nbcompress. sparse kernel")

X = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))


def _one_by_one(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    for child in model:
        x = child(x)
    return x


def _runs(model: nn.Module) -> dict[int, tuple[int, object]]:
    forward = fused_forward(model)
    return {} if forward is None else forward.runs


def test_sparsify_joins_the_swapped_layers_and_undo_removes_the_run(monkeypatch):
    _fake_timer(monkeypatch, FOLD_FAST)
    model = _mlp()
    before = snapshot(model)
    nc.sparsify_(model, X)
    runs = _runs(model)
    assert runs and all(isinstance(run, SparseRun) for _, run in runs.values())
    covered = {i for start, (stop, _) in runs.items() for i in range(start, stop)}
    assert {0, 2} <= covered  # Linear, its GELU's Identity, Linear
    with torch.no_grad():
        assert torch.equal(model(X), _one_by_one(model, X))
    assert "runs" not in str(list(model.state_dict()))  # state_dict keys unchanged
    nc.undo_(model)
    assert "forward" not in model.__dict__ and all(type(m) is not SparseLinear for m in model)
    assert_same_state(model, before)


def test_a_hooked_layer_is_called_as_a_module_and_sees_its_input(monkeypatch):
    _fake_timer(monkeypatch, FOLD_FAST)
    model = _mlp()
    nc.sparsify_(model, X)
    seen = []
    model[2].register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    with torch.no_grad():
        out = model(X)
    assert seen == [torch.Size([8, 256])]
    model[2]._forward_hooks.clear()
    with torch.no_grad():
        assert torch.equal(out, model(X))


def test_a_layer_swapped_after_the_run_was_joined_is_used(monkeypatch):
    _fake_timer(monkeypatch, FOLD_FAST)
    model = _mlp()
    nc.sparsify_(model, X)
    model[2] = nn.Linear(256, 64)  # the run's step is no longer the child: child by child
    with torch.no_grad():
        assert torch.equal(model(X), _one_by_one(model, X))


def test_switched_off_no_run_is_joined(monkeypatch):
    _fake_timer(monkeypatch, FOLD_FAST)
    monkeypatch.setenv(ENV_RUNS, "0")
    model = _mlp()
    nc.sparsify_(model, X)
    assert any(type(m) is SparseLinear for m in model) and "forward" not in model.__dict__


def _sparse(fan_in: int, fan_out: int) -> SparseLinear:
    layer = nn.Linear(fan_in, fan_out)
    with torch.no_grad():
        layer.weight.mul_(torch.rand_like(layer.weight) < 0.1)
    return SparseLinear.from_dense(layer)


class _OwnForward(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return super().forward(x) * 2


def test_join_covers_each_longest_stretch_and_leaves_other_runs_and_classes_alone():
    torch.manual_seed(0)
    a, b, c, d = _sparse(8, 16), _sparse(16, 8), _sparse(8, 8), _sparse(8, 4)
    inner = nn.Sequential(nn.Identity(), a, nn.Identity(), b, nn.ReLU(), c, d, nn.Identity())
    model = nn.Sequential(inner, _OwnForward(_sparse(4, 4), _sparse(4, 4)))
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = model(x)
    assert join_runs(model) == 2
    assert {s: stop for s, (stop, _) in _runs(inner).items()} == {1: 4, 5: 7}
    assert "forward" not in model[1].__dict__  # its own forward: never replaced
    with torch.no_grad():
        assert torch.equal(model(x), want)
    # Children another run covers already (an ORT graph) are never joined again.
    other = nn.Sequential(_sparse(8, 8), _sparse(8, 8), _sparse(8, 8))
    add_run(other, 0, SparseRun(list(other)[:2]))
    assert join_runs(other) == 0 and list(_runs(other)) == [0]
    assert isinstance(other.__dict__["forward"], FusedForward)


def test_joining_again_drops_a_run_whose_children_changed_and_joins_what_is_left():
    torch.manual_seed(0)
    model = nn.Sequential(*(_sparse(8, 8) for _ in range(4)))
    assert join_runs(model) == 1 and {s: e for s, (e, _) in _runs(model).items()} == {0: 4}
    model[0] = nn.Linear(8, 8)  # e.g. an ORT graph's step took its place
    model[1].register_forward_hook(lambda *_: None)  # a hook is no reason to drop a run
    assert join_runs(model) == 1 and {s: e for s, (e, _) in _runs(model).items()} == {1: 4}
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert torch.equal(model(x), _one_by_one(model, x))
