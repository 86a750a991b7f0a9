"""torchvision VisionTransformer: heads and MLP neurons removed, forward kept, undo exact."""

import pytest
import torch

from nbcompress.engine.core.history import undo_
from nbcompress.engine.structural.attention import attention_plan
from nbcompress.engine.structural.mha import PrunedMultiheadAttention
from tests.engine.structural.attention_support import (
    remove,
    removed_then_undone,
    round_trips,
    with_heads_zeroed,
)
from tests.helpers import assert_same_state, snapshot

torchvision = pytest.importorskip("torchvision")


def small_vit():
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64
    ).eval()


def test_sites_are_the_encoder_attention_and_mlp():
    plan = attention_plan(small_vit(), heads=0.25, ffn=0.5)
    names = [c.site.module for c in plan.heads]
    assert names == [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(2)]
    pairs = [(c.site.fc1, c.site.fc2) for c in plan.ffn]
    assert pairs == [(f"encoder.layers.encoder_layer_{i}.mlp.0",
                      f"encoder.layers.encoder_layer_{i}.mlp.3") for i in range(2)]  # fmt: skip
    assert [len(c.removed) for c in plan.heads] == [1, 1]
    assert [len(c.removed) for c in plan.ffn] == [32, 32]


def test_heads_and_mlp_removed_forward_params_undo():
    model = small_vit()
    x = torch.randn(2, 3, 32, 32)

    def check():
        for block in model.encoder.layers:
            attn = block.self_attention
            assert isinstance(attn, PrunedMultiheadAttention)
            assert (attn.num_heads, attn.head_dim, attn.embed_dim) == (3, 8, 32)
            assert block.mlp[0].out_features == 32 and block.mlp[3].in_features == 32
        assert model.hidden_dim == 32  # the residual stream keeps its width

    gone = removed_then_undone(model, lambda: model(x), check, heads=0.25, ffn=0.5)
    # Heads: 3 * 32 * 8 q/k/v weights + 24 biases + 8 * 32 out columns; MLP 32 * (32 + 1 + 32).
    assert gone == 2 * (1048 + 2080)


def test_removed_heads_match_the_model_with_those_heads_zeroed():
    model = small_vit()
    plan = attention_plan(model, heads=0.5)
    zeroed = with_heads_zeroed(model, plan, lambda attn: attn.out_proj.weight)
    remove(model, heads=0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), zeroed(x), atol=1e-5, rtol=1e-5)


def test_removed_vit_survives_deepcopy_pickle_and_torch_save():
    model = small_vit()
    remove(model, heads=0.5, ffn=0.5)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    for other in round_trips(model):
        with torch.no_grad():
            assert torch.equal(other(x), ref)


def test_second_removal_works_on_pruned_attention_and_undoes_in_order():
    model = small_vit()
    saved = snapshot(model)
    remove(model, heads=0.25)
    middle = snapshot(model)
    plan, _ = remove(model, heads=0.5)
    assert [c.site.num_heads for c in plan.heads] == [3, 3]
    assert model.encoder.layers[0].self_attention.num_heads == 2
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 32, 32))).all()
    undo_(model)
    assert_same_state(model, middle)
    undo_(model)
    assert_same_state(model, saved)


def test_torch_pruning_narrows_the_vit_stream_after_head_removal():
    # The heads' inner width is independent of the model width, so a width that no head
    # count divides (27) is fine once the attention is a PrunedMultiheadAttention.
    tp = pytest.importorskip("torch_pruning")
    from nbcompress.engine.structural.mha_pruner import mha_pruner

    model = small_vit()
    remove(model, heads=0.5)
    x = torch.randn(2, 3, 32, 32)
    graph = tp.DependencyGraph().build_dependency(
        model,
        (x,),
        customized_pruners={PrunedMultiheadAttention: mha_pruner()},
        unwrapped_parameters=[(model.class_token, 2), (model.encoder.pos_embedding, 2)],
        verbose=False,
    )
    graph.get_pruning_group(
        model.conv_proj, tp.prune_conv_out_channels, idxs=[0, 3, 7, 11, 20]
    ).prune()
    model.hidden_dim = model.conv_proj.out_channels
    attn = model.encoder.layers[1].self_attention
    assert (attn.embed_dim, attn.num_heads, attn.head_dim) == (27, 2, 8)
    assert attn.q_proj.weight.shape == (16, 27) and attn.out_proj.weight.shape == (27, 16)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
