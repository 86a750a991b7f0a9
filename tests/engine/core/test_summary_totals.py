"""%summary's totals: latency of the whole model (never a sum over nested rows), norm sparsity."""

import time

import pytest
import torch
from torch import nn

import nbcompress as nc
from nbcompress.engine.core import summary_timing


def _nested(rows):
    timed = [r["layer"] for r in rows if r["latency"] is not None]
    return [
        (a, b) for a in timed for b in timed if a != b and (a == "(model)" or b.startswith(a + "."))
    ]


def test_vit_b_16_total_latency_is_the_whole_model_not_a_sum_over_nested_rows():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.vit_b_16().eval()  # random init: nothing is downloaded
    s = nc.summary(model, torch.randn(1, 3, 224, 224), repeats=3)
    rows = {r["layer"]: r for r in s.rows}
    # The model itself (class_token) and the encoder (pos_embedding) hold weights and
    # contain other rows: timing them would count every block twice.
    assert rows["(model)"]["latency"] is None and rows["encoder"]["latency"] is None
    assert _nested(s.rows) == []
    assert s.totals["latency"] == s.latency.median
    assert all(rows[f"encoder.layers.encoder_layer_{i}.mlp.0"]["latency"] for i in range(12))
    assert any("not a sum of the rows" in n for n in s.notes)
    assert any("Not timed alone: (model), encoder" in n for n in s.notes)


class _Wrapper(nn.Module):
    """Holds a weight of its own and a child layer: a container row, like a ViT encoder."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(8))
        self.inner = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))

    def forward(self, x):
        return self.inner(x * self.scale)


@pytest.mark.parametrize("in_place", [False, True])
def test_layers_timed_in_place_or_alone_never_count_a_container(monkeypatch, in_place):
    if in_place:  # the path of a slow model: hooked whole-model runs time every layer
        monkeypatch.setattr(summary_timing, "SLOW_MODEL", 0.0)
        monkeypatch.setattr(summary_timing, "IN_PLACE", 0.0)
    s = nc.summary(_Wrapper(), torch.randn(4, 8), repeats=4)
    rows = {r["layer"]: r for r in s.rows}
    assert rows["(model)"]["latency"] is None
    assert rows["inner.0"]["latency"] > 0 and rows["inner.2"]["latency"] > 0
    assert s.totals["latency"] == s.latency.median
    assert s.latency.repeats == (4 if in_place else 5)


class _Sleepy(nn.Module):
    """Sleeps 10 ms on its first call of a forward, 200 ms on its second."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        time.sleep(0.01 if self.calls % 2 else 0.2)
        return x


def test_hooked_runs_time_a_shared_layer_by_its_first_call_in_each_run():
    layer = _Sleepy()
    model = nn.Sequential(layer, nn.ReLU(), layer)  # one layer called twice per forward
    whole, times = summary_timing._hooked_runs(
        lambda: model(torch.ones(1)), {"0": layer}, lambda first: 3
    )
    assert whole.repeats == 3 and layer.calls == 6
    assert 0.01 <= times["0"] < 0.2  # the first call (as its MACs), not both calls summed


def test_batchnorm_zero_bias_is_not_counted_as_sparsity():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.LayerNorm(2))
    s = nc.summary(model)
    assert s.layer("1")["sparsity"] == 0.0 and s.layer("2")["sparsity"] == 0.0
    assert s.layer("1")["nonzeros"] == 4  # the zero shift is still not stored as a nonzero
    assert any("zero-initialised shift (bias) is not pruning" in n for n in s.notes)
    with torch.no_grad():
        model[1].weight[:2] = 0  # a scale pruned to zero is sparsity
    assert nc.summary(model).layer("1")["sparsity"] == 0.5
