"""sparsify_ folds eval BatchNorms into the sparse convs feeding them, and undoes it exactly."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import nbcompress as nc
from nbcompress.engine.core.history import Transaction
from nbcompress.engine.speedup import bnfold
from nbcompress.engine.speedup import sparsify as sp
from nbcompress.engine.speedup.analysis import RTOL, tolerance
from nbcompress.kernels import tuning
from nbcompress.kernels.dispatch import kernel_choices, tuning_stats
from nbcompress.kernels.modules import SparseConv2d
from tests.engine.speedup.test_speedup import FAST, _fake_timer
from tests.helpers import assert_same_state, snapshot

pytestmark = pytest.mark.filterwarnings("ignore:nbcompress. sparse kernel")

#: The folded variant fastest end to end (the channels-last ones slower than it).
FOLD_FAST = {**FAST, "folded": 0.2}


def _prune(model: nn.Module, amount: float = 0.9) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                w = m.weight
                w[w.abs() < w.abs().flatten().kthvalue(int(amount * w.numel())).values] = 0
    return model


def _trained(model: nn.Module) -> nn.Module:
    """BatchNorm statistics as a trained model has them, so that a fold is no identity."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=gen))
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                    m.bias.copy_(0.4 * torch.rand(n, generator=gen) - 0.2)
    return model


class Block(nn.Module):
    """A ResNet basic block with a strided 1×1 shortcut: conv→BN pairs and a residual add."""

    def __init__(self, cin: int, cout: int, affine: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout, affine=affine)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, affine=affine)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + self.down(x))


def _net(affine: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 5, 2, 2), nn.BatchNorm2d(16, affine=affine), nn.ReLU(),
        nn.MaxPool2d(3, 2, 1), Block(16, 32, affine), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 10),
    )  # fmt: skip
    return _trained(_prune(model)).eval()


BNS = ["1", "4.bn1", "4.bn2", "4.down.1"]
CONVS = ["0", "4.conv1", "4.conv2", "4.down.0"]
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    err = float((out - ref).abs().max())
    assert err <= tolerance("csr", ref), err


def _kinds(model: nn.Module) -> dict[str, type]:
    return {n: type(model.get_submodule(n)) for n in BNS + CONVS}


@pytest.mark.parametrize("fmt", ["csr", "csr_int8"])
@pytest.mark.parametrize(("affine", "bias"), [(True, False), (False, True), (False, False)])
def test_folded_conv_equals_conv_then_batchnorm_and_changes_neither(fmt, affine, bias):
    conv = _prune(nn.Conv2d(8, 12, 3, 2, 1, bias=bias))
    bn = _trained(nn.BatchNorm2d(12, affine=affine)).eval()
    sparse = SparseConv2d.from_dense(conv, format=fmt)
    before, bn_before = snapshot(sparse), snapshot(bn)
    x = torch.randn(2, 8, 15, 15)
    with torch.no_grad():
        ref = bn(sparse(x))
        out = bnfold.folded(sparse, bn)(x)
    err = float((out - ref).abs().max())
    assert float((ref - sparse(x)).abs().max()) > 0  # the BatchNorm does change the output
    assert err <= RTOL["csr"] * float(ref.abs().max()) + 1e-5, err
    assert_same_state(sparse, before)
    assert_same_state(bn, bn_before)


def test_the_folded_and_channels_last_copies_keep_the_kernel_choices_and_race_nothing():
    conv, bn = _prune(nn.Conv2d(16, 32, 3, 1, 1)), _trained(nn.BatchNorm2d(32)).eval()
    sparse, x = SparseConv2d.from_dense(conv), torch.randn(1, 16, 28, 28)
    with tuning.eager(), torch.no_grad():
        ref = bn(sparse(x))  # races this shape's kernel choice
        choices, races = kernel_choices(sparse.matrix()), tuning_stats()["races"]
        fold, last = bnfold.folded(sparse, bn), bnfold.channels_last(sparse)
        _close(fold(x), ref)
        assert torch.equal(last(x), sparse(x))
        assert last(x).is_contiguous(memory_format=torch.channels_last)
    assert choices and tuning_stats()["races"] == races
    assert kernel_choices(fold.matrix()) == kernel_choices(last.matrix()) == choices
    assert not sparse.channels_last_output


def test_the_graph_pairs_every_conv_with_its_batchnorm_in_a_residual_net():
    graph = bnfold.conv_graph(_net())
    assert graph.pairs == dict(zip(CONVS, BNS, strict=True))
    assert graph.kept == {}
    assert graph.order[:2] == ("0", "1")


class _TwoReaders(nn.Module):
    """conv1's output is read by its BatchNorm and by the add: the BatchNorm stays."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        return self.bn1(y) + y + self.bn2(self.conv2(x))


class _SharedBatchNorm(nn.Module):
    """One BatchNorm after two convolutions: folding it into either would break the other."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv1(x)) + self.bn(self.conv2(x))


class _ReadsBatchNormWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) * self.bn.weight[:, None, None]


class _BatchNormReadTwice(nn.Module):
    """The BatchNorm's output has two readers: it folds (its value is what the conv gives)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return torch.relu(y).mean((2, 3)) + self.head(y).mean((2, 3)).sum(1, keepdim=True)


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return y if float(y.sum()) > -1e9 else -y  # data-dependent: fx cannot trace it


def _ready(model: nn.Module) -> nn.Module:
    return _trained(_prune(model)).eval()


def test_a_conv_output_with_a_second_reader_is_not_folded_and_its_neighbour_is():
    graph = bnfold.conv_graph(_ready(_TwoReaders()))
    assert graph.pairs == {"conv2": "bn2"}


def test_a_batchnorm_called_twice_or_read_directly_is_not_folded():
    shared = bnfold.conv_graph(_ready(_SharedBatchNorm()))
    assert shared.pairs == {} and "called or registered twice" in shared.kept["conv1"]
    assert bnfold.conv_graph(_ready(_ReadsBatchNormWeight())).pairs == {}


@pytest.mark.parametrize("change", ["train", "no_stats", "hook", "subclass"])
def test_what_a_fold_would_get_wrong_is_kept_with_the_reason(change):
    model = _net()
    bn = model[1]
    if change == "train":
        model.train()
    elif change == "no_stats":
        model[1] = bn = nn.BatchNorm2d(16, track_running_stats=False).eval()
    elif change == "hook":
        bn.register_forward_hook(lambda *a: None)
    else:

        class Custom(nn.BatchNorm2d):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return super().forward(x) + 1

        model[1] = Custom(16).eval()
    graph = bnfold.conv_graph(model)
    assert "0" not in graph.pairs
    word = {"train": "training mode", "no_stats": "running statistics", "hook": "hooks"}
    assert word.get(change, "own forward") in graph.kept["0"]


def test_an_untraceable_model_folds_nothing_and_is_still_sparsified(monkeypatch):
    _fake_timer(monkeypatch, FOLD_FAST)
    model = _ready(_Untraceable())
    assert bnfold.conv_graph(model) == bnfold.ConvGraph()
    nc.sparsify_(model, torch.randn(1, 4, 8, 8))
    assert isinstance(model.conv, SparseConv2d) and type(model.bn) is nn.BatchNorm2d


@pytest.mark.parametrize("affine", [True, False])
def test_sparsify_folds_in_one_step_and_undo_restores_the_batchnorms_bit_exactly(
    monkeypatch, affine
):
    _fake_timer(monkeypatch, FOLD_FAST)
    model = _net(affine)
    before, kinds = snapshot(model), _kinds(model)
    with torch.no_grad():
        ref = model(X)
    nc.sparsify_(model, X)
    assert all(type(model.get_submodule(n)) is nn.Identity for n in BNS)
    assert all(isinstance(model.get_submodule(n), SparseConv2d) for n in CONVS)
    assert not model[0].channels_last_output
    with torch.no_grad():
        _close(model(X), ref)
    step = nc.history(model)[-1]
    assert "BatchNorm 4.bn1 folded into it" in step.info["reasons"]["4.conv1"]
    nc.undo_(model)
    assert _kinds(model) == kinds and nc.history(model) == []
    assert_same_state(model, before)


def test_a_batchnorm_whose_output_two_layers_read_folds_exactly(monkeypatch):
    _fake_timer(monkeypatch, FOLD_FAST)
    model, x = _ready(_BatchNormReadTwice()), torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        ref = model(x)
    nc.sparsify_(model, x)
    assert type(model.bn) is nn.Identity
    with torch.no_grad():
        _close(model(x), ref)


def test_a_train_mode_model_is_not_folded(monkeypatch):
    _fake_timer(monkeypatch, FOLD_FAST)
    model = _net().train()
    nc.sparsify_(model, X)
    assert isinstance(model[0], SparseConv2d)
    assert all(type(model.get_submodule(n)) is nn.BatchNorm2d for n in BNS)
    assert "training mode" in nc.history(model)[-1].info["reasons"]["0"]


@pytest.mark.parametrize(
    ("times", "folded", "last"),
    [
        ({"folded": 1.0, "channels-last stem": 1.0}, False, False),  # nothing faster
        ({"channels-last stem": 0.2}, False, True),
        ({"folded": 0.25, "folded + channels-last stem": 0.2}, True, True),
        ({"folded": 0.2, "folded + channels-last stem": 0.25}, True, False),
    ],
)
def test_a_variant_is_kept_only_when_measured_faster_end_to_end(monkeypatch, times, folded, last):
    _fake_timer(monkeypatch, {**FAST, **times})
    model = _net()
    with torch.no_grad():
        ref = model(X)
    nc.sparsify_(model, X)
    assert (type(model[1]) is nn.Identity) == folded
    assert isinstance(model[0], SparseConv2d) and model[0].channels_last_output == last
    with torch.no_grad():
        out = model(X)
    _close(out, ref)
    if not folded:
        assert "not folded: not faster" in nc.history(model)[-1].info["reasons"]["4.conv2"]


class _Views(nn.Module):
    """A ``view`` of the conv's output: fails on channels-last strides."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).view(x.shape[0], -1))


def test_a_variant_that_fails_to_run_is_dropped_however_fast(monkeypatch):
    _fake_timer(monkeypatch, {**FAST, "channels-last stem": 0.01})
    model, x = _ready(_Views()), torch.randn(2, 3, 8, 8)
    nc.sparsify_(model, x)
    assert isinstance(model.conv, SparseConv2d) and not model.conv.channels_last_output
    with torch.no_grad():
        model(x)


def test_a_fold_outside_tolerance_is_dropped_however_fast(monkeypatch):
    _fake_timer(monkeypatch, {**FOLD_FAST, "folded": 0.01})
    real = bnfold.folded

    def wrong(conv, bn):  # folds other statistics than the model's: the check must catch it
        return real(conv, nn.BatchNorm2d(bn.num_features).eval())

    monkeypatch.setattr(bnfold, "folded", wrong)
    model = _net()
    nc.sparsify_(model, X)
    assert all(type(model.get_submodule(n)) is nn.BatchNorm2d for n in BNS)
    reason = nc.history(model)[-1].info["reasons"]["4.conv1"]
    assert "BatchNorm 4.bn1 not folded: output outside tolerance" in reason


def test_a_failure_part_way_leaves_the_model_exactly_as_it_was(monkeypatch):
    _fake_timer(monkeypatch, FOLD_FAST)
    model = _net()
    before, kinds = snapshot(model), _kinds(model)
    replace = Transaction.replace

    def failing(tx, name, new):
        if name == "4.bn2":  # after two convs and two BatchNorms went in
            raise RuntimeError("disk full")
        return replace(tx, name, new)

    monkeypatch.setattr(Transaction, "replace", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        nc.sparsify_(model, X)
    assert _kinds(model) == kinds and nc.history(model) == []
    assert_same_state(model, before)


def test_a_batchnorm_changed_after_the_analysis_gets_the_unfolded_conv(monkeypatch):
    _fake_timer(monkeypatch, FOLD_FAST)
    model = _net()
    analysis = sp.analyse(model, X)
    model[1].train()  # after the analysis: its fold would now be wrong
    sp.install_(model, analysis)
    assert type(model[1]) is nn.BatchNorm2d and type(model.get_submodule("4.bn1")) is nn.Identity
    assert model[0] is analysis.layers[0].replacement  # the layer's own, unfolded
    with torch.no_grad():
        _close(model[0](X), analysis.layers[0].module(X))


def test_the_undo_magic_restores_the_folded_batchnorms(shell, monkeypatch):
    _fake_timer(monkeypatch, FOLD_FAST)
    shell.user_ns.update(net=_net(), x=X)
    before = snapshot(shell.user_ns["net"])
    shell.run_line_magic("speedup", "net --input x --apply")
    assert type(shell.user_ns["net"][1]) is nn.Identity
    shell.run_line_magic("undo", "net")
    assert type(shell.user_ns["net"][1]) is nn.BatchNorm2d
    assert_same_state(shell.user_ns["net"], before)


@pytest.fixture
def record(tmp_path):
    """The tuning record on, in a temporary directory, for a pretend CPU."""
    tuning.configure(enabled=True, cache_dir=tmp_path, cpu="test-cpu")
    yield tuning.active()
    tuning.configure()  # back to the environment's setting (off in tests)


def test_a_second_sparsify_reuses_the_recorded_variant_without_racing(record, monkeypatch):
    _fake_timer(monkeypatch, FOLD_FAST)
    fake, seen = sp.race, []

    def logged(candidates, **kw):
        seen.append(list(candidates))
        return fake(candidates, **kw)

    monkeypatch.setattr(sp, "race", logged)
    first = _net()
    second = copy.deepcopy(first)
    nc.sparsify_(first, X)
    assert [n for n in seen if "folded" in n] == [
        ["compressed", "folded", "channels-last stem", "folded + channels-last stem"]
    ]
    seen.clear()
    nc.sparsify_(second, X)
    assert seen == [] and type(second[1]) is nn.Identity
    assert "1.50× faster, recorded earlier" in nc.history(second)[-1].info["reasons"]["0"]


def test_a_folded_model_saves_loads_and_pickles_as_an_ordinary_model(monkeypatch, tmp_path):
    _fake_timer(monkeypatch, {**FAST, "folded + channels-last stem": 0.1})
    model = _net()
    nc.sparsify_(model, X)
    assert type(model[1]) is nn.Identity and model[0].channels_last_output
    with torch.no_grad():
        ref = model(X)
    nc.save(model, tmp_path / "m.pt")
    for again in (nc.load(tmp_path / "m.pt", _net()), pickle.loads(pickle.dumps(model))):
        assert type(again[1]) is nn.Identity and again[0].channels_last_output
        with torch.no_grad():
            _close(again(X), ref)  # kernel choices made afresh: summation order may differ
