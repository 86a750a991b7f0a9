"""factorize_: SVD pairs for Linear and Conv2d, rank rules, choice, undo, bad input."""

import pickle

import pytest
import torch
from torch import nn

from nbcompress.engine.core.history import history, undo_
from nbcompress.engine.schedule.factorize import (
    FactorizeReport,
    LowRankConv2d,
    LowRankLinear,
    factorize_,
)
from nbcompress.engine.schedule.lowrank import choose_rank, factor_layer
from nbcompress.engine.schedule.lowrank_report import factorize_report
from tests.helpers import assert_same_state, snapshot


def low_rank_weight(out, inp, rank):
    return torch.randn(out, rank) @ torch.randn(rank, inp) / rank**0.5


def mlp():
    return nn.Sequential(
        nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 10)
    ).eval()


def test_exact_rank_linear_is_reproduced():
    layer = nn.Linear(40, 30)
    with torch.no_grad():
        layer.weight.copy_(low_rank_weight(30, 40, 5))
    pair = factor_layer(layer, 5)
    assert isinstance(pair, LowRankLinear) and pair.first.bias is None
    assert pair.first.weight.shape == (5, 40) and pair.second.weight.shape == (30, 5)
    x = torch.randn(7, 40)
    torch.testing.assert_close(pair(x), layer(x), rtol=1e-4, atol=1e-5)


def test_exact_rank_conv_keeps_stride_padding_dilation():
    conv = nn.Conv2d(6, 12, 3, stride=2, padding=2, dilation=2)
    with torch.no_grad():
        conv.weight.copy_(low_rank_weight(12, 54, 4).reshape(12, 6, 3, 3))
    pair = factor_layer(conv, 4)
    assert isinstance(pair, LowRankConv2d)
    assert pair.first.stride == (2, 2) and pair.first.padding == (2, 2)
    assert pair.first.dilation == (2, 2) and pair.second.kernel_size == (1, 1)
    x = torch.randn(2, 6, 11, 11)
    torch.testing.assert_close(pair(x), conv(x), rtol=1e-4, atol=1e-5)


def test_energy_picks_the_smallest_rank_keeping_the_fraction():
    sigma = torch.tensor([3.0, 2.0, 1.0, 1.0], dtype=torch.float64)  # σ² = 9, 4, 1, 1 of 15
    assert choose_rank(sigma, rank=None, energy=0.6) == 1  # 9/15 = 0.6 exactly
    assert choose_rank(sigma, rank=None, energy=0.61) == 2
    assert choose_rank(sigma, rank=None, energy=0.9) == 3  # 14/15
    assert choose_rank(sigma, rank=None, energy=1.0) == 4
    assert choose_rank(sigma, rank=0.5, energy=None) == 2
    assert choose_rank(sigma, rank=3, energy=None) == 3


def test_rank_replaces_layers_and_undo_restores_the_same_objects():
    model = mlp()
    saved, originals = snapshot(model), (model[0], model[2], model[4])
    x = torch.randn(8, 64)
    factorize_(model, rank=8, only_faster=False, example_inputs=x, repeats=3)
    assert isinstance(model[0], LowRankLinear) and isinstance(model[2], LowRankLinear)
    assert model[0].rank == 8 and model[4] is originals[2]  # output layer left alone
    report = factorize_report(model)
    assert isinstance(report, FactorizeReport) and report.factorised == ["0", "2"]
    row = report.rows[0]
    assert row["params before"] == 64 * 96 + 96
    assert row["params after"] == 8 * (64 + 96) + 96
    assert row["MACs after"] * (64 * 96) == row["MACs before"] * 8 * (64 + 96)
    assert 0 < row["output error"] < 1 and row["time before"] > 0 and row["time after"] > 0
    assert history(model)[-1].name == "factorize"
    assert "factorised" in str(report) and "<table" in report._repr_html_()
    undo_(model)
    assert (model[0], model[2], model[4]) == originals
    assert model[0] is originals[0]
    assert_same_state(model, saved)


def test_only_faster_decision_follows_the_measured_ratio():
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4)).eval()
    factorize_(model, rank=4, example_inputs=torch.randn(16, 256), repeats=5)
    row = factorize_report(model).rows[0]
    faster = row["time after"] < row["time before"]
    if row["result"] == "factorised":
        assert faster and isinstance(model[0], LowRankLinear)
    else:
        assert row["result"] == "skipped: not measured faster" and isinstance(model[0], nn.Linear)


def test_not_smaller_and_grouped_convs_are_skipped_with_the_reason():
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, groups=2), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8 * 36, 3)
    ).eval()
    saved = snapshot(model)
    factorize_(model, energy=1.0, only_faster=False, example_inputs=torch.randn(2, 4, 8, 8))
    skipped = factorize_report(model).skipped
    assert skipped["0"].startswith("skipped: grouped conv (groups=2)")
    assert skipped["1"] == "skipped: not smaller at this rank"
    assert not history(model)  # nothing replaced, no step recorded
    assert_same_state(model, saved)


def test_without_input_only_params_decide_and_the_model_is_picklable():
    model = mlp()
    factorize_(model, rank=0.25, only_faster=False, include_output=True)
    report = factorize_report(model)
    assert report.factorised == ["0", "2", "4"] and report.rows[0]["rank"] == 16
    assert report.rows[0]["time before"] is None
    clone = pickle.loads(pickle.dumps(model))
    x = torch.randn(3, 64)
    torch.testing.assert_close(clone(x), model(x))


def test_pair_is_not_factorised_again():
    model = mlp()
    factorize_(model, rank=8, only_faster=False, layers="0")
    with pytest.raises(ValueError, match="layers: every selected layer is already factorised"):
        factorize_(model, rank=4, only_faster=False, layers="0.*")


def test_training_mode_and_dtype_are_kept():
    layer = nn.Linear(32, 32).double().train()
    pair = factor_layer(layer, 4)
    assert pair.training and pair.first.weight.dtype == torch.float64


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rank": 64}, ValueError, r"^rank: 64 is not below min\(in, out\) = 64 .*maximum is 63"),
        ({"rank": 0}, ValueError, "^rank: 0 is below 1; pass a rank such as 16"),
        ({"rank": 1.5}, ValueError, r"^rank: 1.5 is not a fraction in \(0, 1\)"),
        ({"rank": "8"}, TypeError, "^rank: expected a positive int"),
        ({"energy": 0}, ValueError, r"^energy: 0 is outside \(0, 1\]"),
        ({"energy": 1.5}, ValueError, r"^energy: 1.5 is outside \(0, 1\]"),
        ({"rank": 4, "energy": 0.9}, ValueError, "^rank / energy: give one"),
        ({"layers": "nope*"}, ValueError, "^layers: pattern 'nope\\*' matches no layer"),
        ({"only_faster": True}, ValueError, "^example_inputs: needed to time each layer"),
        ({"repeats": 0}, ValueError, "^repeats: 0 is not a whole number >= 1.*repeats=15"),
        ({"repeats": 2.5}, ValueError, "^repeats: 2.5 is not a whole number >= 1"),
    ],
)
def test_bad_input_is_one_line_and_leaves_the_model_untouched(kwargs, error, match):
    model = mlp()
    saved, modules = snapshot(model), list(model)
    kwargs = {"only_faster": False, **kwargs}
    with pytest.raises(error, match=match) as info:
        factorize_(model, **kwargs)
    assert "\n" not in str(info.value)
    assert list(model) == modules and not history(model)
    assert_same_state(model, saved)


def test_a_non_module_is_refused():
    with pytest.raises(TypeError, match="^model: expected a torch.nn.Module"):
        factorize_([1, 2], only_faster=False)


def test_model_output_error_is_reported():
    model = mlp()
    factorize_(model, rank=24, only_faster=False, example_inputs=torch.randn(4, 64), repeats=2)
    report = factorize_report(model)
    assert report.factorised == ["0", "2"] and 0 < report.output_error < 1
    assert "Model output error on the example" in str(report)


def test_a_bare_layer_is_skipped_not_replaced():
    layer = nn.Linear(32, 32)
    saved = snapshot(layer)
    factorize_(layer, rank=2, only_faster=False, include_output=True)
    assert factorize_report(layer).skipped == {
        "(the model itself)": "skipped: the model is the layer itself; wrap it in "
        "nn.Sequential to replace it"
    }
    assert_same_state(layer, saved)


def test_failure_part_way_rolls_every_replacement_back(monkeypatch):
    from nbcompress.engine.core.history import Transaction

    model = mlp()
    saved, modules = snapshot(model), list(model)
    real = Transaction.replace
    calls = []

    def failing(self, name, new):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, name, new)

    monkeypatch.setattr(Transaction, "replace", failing)
    with pytest.raises(KeyboardInterrupt):
        factorize_(model, rank=4, only_faster=False)
    assert calls == ["0", "2"] and list(model) == modules and not history(model)
    assert_same_state(model, saved)


def test_conv_model_macs_match_costs_and_undo_is_bit_exact():
    from nbcompress.engine.core.costs import macs
    from tests.helpers import cnn

    model = cnn().eval()
    saved, originals = snapshot(model), list(model)
    x = torch.randn(2, 1, 8, 8)
    factorize_(model, rank=2, layers="3", only_faster=False, example_inputs=x, repeats=2)
    row = factorize_report(model).rows[0]
    assert isinstance(model[3], LowRankConv2d) and row["rank"] == 2
    hidden = originals[2](originals[1](originals[0](x)))
    assert row["MACs before"] == macs(originals[3], (hidden,), originals[3](hidden))
    pair = model[3]
    mid = pair.first(hidden)
    assert row["MACs after"] == macs(pair.first, (hidden,), mid) + macs(
        pair.second, (mid,), pair.second(mid)
    )
    undo_(model)
    assert list(model) == originals
    assert_same_state(model, saved)
