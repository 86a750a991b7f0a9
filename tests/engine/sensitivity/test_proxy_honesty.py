"""The data-free proxy says when the output cannot show a change, and compares features then."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

import nbcompress as nc
from nbcompress.engine.sensitivity.guard import Fingerprint
from nbcompress.engine.sensitivity.proxy import Proxy, output_layers


def _sweep(model, x, **kwargs):
    fingerprint = Fingerprint.of(model)
    r = nc.sensitivity(model, example_inputs=x, progress=False, **kwargs)
    assert not fingerprint.changed_in(model)
    return r


def _tiny_vit():
    torch.manual_seed(0)  # torchvision zero-initialises the head: the output is all zeros
    vit = VisionTransformer(
        image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32
    )
    return vit, torch.randn(4, 3, 16, 16)


def test_near_constant_output_compares_the_features_entering_the_head():
    model, x = _tiny_vit()
    r = _sweep(model, x, ratios=[0.5, 0.9], layers=["conv_proj", "*mlp.0", "heads.head"])
    assert r.metric.startswith("feature cosine") and "heads.head" in r.metric
    note = next(n for n in r.notes if n.startswith("Proxy:"))
    assert "near-constant across the batch" in note and "features entering heads.head" in note
    assert r.curves["conv_proj"][1] < 0.99  # no longer a flat 1.0
    # A zero head: pruning it changes nothing (cosine of equal features, to rounding).
    assert r.curves["heads.head"] == pytest.approx([1.0, 1.0], abs=1e-12)


def test_flat_softmax_of_a_random_mobilenet_is_detected():
    torch.manual_seed(0)
    model, x = torchvision.models.mobilenet_v3_small(), torch.randn(3, 3, 32, 32)
    r = _sweep(model, x, ratios=[0.9], layers=["features.0.0", "classifier.0"])
    assert "softmax is nearly flat" in next(n for n in r.notes if n.startswith("Proxy:"))
    assert "classifier.3" in r.metric
    assert all(r.curves[n][0] < 0.99 for n in r.layers)


def test_a_one_column_output_is_not_a_sign_count():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1))
    r = _sweep(model, torch.randn(16, 6), ratios=[0.5, 0.9])
    assert "one column ((16, 1))" in next(n for n in r.notes if n.startswith("Proxy:"))
    values = [v for curve in r.curves.values() for v in curve]
    assert not all(v in (-1.0, 0.0, 1.0) for v in values)  # graded, not signs
    assert r.curves["0"][1] < r.curves["0"][0] < 1.0


def test_an_input_blind_model_is_said_to_be_unjudgeable():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        model[0].weight.zero_()  # nothing after the first layer depends on the input
    r = _sweep(model, torch.randn(8, 4), ratios=[0.5])
    assert any("cannot judge this model" in n and "evaluate=fn" in n for n in r.notes)


def test_an_informative_output_is_compared_as_before():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        model[2].weight.mul_(20)  # confident logits: the softmax varies with the input
    proxy = Proxy(model, (torch.randn(8, 4),))
    assert proxy.name == "output agreement exp(-KL)" and proxy.note == "" and not proxy.layers
    assert proxy(model) == pytest.approx(1.0)
    assert proxy.floor is not None and proxy.floor < 0.99


class _HeadFirst(nn.Module):
    """Registers its head before its body, and an unused pooler last."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 2)
        self.body = nn.Linear(4, 8)
        self.pooler = nn.Linear(8, 8)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_the_output_layer_is_found_in_execution_order():
    assert output_layers(_HeadFirst(), (torch.randn(2, 4),)) == ["head"]
    model, x = _tiny_vit()
    assert output_layers(model, (x,)) == ["heads.head"]
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(num_classes=10)
    assert output_layers(resnet.eval(), (torch.randn(1, 3, 32, 32),)) == ["fc"]
