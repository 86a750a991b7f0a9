"""Issue 11 (F11): a sweep's trial saves only the entries it zeroes, and zeroes what prune_ does."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import nbcompress as nc
from nbcompress.engine.core.history import trial
from nbcompress.engine.core.layers import MULTI_WEIGHT_TYPES
from nbcompress.engine.prune.masks import GRANULARITIES
from nbcompress.engine.sensitivity.entries import prune_in_trial
from nbcompress.engine.sensitivity.evaluate import select_sweep_layers
from nbcompress.engine.sensitivity.guard import layer_trial
from tests.helpers import assert_same_state, bits, snapshot
from tests.real_models import BUILDERS


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(12, 12), nn.Linear(12, 12)
        self.b.weight = self.a.weight
        self.up = nn.ConvTranspose2d(3, 6, 3, groups=3)
        self.conv = nn.Conv2d(6, 5, 3)


def _coarse(model: nn.Module) -> nn.Module:
    """Weights on a coarse grid: many ties at any threshold, and exact (and -0.0) zeros."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.round(p * 8) / 8)
            p[p == 0] = -0.0
    return model


_MODELS = {
    "tied+convtranspose": lambda: _coarse(_Tied()),
    **{name: (lambda b=b: _coarse(b()[0])) for name, b in BUILDERS.items()},
}


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("name", sorted(_MODELS))
def test_a_trial_zeroes_exactly_what_prune_ratios_zeroes_and_restores(name, granularity):
    torch.manual_seed(0)
    model = _MODELS[name]()
    twin, before = copy.deepcopy(model), snapshot(model)
    # Every layer, the output layer too (its trial must match prune_ratios_ as well).
    layers, _ = select_sweep_layers(model, None, None, None, granularity, include_output=True)
    for layer in layers:
        for ratio in (0.3, 0.75):
            with layer_trial(model, {layer: layers[layer]}) as t:
                prune_in_trial(model, t, {layer: ratio}, granularity)
                got = snapshot(model)
            with trial(twin):
                nc.prune_ratios_(twin, {layer: ratio}, granularity=granularity)
                want = snapshot(twin)
            for key, value in want.items():
                assert torch.equal(bits(got[key]), bits(value)), (layer, ratio, key)
            assert_same_state(model, before)
    if name in BUILDERS and granularity != "channel":  # attention / LSTM layers were tried
        assert any(isinstance(m, MULTI_WEIGHT_TYPES) for m in layers.values())


@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_a_trial_holds_the_zeroed_values_and_a_bit_per_weight(ratio):
    # Before: a full copy of the layer, the boolean mask and the selection's temporaries
    # (3.3x the layer in benchmarks/bench_memory.py --verb sensitivity).
    model = nn.Sequential(nn.Linear(512, 256))
    weight_bytes = model[0].weight.nbytes
    with layer_trial(model, {"0": model[0]}) as t:
        prune_in_trial(model, t, {"0": ratio}, "element")
        held = sum(s.nbytes for s in t.saved)
    assert held <= (ratio + 1 / 32) * weight_bytes + 64
    assert held >= ratio * weight_bytes
