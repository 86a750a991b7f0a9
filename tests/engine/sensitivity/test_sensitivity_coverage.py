"""Issue 11: sensitivity covers what prune_ prunes (attention projections, LSTM gates).

Before, the sweep refused layers with "no single weight" and skipped them by default, so a
transformer's or an LSTM's largest matrices were never analysed and nothing said so.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import nbcompress as nc
from nbcompress.engine.core.layers import MULTI_WEIGHT_TYPES
from nbcompress.engine.sensitivity.evaluate import layer_sparsity, weight_sparsity
from nbcompress.engine.sensitivity.setting import SettingCosts, model_footprint
from tests.helpers import assert_same_state, snapshot
from tests.real_models import BUILDERS


def _evaluate(model, x):
    inputs = x if isinstance(x, tuple) else (x,)

    def evaluate(m):
        with torch.no_grad():
            return float(-m(*inputs).float().pow(2).mean())

    return evaluate


def _multi(model, names):
    return [n for n in names if isinstance(model.get_submodule(n), MULTI_WEIGHT_TYPES)]


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("proxy", [True, False])
def test_the_sweep_covers_attention_and_recurrent_layers(name, proxy):
    model, x = BUILDERS[name]()
    before = snapshot(model)
    kwargs = {"example_inputs": x} if proxy else {"evaluate": _evaluate(model, x)}
    result = nc.sensitivity(model, ratios=[0.5, 0.9], progress=False, **kwargs)
    assert_same_state(model, before)
    multi = _multi(model, result.layers)
    assert multi, result.layers
    for n in multi:
        module = model.get_submodule(n)
        weights = sum(p.numel() for k, p in module.named_parameters() if "bias" not in k)
        assert result.sizes[n] == weights  # every projection / gate matrix counted
        assert None not in result.curves[n]
        if proxy:  # pruning 90% of an attention / LSTM layer changes the output
            assert result.curves[n][1] < result.baseline


@pytest.mark.parametrize("name", ["transformer_encoder", "lstm"])
def test_the_result_states_what_it_did_not_analyse(name):
    model, x = BUILDERS[name]()
    result = nc.sensitivity(model, example_inputs=x, ratios=[0.5], progress=False)
    line = next(n for n in result.notes if "of parameters not analysed" in n)
    assert "embeddings (opt-in" in line and "biases/norms" in line
    assert line in str(result) and "of parameters not analysed: embeddings" in result._repr_html_()


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_a_suggestion_is_applied_and_undone_bit_exactly(name):
    model, x = BUILDERS[name]()
    before = snapshot(model)
    result = nc.sensitivity(model, _evaluate(model, x), ratios=[0.3, 0.6, 0.9], progress=False)
    suggestion = result.suggest(0.5)
    assert set(suggestion.ratios) <= set(result.layers)
    nc.prune_ratios_(model, suggestion.ratios)
    for n in _multi(model, suggestion.ratios):
        if suggestion.ratios[n] > 0:
            assert layer_sparsity(model.get_submodule(n), "element") == pytest.approx(
                suggestion.ratios[n], abs=1e-3
            )
    nc.undo_(model)
    assert_same_state(model, before)


def test_prune_to_on_an_lstm_prunes_its_gates_and_undoes():
    model, x = BUILDERS["lstm"]()
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = nc.prune_to_(
            model, _evaluate(model, x), 0.5, stages=2, ratios=[0.3, 0.6, 0.9], progress=False
        )
    assert report.stages[-1]["sparsity"] >= 0.5 - 1e-3
    assert layer_sparsity(model.lstm, "element") > 0
    nc.undo_(model)
    assert_same_state(model, before)


@pytest.mark.parametrize("name", ["transformer_encoder", "lstm"])
def test_channel_granularity_leaves_gate_matrices_out_with_a_note(name):
    model, x = BUILDERS[name]()
    result = nc.sensitivity(
        model, example_inputs=x, ratios=[0.5], granularity="channel", include_output=True,
        progress=False,
    )  # fmt: skip
    assert not _multi(model, result.layers)
    line = next(n for n in result.notes if "of parameters not analysed" in n)
    assert "no output channels in its gate matrices" in line
    with pytest.raises(ValueError, match="granularity: LSTM layer.* cannot be pruned"):
        nc.sensitivity(
            BUILDERS["lstm"]()[0], example_inputs=BUILDERS["lstm"]()[1], types="LSTM",
            granularity="channel", progress=False,
        )  # fmt: skip


def test_channel_sparsity_of_a_conv_transpose_counts_output_channels():
    # A ConvTranspose2d weight is (in, out, kh, kw): its output channels are dim 1.
    layer = nn.ConvTranspose2d(4, 6, 3)
    with torch.no_grad():
        layer.weight[:, :3] = 0  # half the output channels
    assert layer_sparsity(layer, "channel") == 0.5
    model = nn.Sequential(layer, nn.ReLU(), nn.Conv2d(6, 2, 1))
    result = nc.sensitivity(
        model, example_inputs=torch.randn(1, 4, 5, 5), ratios=[0.25, 0.75],
        granularity="channel", progress=False,
    )  # fmt: skip
    assert result.start["0"] == 0.5
    assert result.curves["0"][0] == result.baseline  # 25% < 50%: nothing to evaluate


def test_weight_sparsity_counts_without_a_float_copy():
    w = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    assert weight_sparsity(w, "element") == 0.75
    assert weight_sparsity(w, "channel") == 0.5


def test_setting_costs_count_an_attentions_out_projection():
    model, _ = BUILDERS["attention"]()
    costs = SettingCosts(model)
    predicted = costs.setting({"attn": 0.5})
    nc.prune_ratios_(model, {"attn": 0.5})
    assert predicted == model_footprint(model)
