"""Heads and FFN neurons of nn.MultiheadAttention / nn.TransformerEncoder removed, undo exact."""

import copy

import pytest
import torch
from torch import nn

from nbcompress.engine.core.history import transaction, undo_
from nbcompress.engine.structural.attention import apply_attention, attention_plan
from nbcompress.engine.structural.mha import PrunedMultiheadAttention
from tests.engine.structural.attention_support import remove, removed_then_undone, round_trips
from tests.helpers import assert_same_state, snapshot


def inputs(batch_first, kdim=16, vdim=16, seed=0):
    g = torch.Generator().manual_seed(seed)

    def make(length, width):
        shape = (2, length, width) if batch_first else (length, 2, width)
        return torch.randn(*shape, generator=g)

    return make(5, 16), make(7, kdim), make(7, vdim)


CONFIGS = [{}, {"add_bias_kv": True}, {"add_zero_attn": True}, {"kdim": 6, "vdim": 5},
           {"bias": False}]  # fmt: skip


def call_variants(heads=4):
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[0, -2:] = True
    per_head = torch.randn(2 * heads, 5, 7, generator=torch.Generator().manual_seed(1))
    causal = torch.triu(torch.ones(5, 7, dtype=torch.bool), diagonal=1)
    return [
        {},
        {"key_padding_mask": kpm},
        {"attn_mask": per_head},
        {"attn_mask": per_head > 1, "key_padding_mask": kpm, "need_weights": False},
        {"average_attn_weights": False},
        {"attn_mask": causal, "is_causal": True, "need_weights": False},
        {"key_padding_mask": kpm.float() * -1e4, "need_weights": False},
    ]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(c) or "default")
def test_all_heads_kept_matches_multiheadattention(batch_first, config):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, **config).eval()
    pruned = PrunedMultiheadAttention.from_module(mha, [0, 1, 2, 3])
    q, k, v = inputs(batch_first, mha.kdim, mha.vdim)
    for kw in call_variants():
        want, got = mha(q, k, v, **kw), pruned(q, k, v, **kw)
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
        assert (got[1] is None) == (want[1] is None)
        if want[1] is not None:
            torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-5)


def test_unbatched_input_matches():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4).eval()
    pruned = PrunedMultiheadAttention.from_module(mha, range(4))
    q = torch.randn(5, 16)
    for got, want in zip(pruned(q, q, q), mha(q, q, q), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(c) or "default")
def test_removed_heads_equal_zeroed_out_projection_columns(config):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True, **config).eval()
    keep = [0, 2]
    pruned = PrunedMultiheadAttention.from_module(mha, keep)
    zeroed = copy.deepcopy(mha)
    with torch.no_grad():
        zeroed.out_proj.weight[:, 4:8] = 0  # head 1
        zeroed.out_proj.weight[:, 12:16] = 0  # head 3
    q, k, v = inputs(True, mha.kdim, mha.vdim)
    for kw in call_variants():
        kw = {**kw, "average_attn_weights": False}
        want, got = zeroed(q, k, v, **kw), pruned(q, k, v, **kw)
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
        if want[1] is not None:  # per-head weights: those of the kept heads
            torch.testing.assert_close(got[1], want[1][:, keep], atol=1e-6, rtol=1e-5)
    assert pruned.num_heads == 2 and pruned.head_dim == 4 and pruned.kept_heads == (0, 2)
    assert pruned.out_proj.weight.shape == (16, 8)


def test_pruning_twice_maps_per_head_masks_to_original_heads():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    once = PrunedMultiheadAttention.from_module(mha, [1, 2, 3])
    twice = PrunedMultiheadAttention.from_module(once, [0, 2])  # original heads 1 and 3
    direct = PrunedMultiheadAttention.from_module(mha, [1, 3])
    assert twice.kept_heads == (1, 3) and twice.original_heads == 4
    q, k, v = inputs(True)
    mask = torch.randn(8, 5, 7)
    for got, want in zip(twice(q, k, v, attn_mask=mask), direct(q, k, v, attn_mask=mask),
                         strict=True):  # fmt: skip
        torch.testing.assert_close(got, want)


def encoder(batch_first, layers=2):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0,
                                       batch_first=batch_first)  # fmt: skip
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=batch_first).eval()


@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_heads_and_ffn_removed_shapes_params_and_undo(batch_first):
    model = encoder(batch_first)
    x = torch.randn(3, 6, 32) if batch_first else torch.randn(6, 3, 32)
    plan, notes = remove(copy.deepcopy(model), heads=0.5, ffn=0.5)
    assert plan.removed_heads == 4 and plan.removed_neurons == 64
    assert any(n.startswith("heads: 4 of 8") for n in notes)

    def check():
        for layer in model.layers:
            assert isinstance(layer.self_attn, PrunedMultiheadAttention)
            assert layer.self_attn.num_heads == 2 and layer.self_attn.head_dim == 8
            assert layer.linear1.out_features == 32 and layer.linear2.in_features == 32

    # Per layer: half the q/k/v rows and out columns (4 * 16 * 32 + 48), half the FFN.
    gone = removed_then_undone(model, lambda: model(x), check, heads=0.5, ffn=0.5)
    assert gone == 2 * (4 * 16 * 32 + 48 + 32 * (32 + 1 + 32))


def test_encoder_fast_path_with_padding_mask_still_works():
    # Under inference mode and a padding mask, nn.TransformerEncoder takes its fused
    # nested-tensor path; after removal the layers must get ordinary tensors.
    model = encoder(True)
    x = torch.randn(3, 6, 32)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, -2:] = True
    remove(model, heads=0.25)
    assert model.use_nested_tensor is False
    with torch.inference_mode():
        out = model(x, src_key_padding_mask=pad)
    assert out.shape == x.shape and torch.isfinite(out[~pad]).all()
    undo_(model)
    assert model.use_nested_tensor is True


def test_ffn_only_keeps_torch_fast_path_working():
    model = encoder(True)
    x = torch.randn(3, 6, 32)
    remove(model, ffn=0.5)
    slow = copy.deepcopy(model)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.inference_mode():
            want = slow(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    with torch.inference_mode():
        got = model(x)  # fused path with the narrower FFN
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_zero_ratio_changes_nothing():
    model = encoder(True)
    saved = snapshot(model)
    plan, notes = remove(model, heads=0.0, ffn=0.0)
    assert not plan and notes == []
    assert_same_state(model, saved)
    assert isinstance(model.layers[0].self_attn, nn.MultiheadAttention)


def test_heads_keep_at_least_one_and_lowest_l1_go_first():
    model = encoder(True, layers=1)
    mha = model.layers[0].self_attn
    with torch.no_grad():
        mha.in_proj_weight.view(3, 4, 8, 32)[:, 2] *= 0.01  # head 2 weakest
    plan = attention_plan(model, heads=0.25)
    assert plan.heads[0].removed == (2,)
    plan = attention_plan(model, heads=0.99)
    assert len(plan.heads[0].removed) == 3
    assert attention_plan(model, heads=0.5) == attention_plan(model, heads=0.5)


def test_ffn_round_to_keeps_multiple():
    plan = attention_plan(encoder(True), ffn=0.3, round_to=8)
    assert all((64 - len(c.removed)) % 8 == 0 for c in plan.ffn)
    assert all(len(c.removed) == 24 for c in plan.ffn)  # 64 - 19 = 45 kept -> 40


def test_layers_selects_one_block():
    plan = attention_plan(encoder(True), heads=0.5, ffn=0.5, layers="layers.1")
    assert [c.site.module for c in plan.heads] == ["layers.1.self_attn"]
    assert [c.site.fc1 for c in plan.ffn] == ["layers.1.linear1"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"heads": 0.5}, r"^heads: the model has no supported attention layer"),
        ({"ffn": 0.5}, r"^ffn: the model has no supported attention layer"),
    ],
)
def test_no_attention_refuses_with_one_line(kwargs, match):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=match) as err:
        attention_plan(model, **kwargs)
    assert "\n" not in str(err.value) and "MultiheadAttention" in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [({"heads": 1.0}, "heads"), ({"ffn": -0.1}, "ffn"), ({"heads": True}, "heads"),
     ({"heads": 0.5, "importance": "taylor"}, "importance"),
     ({"ffn": 0.5, "round_to": 0}, "round_to"),
     ({"heads": 0.5, "layers": "nothing.here"}, "heads")],
)  # fmt: skip
def test_bad_arguments_name_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=rf"^{arg}: "):
        attention_plan(encoder(True), **kwargs)


def test_bare_multiheadattention_model_refuses_heads():
    with pytest.raises(ValueError, match=r"^heads: the model itself is an nn.MultiheadAttention"):
        attention_plan(nn.MultiheadAttention(16, 4), heads=0.5)


def test_failure_part_way_rolls_back():
    model = encoder(True)
    saved = snapshot(model)
    plan = attention_plan(model, heads=0.5, ffn=0.5)
    bad = type(plan)(
        plan.heads, plan.ffn + (type(plan.ffn[0])(plan.ffn[0].site, tuple(range(64))),)
    )
    with pytest.raises(ValueError, match="^plan: "), transaction(model, "remove") as tx:
        apply_attention(model, bad, tx)
    assert_same_state(model, saved)
    assert isinstance(model.layers[0].self_attn, nn.MultiheadAttention)


def test_removed_encoder_survives_deepcopy_pickle_and_torch_save():
    model = encoder(False)
    remove(model, heads=0.5, ffn=0.25)
    x = torch.randn(6, 3, 32)
    with torch.no_grad():
        ref = model(x)
    for other in round_trips(model):
        assert isinstance(other.layers[1].self_attn, PrunedMultiheadAttention)
        with torch.no_grad():
            assert torch.equal(other(x), ref)


def test_training_and_gradients_flow_through_pruned_attention():
    model = encoder(True).train()
    remove(model, heads=0.5)
    x = torch.randn(3, 6, 32)
    model(x).sum().backward()
    attn = model.layers[0].self_attn
    assert attn.q_proj.weight.grad is not None and attn.out_proj.weight.grad is not None


def hooked_macs(module, *args):
    """MACs as per-module hooks count them: costs.macs, or the module's own estimate."""
    from nbcompress.engine.core.costs import macs

    total = []

    def hook(m, inp, out):
        own = getattr(m, "estimate_macs", None)
        total.append(own(inp, out) if callable(own) else macs(m, inp, out) or 0)

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    with torch.no_grad():
        module(*args)
    for h in handles:
        h.remove()
    return sum(total)


def test_estimate_macs_with_linear_children_equals_multiheadattention_count():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 5, 16)
    full = PrunedMultiheadAttention.from_module(mha, range(4))
    half = PrunedMultiheadAttention.from_module(mha, [0, 3])
    assert full.estimate_macs((x, x, x)) == 2 * 10 * 5 * 16  # the two attention matmuls
    assert hooked_macs(full, x, x, x) == hooked_macs(mha, x, x, x) == 10 * 4 * 256 + 1600
    assert hooked_macs(half, x, x, x) * 2 == hooked_macs(full, x, x, x)


def test_torch_pruning_removes_model_width_around_pruned_attention():
    tp = pytest.importorskip("torch_pruning")
    from nbcompress.engine.structural.mha_pruner import mha_pruner

    model = encoder(True)
    remove(model, heads=0.5)
    x = torch.randn(3, 6, 32)
    graph = tp.DependencyGraph().build_dependency(
        model, (x,), customized_pruners={PrunedMultiheadAttention: mha_pruner()}
    )
    group = graph.get_pruning_group(
        model.layers[0].linear2, tp.prune_linear_out_channels, idxs=[0, 5, 9, 31]
    )
    group.prune()
    attn = model.layers[1].self_attn
    assert (attn.embed_dim, attn.num_heads, attn.head_dim) == (28, 2, 8)
    assert attn.q_proj.weight.shape == (16, 28) and attn.out_proj.weight.shape == (28, 16)
    with torch.no_grad():
        out = model(torch.randn(3, 6, 28))
    assert out.shape == (3, 6, 28) and torch.isfinite(out).all()


def test_init_kwargs_rebuild_the_shapes_for_load_state_dict():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, kdim=6, vdim=5, add_bias_kv=True, batch_first=True)
    pruned = PrunedMultiheadAttention.from_module(mha, [1, 3]).eval()
    rebuilt = PrunedMultiheadAttention(**pruned.init_kwargs()).eval()
    rebuilt.load_state_dict(pruned.state_dict())
    q, k, v = inputs(True, 6, 5)
    mask = torch.randn(8, 5, 7)
    for got, want in zip(rebuilt(q, k, v, attn_mask=mask), pruned(q, k, v, attn_mask=mask),
                         strict=True):  # fmt: skip
        assert torch.equal(got, want)


def test_full_transformer_decoder_self_and_cross_attention():
    torch.manual_seed(0)
    model = nn.Transformer(32, 4, 1, 2, dim_feedforward=64, dropout=0.0, batch_first=True)
    model.eval()
    src, tgt = torch.randn(2, 7, 32), torch.randn(2, 5, 32)
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    plan, _ = remove(copy.deepcopy(model), heads=0.5, ffn=0.5)
    assert len(plan.heads) == 1 + 2 * 2 and len(plan.ffn) == 3  # decoder: self + cross

    def check():
        layer = model.decoder.layers[1]
        assert layer.self_attn.num_heads == layer.multihead_attn.num_heads == 2

    run = lambda: model(src, tgt, tgt_mask=mask, tgt_is_causal=True)  # noqa: E731
    assert removed_then_undone(model, run, check, heads=0.5, ffn=0.5) > 0


class WindowAttention(nn.Module):
    """Stands in for an attention type the removal does not know (e.g. Swin's)."""

    def __init__(self):
        super().__init__()
        self.num_heads = 2
        self.qkv = nn.Linear(32, 96)

    def forward(self, x):
        return x + self.qkv(x)[..., :32]


def test_unsupported_attention_is_named_in_the_refusal_and_in_the_notes():
    with pytest.raises(ValueError, match=r"found WindowAttention at 0\)") as err:
        attention_plan(nn.Sequential(WindowAttention()), heads=0.5)
    assert "\n" not in str(err.value)
    model = nn.Sequential(encoder(True), WindowAttention())
    plan, notes = remove(model, heads=0.5)
    assert plan.skipped == ("1",) and plan.removed_heads == 4
    assert notes[-2].startswith("heads: left alone in 1 attention module(s) of an unsupported")


def test_layers_list_and_bad_type():
    plan = attention_plan(encoder(True), ffn=0.5, layers=["layers.0.*", "layers.1.linear1"])
    assert [c.site.fc1 for c in plan.ffn] == ["layers.0.linear1", "layers.1.linear1"]
    with pytest.raises(TypeError, match=r"^layers: "):
        attention_plan(encoder(True), heads=0.5, layers=3)
