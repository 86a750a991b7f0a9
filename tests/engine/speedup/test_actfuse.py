"""sparsify_ has the sparse kernels apply a ReLU/GELU that alone reads a swapped layer, undoably."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nbcompress as nc
from nbcompress.engine.speedup import bnfold
from nbcompress.kernels.modules import SparseConv2d, SparseLinear
from tests.engine.speedup.test_bnfold import FOLD_FAST, _close, _trained
from tests.engine.speedup.test_speedup import _fake_timer
from tests.helpers import assert_same_state, snapshot

pytestmark = pytest.mark.filterwarnings("ignore:nbcompress. sparse kernel")


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 256),
        nn.GELU(approximate="tanh"), nn.Linear(256, 64),
    ).eval()  # fmt: skip
    nc.prune_(model, 0.9, include_output=True)
    return model


X = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
LINEARS, ACTS = ["0", "2", "4", "6"], ["1", "3", "5"]


class _ActTwice(nn.Module):
    """One ReLU module called twice: it cannot become nn.Identity for either call."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.relu = nn.Linear(32, 32), nn.Linear(32, 32), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.b(self.relu(self.a(x))))


class _Residual(nn.Module):
    """The Linear's output is read by the GELU and by the residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act = nn.Linear(32, 32), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return self.act(y) + y


class _Hooked(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Linear(32, 32), nn.ReLU())
        self[1].register_forward_hook(lambda *_: None)


class _ConvBnRelu(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())


def test_the_graph_finds_each_activation_a_swappable_layer_alone_feeds():
    assert bnfold.conv_graph(_mlp()).acts == dict(zip(LINEARS, ACTS, strict=False))
    for model in (_ActTwice(), _Residual(), _Hooked()):
        assert bnfold.conv_graph(model.eval()).acts == {}, type(model).__name__
    graph = bnfold.conv_graph(_ConvBnRelu().eval())
    assert graph.pairs == {"0": "1"} and graph.acts == {"0": "2"}
    # A BatchNorm that stays (training mode) sits between the conv and the ReLU.
    assert bnfold.conv_graph(_ConvBnRelu().train()).acts == {}


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
@pytest.mark.parametrize("batch", [1, 8])
def test_an_activated_copy_equals_the_layer_then_the_activation_and_changes_neither(fmt, batch):
    model, applied = _mlp(), 0
    for i, j in (("0", "1"), ("2", "3"), ("4", "5")):
        layer, act = model.get_submodule(i), model.get_submodule(j)
        sparse = SparseLinear.from_dense(layer, format=fmt)
        before = snapshot(sparse)
        fused = bnfold.activated(sparse, act)
        if fused is None:  # an activation this format's kernels do not apply (tanh GELU)
            assert isinstance(act, nn.GELU) and act.approximate == "tanh"
            continue
        x = torch.randn(batch, layer.in_features, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            _close(fused(x), act(sparse(x)))
        assert_same_state(sparse, before)
        assert getattr(sparse, "activation", None) is None
        applied += 1
    assert applied >= 2


def test_an_activation_without_an_epilogue_or_a_module_without_one_is_not_activated():
    sparse = SparseLinear.from_dense(_mlp()[0], format="csr_int8_dynamic")
    assert bnfold.activated(sparse, nn.GELU()) is not None  # the int8 kernels apply it too
    assert bnfold.activated(SparseLinear.from_dense(_mlp()[0]), nn.Tanh()) is None
    assert bnfold.activated(nn.Linear(4, 4), nn.ReLU()) is None


def test_sparsify_applies_the_activations_in_one_step_and_undo_restores_them(monkeypatch):
    _fake_timer(monkeypatch, FOLD_FAST)
    model = _mlp()
    before, steps = snapshot(model), len(nc.history(model))
    kinds = [type(m) for m in model]
    with torch.no_grad():
        ref = model(X)
    nc.sparsify_(model, X)
    fused = [n for n in ACTS if type(model.get_submodule(n)) is nn.Identity]
    assert "1" in fused and "3" in fused  # exact GELU and ReLU always have an epilogue
    for n in fused:
        assert getattr(model.get_submodule(str(int(n) - 1)), "activation", None)
    with torch.no_grad():
        _close(model(X), ref)
    reasons = nc.history(model)[-1].info["reasons"]
    assert "GELU 1 folded into it" in reasons["0"] and "ReLU 3 folded into it" in reasons["2"]
    nc.undo_(model)
    assert [type(m) for m in model] == kinds and len(nc.history(model)) == steps
    assert_same_state(model, before)


def test_activations_stay_when_the_folded_variant_is_not_faster(monkeypatch):
    _fake_timer(monkeypatch, {**FOLD_FAST, "folded": 1.0})
    model = _mlp()
    nc.sparsify_(model, X)
    assert all(type(model.get_submodule(n)) is not nn.Identity for n in ACTS)
    assert "GELU 1 not folded: not faster" in nc.history(model)[-1].info["reasons"]["0"]


def test_a_conv_with_its_batchnorm_and_relu_folds_both(monkeypatch):
    _fake_timer(monkeypatch, FOLD_FAST)
    torch.manual_seed(0)
    model = _trained(_ConvBnRelu()).eval()
    with torch.no_grad():
        w = model[0].weight
        w[w.abs() < w.abs().flatten().kthvalue(int(0.9 * w.numel())).values] = 0
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
    nc.sparsify_(model, x)
    assert isinstance(model[0], SparseConv2d) and type(model[1]) is nn.Identity
    relu_fused = type(model[2]) is nn.Identity
    assert relu_fused == (getattr(model[0], "activation", None) == "relu")
    with torch.no_grad():
        _close(model(x), ref)
    nc.undo_(model)
    assert [type(m) for m in model] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]


def test_a_layer_with_an_activation_folded_in_never_joins_an_ort_graph():
    # The graph is built from the float Linear and the nn.Identity left in the activation's
    # place: it would compute the layer without its GELU (outputs 0.3–0.7 off).
    from nbcompress.engine.speedup import fused
    from nbcompress.engine.speedup.analysis import LayerResult

    model = _mlp()
    sparse = SparseLinear.from_dense(model[0])
    res = LayerResult("0", model[0], chosen="csr", candidates={"csr": sparse})
    res.allowed, res.errors, res.tolerances = (
        ("csr", fused.PATH),
        {fused.PATH: 0.0},
        {fused.PATH: 1.0},
    )
    assert fused.fusable(res)
    bnfold.plan(sparse, bnfold.activated(sparse, model[1]), (("1", model[1]),))
    assert not fused.fusable(res)
