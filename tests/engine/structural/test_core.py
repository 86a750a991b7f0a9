"""Core of structural removal: groups from the graph, the plan, applying it, exact undo."""

from __future__ import annotations

import pytest
import torch
from core_models import same_state, state, tiny
from torch import nn

from nbcompress.engine.core.history import transaction, undo_
from nbcompress.engine.structural.apply import apply_plan
from nbcompress.engine.structural.graph import channel_groups, clear_cache
from nbcompress.engine.structural.plan import Group, GroupItem, plan_channels, removal_plan


def _group(root="c", width=8, scores=None, step=1, blocks=1, extra=()):
    idxs = tuple(range(width))
    items = (GroupItem(root, "out", idxs, idxs), *extra)
    scores = tuple(scores if scores is not None else range(width))
    return Group(root, width, items, scores, step=step, blocks=blocks)


def test_plan_removes_lowest_scores_in_original_coordinates():
    g = _group(scores=[5, 1, 7, 0, 3, 9, 8, 2])
    plan = removal_plan([g], 0.5)
    assert plan == {("c", "out"): frozenset({3, 1, 7, 4})}


def test_plan_unions_the_indices_of_a_module_shared_by_groups():
    # A concat consumer: its inputs 0..3 follow group a, 4..7 follow group b.
    cat_a = GroupItem("next", "in", (0, 1, 2, 3), (0, 1, 2, 3))
    cat_b = GroupItem("next", "in", (4, 5, 6, 7), (0, 1, 2, 3))
    a = _group("a", 4, [0, 1, 2, 3], extra=(cat_a,))
    b = _group("b", 4, [3, 2, 1, 0], extra=(cat_b,))
    plan = removal_plan([a, b], 0.5)
    assert plan[("next", "in")] == frozenset({0, 1, 6, 7})


def test_plan_never_removes_every_channel_and_keeps_round_to():
    g = _group(width=64)
    for amount in (0.3, 0.5, 0.9, 0.99):
        n = len(plan_channels(g, amount, round_to=8))
        assert 0 < n < 64 and (64 - n) % 8 == 0
    assert plan_channels(_group(width=2), 0.99) == (0,)
    assert removal_plan([_group(width=1)], 0.9) == {}


def test_plan_respects_step_and_blocks():
    g = _group(width=12, step=3)
    assert len(plan_channels(g, 0.5)) % 3 == 0
    blocks = _group(width=8, blocks=2, scores=[0, 9, 9, 1, 0, 9, 9, 1])
    assert plan_channels(blocks, 0.5) == (0, 3, 4, 7)  # the same positions in each block


def test_plan_per_root_amounts_with_globs():
    a, b = _group("layer1.conv", 8), _group("layer2.conv", 8)
    plan = removal_plan([a, b], {"layer1.*": 0.5})
    assert set(plan) == {("layer1.conv", "out")}


@pytest.mark.parametrize("amount", [1.0, -0.1, {"a": 1.0}, "x"])
def test_plan_refuses_bad_amounts(amount):
    with pytest.raises(ValueError, match="amount"):
        removal_plan([_group()], amount)


def test_groups_of_tiny_net_cover_its_constructs():
    model, x = tiny()
    groups = {g.root: g for g in channel_groups(model, x)}
    assert groups["fc2"].reason and "output layer" in groups["fc2"].reason
    stem = groups["stem"]
    assert stem.reason is None and {"stem", "bn", "a", "bn_a", "g"} <= set(stem.modules)
    assert stem.blocks == 4  # the grouped conv reads the residual stream
    assert groups["g"].blocks == 4
    assert all(len(g.scores) == g.width for g in groups.values())
    # The depthwise conv couples both halves of the concat; flatten: a channel feeds 4 inputs.
    cat = next(g for g in groups.values() if "b1" in g.modules)
    assert {"b1", "b2", "dw", "fc1"} <= set(cat.modules) and cat.width == 16
    fc1_in = [i for i in cat.items if i.module == "fc1"]
    assert len(fc1_in[0].idxs) == 16 * 4 and sorted(set(fc1_in[0].root_idxs)) == list(range(16))
    assert not any(i.module == "dw" and i.handler == "in" for g in groups.values() for i in g.items)


def test_groups_are_cached_until_the_weights_change():
    model, x = tiny()
    clear_cache()
    first = channel_groups(model, x)
    assert channel_groups(model, x) is first
    with torch.no_grad():
        model.stem.weight.mul_(2)
    assert channel_groups(model, x) is not first


def test_graph_build_leaves_the_model_untouched():
    model, x = tiny()
    model.train()
    saved = state(model)
    channel_groups(model, x)
    assert same_state(model, saved) and all(m.training for m in model.modules())


def test_apply_shrinks_and_undo_is_identity_exact():
    model, x = tiny()
    saved, y0 = state(model), model(x)
    plan = removal_plan(channel_groups(model, x), 0.5, round_to=4)
    with transaction(model, "remove") as tx:
        apply_plan(model, plan, tx)
    y = model(x)
    assert y.shape == y0.shape and torch.isfinite(y).all()
    assert model.stem.out_channels == 8 and model.a.in_channels == 8 and model.bn.num_features == 8
    assert model.g.in_channels == 8 and model.g.groups == 4
    assert model.dw.out_channels == model.dw.groups == model.fc1.in_features // 4
    assert model.fc2.out_features == 10
    undo_(model)
    assert same_state(model, saved) and torch.equal(model(x), y0)
    assert model.stem.out_channels == 16 and model.g.in_channels == 16


def test_apply_keeps_requires_grad():
    model, x = tiny()
    model.stem.weight.requires_grad_(False)
    plan = removal_plan(channel_groups(model, x), 0.5)
    with transaction(model, "remove") as tx:
        apply_plan(model, plan, tx)
    assert not model.stem.weight.requires_grad and model.a.weight.requires_grad


def test_layers_and_ignore_restrict_the_groups():
    model, x = tiny()
    only = channel_groups(model, x, layers=["fc1", "g"])
    assert {g.root for g in only if g.reason is None} == {"fc1", "g"}
    kept = channel_groups(model, x, ignore="bn_a")
    assert next(g for g in kept if g.root == "stem").reason.startswith("touches bn_a")
    with pytest.raises(ValueError, match="layers: pattern 'nope'"):
        channel_groups(model, x, layers="nope")
    with pytest.raises(ValueError, match="ignore: pattern 'nope'"):
        channel_groups(model, x, ignore="nope")


def test_wanda_importance_uses_the_activations():
    model, x = tiny()
    l1 = {g.root: g.scores for g in channel_groups(model, x)}
    wanda = {g.root: g.scores for g in channel_groups(model, x, importance="wanda")}
    assert l1.keys() == wanda.keys() and l1["stem"] != wanda["stem"]
    assert all(s > 0 for s in wanda["stem"])
    with pytest.raises(ValueError, match="importance"):
        channel_groups(model, x, importance="taylor")


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_models_shrink_and_undo(name):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.get_model(name).eval()
    x = torch.randn(1, 3, 64, 64)
    saved, y0 = state(model), model(x)
    before = sum(p.numel() for p in model.parameters())
    plan = removal_plan(channel_groups(model, x), 0.3, round_to=8)
    with transaction(model, "remove") as tx:
        apply_plan(model, plan, tx)
    y = model(x)
    assert y.shape == y0.shape and torch.isfinite(y).all()
    assert sum(p.numel() for p in model.parameters()) < 0.8 * before
    head = model.fc if name == "resnet18" else model.classifier[3]
    assert head.out_features == 1000
    convs = [m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and (n, "out") in plan]
    assert convs and all(m.out_channels % 8 == 0 for m in convs if m.groups == 1)
    undo_(model)
    assert same_state(model, saved) and torch.equal(model(x), y0)
