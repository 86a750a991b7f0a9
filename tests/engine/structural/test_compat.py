"""Model-family fixes for Torch-Pruning's graph (compat): each construct on a tiny model.

The constructs are torchvision's own modules at toy sizes (a ShuffleNetV2 channel-shuffle
block, Swin / Swin-V2 window attention and patch merging, MaxViT attention, a ViT storing its
width as ``hidden_dim``), plus a flatten whose index list the guard stops. Seeded, CPU.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

tp = pytest.importorskip("torch_pruning")
tv = pytest.importorskip("torchvision")

from torch_pruning.dependency import graph as tp_graph  # noqa: E402
from torch_pruning.dependency import index_mapping  # noqa: E402
from torchvision.models import maxvit, shufflenetv2, swin_transformer, vision_transformer  # noqa: E402

from nbcompress.engine.core.history import undo_  # noqa: E402
from nbcompress.engine.structural import compat  # noqa: E402
from nbcompress.engine.structural.remove import remove_  # noqa: E402


def shuffle_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        shufflenetv2.InvertedResidual(16, 32, 2),
        shufflenetv2.InvertedResidual(32, 32, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    ).eval()


def swin(v2: bool = False) -> nn.Module:
    torch.manual_seed(0)
    extra = {}
    if v2:
        extra = {
            "block": swin_transformer.SwinTransformerBlockV2,
            "downsample_layer": swin_transformer.PatchMergingV2,
        }
    return swin_transformer.SwinTransformer(
        patch_size=[4, 4],
        embed_dim=12,
        depths=[1, 1],
        num_heads=[2, 2],
        window_size=[2, 2],
        num_classes=10,
        **extra,
    ).eval()


def vit() -> nn.Module:
    torch.manual_seed(0)
    return vision_transformer.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=10,
    ).eval()  # fmt: skip


def max_vit() -> nn.Module:
    torch.manual_seed(0)
    return maxvit.MaxVit(
        input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[8, 16],
        block_layers=[1, 1], head_dim=4, stochastic_depth_prob=0.0, num_classes=10,
    ).eval()  # fmt: skip


def flatten_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 10)
    ).eval()


def inputs(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tp_groups(model: nn.Module, x: torch.Tensor, fixes: compat.Compat) -> dict[str, str | None]:
    """Root name -> group reason, from Torch-Pruning's graph under the fixes' patches."""
    out = {}
    with fixes.patches(), torch.enable_grad():
        dg = tp.DependencyGraph().build_dependency(
            model, (x,), customized_pruners=fixes.customized_pruners or None, verbose=False
        )
        for mod in list(dg.module2node):
            if not isinstance(mod, (nn.Conv2d, nn.Linear)):
                continue
            pruner = dg.get_pruner_of_module(mod)
            width = pruner.get_out_channels(mod)
            group = dg.get_pruning_group(mod, pruner.prune_out_channels, list(range(width)))
            out[dg._module2name[mod]] = fixes.group_reason(group)
    return out


# ------------------------------------------------------------------ patches leave no trace


def test_patches_restore_every_patched_object():
    saved = (
        shufflenetv2.channel_shuffle,
        swin_transformer._patch_merging_pad,
        index_mapping._FlattenIndexMapping.__call__,
        tp_graph.DependencyGraph.get_pruning_group,
    )
    for model, patched in [(shuffle_net(), 0), (swin(), 1), (max_vit(), None)]:
        fixes = compat.prepare(model)
        with fixes.patches():
            now = (shufflenetv2.channel_shuffle, swin_transformer._patch_merging_pad)
            assert [i for i in (0, 1) if now[i] is not saved[i]] == (
                [] if patched is None else [patched]
            )
            assert index_mapping._FlattenIndexMapping.__call__ is not saved[2]
            assert any("forward" in vars(m) for m in model.modules()) == bool(fixes.opaque)
        assert not any("forward" in vars(m) for m in model.modules())
        assert saved == (
            shufflenetv2.channel_shuffle,
            swin_transformer._patch_merging_pad,
            index_mapping._FlattenIndexMapping.__call__,
            tp_graph.DependencyGraph.get_pruning_group,
        )


@pytest.mark.parametrize("make", [shuffle_net, swin, lambda: swin(v2=True), max_vit])
def test_patched_forward_computes_the_same_values(make):
    model, x = make(), inputs()
    with torch.no_grad():
        ref = model(x)
    fixes = compat.prepare(model)
    with fixes.patches(), torch.enable_grad():
        out = model(x)
    assert out.grad_fn is not None  # the graph can still be traced
    torch.testing.assert_close(out.detach(), ref, rtol=0, atol=0)


# ------------------------------------------------------------------ channel shuffle


def test_groups_crossing_a_channel_shuffle_keep_their_channels():
    model = shuffle_net()
    reasons = tp_groups(model, inputs(), compat.prepare(model))
    crossing = [n for n, r in reasons.items() if r and "channel shuffle" in r]
    # The last conv of each branch feeds the concat and the shuffle.
    assert "3.branch2.5" in crossing and "3.branch1.2" in crossing
    # Branch-internal groups (first 1x1 conv -> depthwise conv) stay removable.
    assert reasons["4.branch2.0"] is None and reasons["3.branch2.0"] is None


@pytest.mark.parametrize("make", [shuffle_net, max_vit])
def test_shuffle_and_maxvit_blocks_lose_channels_and_run(make):
    model, x = make(), inputs()
    before = params(model)
    remove_(model, 0.3, example_inputs=x)
    with torch.no_grad():
        assert model(x).shape == (2, 10)
    assert params(model) < before
    if make is shuffle_net:
        assert model[4].branch2[0].out_channels < 16  # a branch-internal group shrank


def test_without_the_shuffle_fix_removal_is_refused(monkeypatch):
    # Torch-Pruning alone reads the shuffle as a pass-through (or a zero-stride reshape) and
    # pairs the wrong channels across it, so the groups that cross it break the forward.
    monkeypatch.setattr(compat, "_families", lambda: [])
    model, x = shuffle_net(), inputs()
    with pytest.raises(ValueError):
        remove_(model, 0.3, example_inputs=x)


# ------------------------------------------------------------------ window attention (Swin)


def test_window_attention_pruner_keeps_qkv_and_proj_at_the_residual_width():
    model = swin()
    attn = model.features[1][0].attn
    pruner = compat.prepare(model).customized_pruners[type(attn)]
    pruner.prune_out_channels(attn, [0, 5])  # 12 -> 10 (a multiple of the 2 heads)
    assert tuple(attn.qkv.weight.shape) == (30, 10)
    assert tuple(attn.proj.weight.shape) == (10, 10)
    assert attn(torch.randn(1, 4, 4, 10)).shape == (1, 4, 4, 10)


@pytest.mark.parametrize("v2", [False, True])
def test_swin_loses_residual_and_mlp_channels_and_undo_is_exact(v2):
    model, x = swin(v2), inputs()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = {n: id(p) for n, p in model.named_parameters()}
    remove_(model, 0.3, example_inputs=x)
    with torch.no_grad():
        assert model(x).shape == (2, 10)
    assert model.features[0][0].out_channels < 12  # the residual stream shrank
    assert model.features[0][0].out_channels % 2 == 0  # in multiples of the head count
    assert model.features[1][0].mlp[0].out_features < 48  # MLP neurons too
    undo_(model)
    assert {n: id(p) for n, p in model.named_parameters()} == ids
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_without_the_swin_fix_the_forward_breaks(monkeypatch):
    # The attention's F.linear on qkv.weight is invisible to the graph: the residual
    # stream is pruned without qkv's inputs, so the forward fails and remove_ rolls back.
    monkeypatch.setattr(compat, "_families", lambda: [])
    model, x = swin(), inputs()
    with pytest.raises(ValueError, match="forward"):
        remove_(model, 0.3, example_inputs=x)


# ------------------------------------------------------------------ stored widths


def test_vit_hidden_dim_follows_the_embedding_and_comes_back_on_undo():
    model, x = vit(), inputs()
    remove_(model, 0.3, example_inputs=x)
    assert model.hidden_dim == model.conv_proj.out_channels < 16
    assert model.hidden_dim % 2 == 0  # a multiple of the head count
    with torch.no_grad():
        assert model(x).shape == (2, 10)
    undo_(model)
    assert model.hidden_dim == 16


def test_maxvit_attention_pruner_refreshes_the_stored_head_dim():
    model = max_vit()
    kind = maxvit.RelativePositionalMultiHeadAttention
    attn = next(m for m in model.modules() if isinstance(m, kind))
    pruner = compat.prepare(model).customized_pruners[kind]
    pruner.prune_out_channels(attn, [0, 1])  # 8 -> 6 with 2 heads: head_dim 4 -> 3
    assert (attn.head_dim, tuple(attn.to_qkv.weight.shape)) == (3, (18, 6))
    assert attn(torch.randn(1, 2, 4, 6)).shape == (1, 2, 4, 6)


# ------------------------------------------------------------------ index guard


def test_guard_stops_only_a_group_whose_index_list_outgrows_the_limit():
    model, x = flatten_net(), inputs(4)
    fixes = compat.prepare(model)
    assert tp_groups(model, x, fixes)["0"] is None  # 4 channels x 16 positions = 64 <= limit
    fixes.index_limit = 32
    reasons = tp_groups(copy.deepcopy(model), x, fixes)
    assert "reshape maps 4 channels to 64 indices" in reasons["0"]
    assert reasons["3"] is None  # the other group is unaffected


def test_guard_turns_a_failing_index_mapping_into_a_reason(monkeypatch):
    model, x = flatten_net(), inputs(4)

    def broken(self, idxs):
        raise IndexError("list index out of range")

    monkeypatch.setattr(index_mapping._FlattenIndexMapping, "__call__", broken)
    fixes = compat.prepare(model)
    with fixes.patches():  # the guard wraps whatever mapping is in place
        dg = tp.DependencyGraph().build_dependency(model, (x,), verbose=False)
        group = dg.get_pruning_group(model[0], tp.prune_conv_out_channels, [0, 1, 2, 3])
    assert "could not map its indices (IndexError" in fixes.group_reason(group)
    assert len(group) == 1  # only the root: nothing else is touched


def test_index_mappings_are_computed_once_per_graph_with_the_same_groups(monkeypatch):
    model, x = shuffle_net(), inputs()
    fixes = compat.prepare(model)
    calls = []
    update = index_mapping.update_index_mapping
    monkeypatch.setattr(
        index_mapping, "update_index_mapping", lambda g: calls.append(1) or update(g)
    )
    with_memo = tp_groups(model, x, fixes)
    assert len(calls) == 1  # build_dependency's; none per group
    monkeypatch.setattr(compat, "_index_mappings_once", contextlib.nullcontext)
    calls.clear()
    assert tp_groups(model, x, fixes) == with_memo
    assert len(calls) > 1
