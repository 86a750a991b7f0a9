"""Issue 11: measuring never changes the model; checks compare every output; coverage is stated."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

import nbcompress as nc
from nbcompress.engine.speedup import sparsify as sp
from nbcompress.kernels.modules import SparseConv2d, SparseLinear
from tests.engine.speedup.test_speedup import FAST, SLOW, _fake_timer, _pruned_mlp
from tests.helpers import assert_same_state, snapshot
from tests.real_models import BUILDERS

pytestmark = pytest.mark.filterwarnings("ignore:nbcompress. sparse kernel")


def _flags(model: nn.Module) -> dict[str, bool]:
    return {n: m.training for n, m in model.named_modules()}


def _bn_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
        nn.Linear(8 * 6 * 6, 10),
    )  # fmt: skip
    with torch.no_grad():
        for m in (model[0], model[5]):
            m.weight[
                m.weight.abs()
                < m.weight.abs().flatten().kthvalue(m.weight.numel() * 9 // 10).values
            ] = 0
    return model  # train mode, as a user mid-training has it


def test_speedup_measuring_leaves_a_train_mode_model_bit_exact_flags_and_buffers_included():
    model, x = _bn_model(), torch.randn(4, 1, 8, 8)
    model[3].eval()  # a mixed flag must survive too
    before, flags = snapshot(model), _flags(model)
    nc.speedup(model, x, repeats=3)
    assert_same_state(model, before)  # running_mean/var and num_batches_tracked included
    assert int(model[1].num_batches_tracked) == 0
    assert _flags(model) == flags


def test_sparsify_that_installs_nothing_leaves_batchnorm_statistics_alone(monkeypatch):
    _fake_timer(monkeypatch, SLOW)
    model, x = _bn_model(), torch.randn(4, 1, 8, 8)
    before, flags = snapshot(model), _flags(model)
    with pytest.warns(UserWarning, match="no layer measured faster"):
        nc.sparsify_(model, x)
    assert_same_state(model, before)
    assert _flags(model) == flags


def test_sparsify_of_a_train_mode_model_changes_only_the_swapped_layers(monkeypatch):
    _fake_timer(monkeypatch, FAST)
    model, x = _bn_model(), torch.randn(4, 1, 8, 8)
    before, flags = snapshot(model), _flags(model)
    nc.sparsify_(model, x)
    assert isinstance(model[0], SparseConv2d) and isinstance(model[5], SparseLinear)
    assert torch.equal(model[1].running_mean, before["1.running_mean"])
    assert int(model[1].num_batches_tracked) == 0
    nc.undo_(model)
    assert_same_state(model, before)
    assert _flags(model) == flags


@dataclasses.dataclass
class _Out:
    embedding: torch.Tensor
    ids: torch.Tensor


class _Structured(nn.Module):
    """An MLP whose output is a dict, a tuple or a dataclass, with an integer tensor too."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.body, self.kind = _pruned_mlp(), kind

    def forward(self, x):
        y, ids = self.body(x), torch.arange(len(x))
        if self.kind == "dict":
            return {"input_ids": ids, "sentence_embedding": y}
        if self.kind == "tuple":
            return ids, (y, 2 * y)
        return _Out(y, ids)


@pytest.mark.parametrize("kind", ["dict", "tuple", "dataclass"])
def test_end_to_end_check_compares_every_tensor_of_any_output_structure(monkeypatch, kind):
    _fake_timer(monkeypatch, FAST)
    model, x = _Structured(kind), torch.randn(4, 32)
    report = nc.speedup(model, x)
    assert report.tolerance > sp.tolerance("csr", 0.0)  # scaled by the real output
    assert "0.00e+00 within 0.00e+00" not in str(report) and report.outputs_match


class _Drift(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) + 1.0


@pytest.mark.parametrize("kind", ["dict", "tuple", "dataclass"])
def test_end_to_end_check_catches_a_wrong_structured_output(monkeypatch, kind):
    _fake_timer(monkeypatch, FAST)
    model, x = _Structured(kind), torch.randn(4, 32)
    real_twin = sp.twin

    def wrong(model, swaps=None):  # the compressed twin drifts by 1.0 on one output tensor
        double = real_twin(model, swaps)
        if swaps:  # the end-to-end check's compressed model (not a layer's int8 probe)
            double.body.head = _Drift(double.body.head)
        return double

    monkeypatch.setattr(sp, "twin", wrong)
    report = nc.speedup(model, x)
    assert report.max_abs_diff >= 1.0 - 1e-3 and not report.outputs_match  # 2.0 on 2 * y
    assert "model left dense" in report.verdict


def test_an_output_without_floating_tensors_is_refused_not_passed(monkeypatch):
    _fake_timer(monkeypatch, FAST)

    class Argmax(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _pruned_mlp()

        def forward(self, x):
            return {"label": self.body(x).argmax(1)}

    model = Argmax()
    before = snapshot(model)
    with pytest.raises(ValueError, match="holds no floating-point tensor"):
        nc.sparsify_(model, torch.randn(4, 32))
    assert_same_state(model, before)


def test_conv1d_is_listed_with_why_it_stays_dense_and_grouped_convs_run_sparse(monkeypatch):
    _fake_timer(monkeypatch, FAST)
    model = nn.Sequential(
        nn.Conv1d(3, 8, 3), nn.ReLU(), nn.Unflatten(1, (8, 1)), nn.Conv2d(8, 8, (1, 3), groups=4),
        nn.Flatten(), nn.Linear(8 * 4, 4),
    )  # fmt: skip
    report = nc.speedup(model, torch.randn(2, 3, 8))
    rows = {r["layer"]: r for r in report.rows}
    assert "no sparse kernel for Conv1d" in rows["0"]["why"]
    shown = "\n".join(report._summary())  # the reasons are printed, not only in rows
    assert "kept dense: 0: no sparse kernel for Conv1d" in shown and "kept dense: 3: " not in shown
    assert rows["3"]["sparse fp32"] is not None  # grouped: SparseConv2d runs it
    assert rows["5"]["sparse fp32"] is not None


def test_grouped_convs_reach_the_kernel_builder(monkeypatch):
    # Whether grouped convs run sparse is the kernel's decision (SparseConv2d.from_dense).
    _fake_timer(monkeypatch, FAST)
    asked = []
    original = SparseConv2d.from_dense.__func__

    def spy(cls, conv, **kw):
        asked.append(conv.groups)
        return original(cls, conv, **kw)

    monkeypatch.setattr(SparseConv2d, "from_dense", classmethod(spy))
    nc.speedup(nn.Sequential(nn.Conv2d(4, 4, 3, groups=4)), torch.randn(1, 4, 6, 6))
    assert asked and set(asked) == {4}  # once per candidate format (and the break-even probe)


def test_report_states_the_share_of_parameters_not_considered(monkeypatch):
    _fake_timer(monkeypatch, FAST)
    model, x = BUILDERS["attention"]()
    report = nc.speedup(model, x)
    line = next(n for n in report.notes if n.startswith("not considered"))
    share = sum(p.numel() for p in model.attn.parameters()) / sum(
        p.numel() for p in model.parameters()
    )
    assert f"{share:.1%}" in line and "MultiheadAttention" in line and "in_proj_weight" in line
    model, x = BUILDERS["lstm"]()
    line = next(n for n in nc.speedup(model, x).notes if n.startswith("not considered"))
    assert "LSTM" in line and "gate" in line and "Embedding" in line


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_sparsify_runs_on_real_architectures_outputs_checked_and_undo_exact(monkeypatch, name):
    _fake_timer(monkeypatch, FAST)
    model, x = BUILDERS[name]()
    inputs = x if isinstance(x, tuple) else (x,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nc.prune_(model, 0.9, include_output=True)
    before = snapshot(model)
    with torch.inference_mode():  # the encoder's fused fast path runs here
        ref = model(*inputs)
    report = nc.speedup(model, x, apply=True)
    assert report.applied and report.outputs_match and isinstance(model.head, SparseLinear)
    with torch.inference_mode():
        torch.testing.assert_close(model(*inputs), ref, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        model.train()  # the slow path (training mode) also works
        model(*inputs)
        model.eval()
    assert any(n.startswith("not considered") for n in report.notes)
    nc.undo_(model)
    assert_same_state(model, before)
    assert all(type(m) not in (SparseLinear, SparseConv2d) for m in model.modules())


def test_installed_sparse_layers_take_the_mode_of_the_layers_they_replace(monkeypatch):
    _fake_timer(monkeypatch, FAST)
    model = _pruned_mlp().eval()
    nc.sparsify_(model, torch.randn(4, 32))
    assert any(isinstance(m, SparseLinear) for m in model.modules())
    assert not any(m.training for m in model.modules())  # an eval model stays all eval


@pytest.mark.parametrize("bad", ["0.1", float("nan"), -5.0, True])
def test_min_gain_is_checked_before_measuring(bad):
    model = _pruned_mlp()
    saved = snapshot(model)
    with pytest.raises(ValueError, match="min_gain: expected a relative speed-up"):
        nc.sparsify_(model, torch.randn(4, 32), min_gain=bad)
    assert_same_state(model, saved)
