import copy
import io
import pickle

import pytest
import torch
from torch import nn

import nbcompress as nc
from nbcompress.engine.prune.masks import global_masks, layer_mask
from nbcompress.engine.prune.prune import prune_ratios_
from tests.helpers import assert_same_state, cnn, mlp, snapshot, zero_fraction


@pytest.mark.parametrize("make", [mlp, cnn])
def test_l1_prune_makes_each_selected_weight_half_zero(make):
    model = make()
    nc.prune_(model, 0.5)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for m in layers[:-1]:
        assert zero_fraction(m.weight) == pytest.approx(0.5, abs=0.5 / m.weight.numel() + 1e-9)
    assert zero_fraction(layers[-1].weight) == 0.0  # output layer left alone by default


def test_l1_removes_the_smallest_magnitudes():
    lin = nn.Linear(10, 10)
    w = lin.weight.detach().clone()
    nc.prune_(nn.Sequential(lin, nn.Linear(10, 2)), 0.3)
    kept = lin.weight != 0
    assert w.abs()[~kept].max() <= w.abs()[kept].min()


def test_random_baseline_differs_from_l1_and_is_seeded():
    a, b, c = mlp(), mlp(), mlp()
    b.load_state_dict(a.state_dict())
    c.load_state_dict(a.state_dict())
    nc.prune_(a, 0.5, method="random", seed=1)
    nc.prune_(b, 0.5, method="random", seed=1)
    nc.prune_(c, 0.5)
    assert torch.equal(a[0].weight, b[0].weight)
    assert not torch.equal(a[0].weight == 0, c[0].weight == 0)
    assert zero_fraction(a[0].weight) == pytest.approx(0.5)


def test_amount_counts_existing_zeros_and_random_never_revives():
    model = mlp()
    nc.prune_(model, 0.5, method="random")
    zeros = model[0].weight == 0
    nc.prune_(model, 0.7, method="random", seed=3)
    assert zero_fraction(model[0].weight) == pytest.approx(0.7, abs=1e-3)
    assert bool((model[0].weight[zeros] == 0).all())


def test_structured_zeroes_whole_output_channels_and_bias():
    model = cnn()
    nc.prune_(model, 0.5, granularity="channel", layers="3")
    w, b = model[3].weight, model[3].bias
    dead = (w.reshape(8, -1) == 0).all(1)
    assert int(dead.sum()) == 4
    assert bool((b[dead] == 0).all())
    assert bool((w.reshape(8, -1)[~dead] != 0).any(1).all())


def _blocks_whole(w: torch.Tensor) -> bool:
    """Every group of 4 output rows is either all zero or all kept at each input position."""
    rows = w.reshape(w.shape[0], -1) != 0
    pad = -rows.shape[0] % 4
    rows = torch.cat([rows, rows[-1:].expand(pad, -1)]) if pad else rows
    groups = rows.reshape(-1, 4, rows.shape[1])
    return bool((groups.all(1) | ~groups.any(1)).all())


@pytest.mark.parametrize("method", ["l1", "random"])
def test_block_granularity_removes_whole_4x1_blocks(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Conv2d(3, 6, 3), nn.Linear(6, 2))
    nc.prune_(model, 0.75, granularity="block", types=["Linear", "Conv2d"], method=method)
    lin, conv = model[0].weight, model[2].weight
    assert _blocks_whole(lin) and _blocks_whole(conv)
    assert zero_fraction(lin) == pytest.approx(0.75)  # 8 × 16 blocks, 96 removed
    # 6 output channels: a block of 4 and a partial block of 2, 2 × 27 blocks, 40 removed
    dead = (conv.reshape(6, -1) == 0).float()
    assert float(dead[:4].mean(0).sum() / 27 + dead[4:].mean(0).sum() / 27) == pytest.approx(
        40 / 27
    )
    assert nc.history(model)[-1].info["granularity"] == "block"
    if method == "l1":
        w = model[0].weight.detach().clone()
        nc.undo_(model)
        norms = model[0].weight.detach().abs().reshape(8, 4, 16).sum(1)
        kept = (w.reshape(8, 4, 16) != 0).any(1)
        assert norms[~kept].max() <= norms[kept].min()  # smallest L1 blocks went first


def test_a_last_partial_block_is_scored_like_a_full_one():
    # 6 outputs: one block of 4 rows and one of 2. Scored by its sum, the short block would
    # look small and go first (83% vs 17% zeros measured before the fix).
    torch.manual_seed(0)
    lin = nn.Linear(64, 6)
    nc.prune_(nn.Sequential(lin), 0.5, granularity="block", include_output=True)
    dead = lin.weight == 0
    assert float(dead[:4].float().mean()) == pytest.approx(0.5, abs=0.15)
    assert float(dead[4:].float().mean()) == pytest.approx(0.5, abs=0.15)
    assert int(dead[:4].all(0).sum() + dead[4:].all(0).sum()) == 64  # half the 128 blocks


def test_block_granularity_global_and_existing_zeros():
    model = mlp()
    nc.prune_(model, 0.5, granularity="block", scope="global")
    assert all(_blocks_whole(model[i].weight) for i in (0, 2))
    zeros = model[0].weight == 0
    nc.prune_(model, 0.8, granularity="block")
    assert bool((model[0].weight[zeros] == 0).all()) and _blocks_whole(model[0].weight)
    assert zero_fraction(model[0].weight) == pytest.approx(0.8, abs=0.5 / 128)  # 128 blocks


def test_block_pruned_layers_are_measured_on_block_sparse_kernels():
    from nbcompress.engine.speedup.sparsify import analyse

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 8)).eval()
    element = copy.deepcopy(model)
    nc.prune_(model, 0.9, granularity="block")
    nc.prune_(element, 0.9)
    x = torch.randn(3, 64)
    blocked, plain = analyse(model, x, repeats=3), analyse(element, x, repeats=3)
    first = blocked.layers[0]
    assert "bsr" in first.times and first.errors["bsr"] <= first.tolerances["bsr"]
    assert "bsr" not in plain.layers[0].times  # scattered zeros: no 4-row blocks to keep


def test_layer_selection_by_glob_type_and_dict():
    model = cnn()
    nc.prune_(model, 0.5, types="Conv2d")
    assert zero_fraction(model[0].weight) > 0.4 and zero_fraction(model[6].weight) == 0
    model = cnn()
    nc.prune_(model, {"0": 0.2, "6": 0.9})
    assert zero_fraction(model[0].weight) == pytest.approx(0.2, abs=0.03)
    assert zero_fraction(model[3].weight) == 0
    assert zero_fraction(model[6].weight) == pytest.approx(0.9, abs=1e-3)  # named literally


def test_output_layer_included_on_request():
    model = mlp()
    nc.prune_(model, 0.5, include_output=True)
    assert zero_fraction(model[4].weight) == pytest.approx(0.5)
    assert "left alone" not in nc.history(model)[-1].detail


def _recommender() -> nn.Module:
    class Rec(nn.Module):
        def __init__(self):
            super().__init__()
            self.users = nn.Embedding(100, 32)  # N(0, 1): large magnitudes
            self.items = nn.Embedding(100, 32)
            self.mlp = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))

        def forward(self, u, i):
            return self.mlp(torch.cat([self.users(u), self.items(i)], 1))

    return Rec()


def test_global_scope_does_not_wipe_out_small_layers():
    model = _recommender()
    with pytest.warns(UserWarning, match="mlp.0"):
        nc.prune_(model, 0.8, scope="global", types=["Embedding", "Linear"], include_output=True)
    for layer in (model.mlp[0], model.mlp[2]):
        assert zero_fraction(layer.weight) <= 0.95 + 1e-6
    total = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    zeros = sum(int((p == 0).sum()) for n, p in model.named_parameters() if n.endswith("weight"))
    assert zeros / total == pytest.approx(0.8, abs=1e-3)


def test_global_masks_without_guard_would_wipe_the_layer():
    # The trap the guard exists for: plain pooled ranking empties the small layer.
    big, small = torch.randn(100, 100) * 10, torch.randn(10, 10) * 0.01
    masks = global_masks({"big": big, "small": small}, 0.5, min_density=0.0)
    assert not masks["small"].any()
    with pytest.warns(UserWarning, match="small"):
        guarded = global_masks({"big": big, "small": small}, 0.5, min_density=0.1)
    assert int(guarded["small"].sum()) >= 10


def test_layer_mask_exact_count():
    w = torch.randn(7, 13)
    assert int((~layer_mask(w, 0.4)).sum()) == round(0.4 * 91)


def test_a_compressed_model_stays_an_ordinary_model(tmp_path):
    model = cnn()
    keys = list(model.state_dict())
    nc.prune_(model, 0.5)
    assert list(model.state_dict()) == keys
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    x = torch.randn(2, 1, 8, 8)
    model.eval()
    expected = model(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(clone(x), expected)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), expected)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    fresh = cnn()
    fresh.load_state_dict(torch.load(tmp_path / "w.pt"))
    assert torch.equal(fresh.eval()(x), expected)


def test_kept_masks_hold_zeros_through_fine_tuning():
    model = mlp()
    params = {id(p) for p in model.parameters()}
    nc.prune_(model, 0.6, keep_masks=True)
    assert "0.weight_mask" in model.state_dict()
    pruned = model[0].weight == 0
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(8, 16)).pow(2).sum().backward()
        assert bool((model[0].weight_orig.grad[pruned] == 0).all())
        opt.step()
    assert bool((model[0].weight[pruned] == 0).all())
    assert {id(p) for p in model.parameters()} == params  # optimizers keep working
    nc.remove_masks_(model)
    assert "0.weight_mask" not in model.state_dict()
    assert zero_fraction(model[0].weight) >= 0.6 - 1 / model[0].weight.numel()
    assert not model[0]._forward_pre_hooks
    copy.deepcopy(model)
    pickle.dumps(model)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"amount": 1.0}, ValueError, "amount"),
        ({"amount": -0.1}, ValueError, "amount"),
        ({"amount": "half"}, TypeError, "amount"),
        ({"amount": float("nan")}, ValueError, "amount"),
        (
            {"amount": 0.5, "layers": "nope.*"},
            ValueError,
            "layers: pattern 'nope.*' matches no layer. Available: 0, 2",
        ),
        ({"amount": 0.5, "types": "Blah"}, ValueError, "types"),
        ({"amount": 0.5, "types": "LSTM"}, ValueError, "types"),
        ({"amount": 0.5, "method": "l3"}, ValueError, "method"),
        ({"amount": 0.5, "scope": "world"}, ValueError, "scope"),
        ({"amount": {"zzz": 0.5}}, ValueError, "amount"),
        ({"amount": {"0": 2}}, ValueError, "amount"),
        ({"amount": 0.5, "layers": "4"}, None, None),
    ],
)
def test_bad_input_is_rejected_and_the_model_untouched(kwargs, error, match):
    model = mlp()
    saved = snapshot(model)
    amount = kwargs.pop("amount")
    if error is None:  # naming the output layer literally is allowed
        nc.prune_(model, amount, **kwargs)
        assert zero_fraction(model[4].weight) == pytest.approx(0.5)
        return
    with pytest.raises(error, match=match.replace("(", r"\(").replace(".*", r"\.\*")):
        nc.prune_(model, amount, **kwargs)
    assert_same_state(model, saved)
    assert nc.history(model) == []


def test_non_module_is_rejected():
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        nc.prune_([1, 2], 0.5)


def test_prune_ratios_is_one_undoable_step_equal_to_per_layer_prune():
    model = cnn()
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    ratios = {names[0]: 0.5, names[1]: 0.0, names[-1]: 0.3}  # the output layer when named
    twin, saved = copy.deepcopy(model), snapshot(model)
    assert prune_ratios_(model, ratios, granularity="channel") is model
    for name in (names[0], names[-1]):
        nc.prune_(
            twin, {name: ratios[name]}, layers=[name], include_output=True, granularity="channel"
        )
    assert_same_state(model, snapshot(twin))
    assert len(nc.history(model)) == 1  # one transaction, layers at 0 left alone
    assert nc.history(model)[-1].info["amounts"] == {names[0]: 0.5, names[-1]: 0.3}
    nc.undo_(model)
    assert_same_state(model, saved)


@pytest.mark.parametrize(
    "ratios, error, match",
    [
        (
            {"nope": 0.5},
            ValueError,
            r"ratios: 'nope' is not a layer with a weight in this model; use",
        ),
        ({"0": 1.0}, ValueError, r"ratios\['0'\]: 1.0 is outside \[0, 1\)"),
        ({"0": -0.1}, ValueError, r"ratios\['0'\]: -0.1 is outside \[0, 1\)"),
        ({"0": "half"}, TypeError, r"ratios\['0'\]: expected a number in \[0, 1\)"),
        ({"0": 0.0}, ValueError, "ratios: every ratio is 0, so there is nothing to prune"),
        (0.5, TypeError, "ratios: expected a dict layer name → fraction"),
    ],
)
def test_prune_ratios_rejects_bad_ratios_with_the_model_untouched(ratios, error, match):
    model = mlp()
    saved = snapshot(model)
    with pytest.raises(error, match=match):
        prune_ratios_(model, ratios)
    assert_same_state(model, saved)
    assert len(nc.history(model)) == 0


def test_a_pattern_matching_no_layer_of_a_deep_model_lists_short_patterns():
    blocks = nn.ModuleList(
        nn.ModuleDict({"query": nn.Linear(4, 4), "value": nn.Linear(4, 4)}) for _ in range(6)
    )
    model = nn.ModuleDict({"layer": blocks, "head": nn.Linear(4, 2)})
    with pytest.raises(ValueError) as caught:
        nc.prune_(model, 0.5, layers="nope.*")
    message = str(caught.value)
    assert "layer.*.query (6), layer.*.value (6), head — 13 layers in all" in message
    assert "layer.3.query" not in message and len(message) < 200
