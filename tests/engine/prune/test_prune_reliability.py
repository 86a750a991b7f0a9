"""Issue 11 findings on pruning: parametrized weights (F8), ConvTranspose channels (F9),
bounded-memory global ranking (F11), kept masks and deepcopy (F12), tied weights (F19),
argument checks (F20), attention / recurrent weights and coverage (F21)."""

import copy
import io
import pickle
from fractions import Fraction

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import nbcompress as nc
from nbcompress.engine.prune.masks import global_masks, layer_mask, layer_units
from tests.helpers import assert_same_state, mlp, snapshot, zero_fraction
from tests.real_models import BUILDERS

# F8 — parametrized weights


def _weight_normed() -> nn.Sequential:
    torch.manual_seed(0)
    model = mlp()
    model[0] = nn.utils.parametrizations.weight_norm(model[0])
    return model


def test_a_weight_norm_weight_is_really_pruned_and_undone_bit_exactly():
    model = _weight_normed()
    saved, before = snapshot(model), model[0].weight.detach().clone()
    nc.prune_(model, 0.5)
    after = model[0].weight.detach()
    assert zero_fraction(after) == pytest.approx(0.5)
    kept = after != 0
    torch.testing.assert_close(after[kept], before[kept], rtol=1e-5, atol=1e-6)
    assert list(model.state_dict()) == list(saved)
    nc.undo_(model)
    assert_same_state(model, saved)


class _NoInverse(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * 2


class _Clamp(nn.Module):
    # right_inverse exists, but the weight it computes never holds a zero.
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w.abs() + 1

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return w


@pytest.mark.parametrize("param", [_NoInverse, _Clamp])
def test_a_parametrization_that_cannot_hold_the_zeros_is_refused_in_one_line(param):
    model = mlp()
    parametrize.register_parametrization(model[0], "weight", param())
    saved = snapshot(model)
    with pytest.raises(ValueError, match=r"layers: the weight of '0' is parametrized") as err:
        nc.prune_(model, 0.5)
    assert "\n" not in str(err.value)
    assert_same_state(model, saved)
    assert nc.history(model) == []


def test_keep_masks_on_a_parametrized_weight_is_refused_in_one_line():
    model = _weight_normed()
    saved = snapshot(model)
    with pytest.raises(ValueError, match=r"keep_masks: the weight of 0 is parametrized"):
        nc.prune_(model, 0.5, keep_masks=True)
    assert_same_state(model, saved)


# F9 — ConvTranspose output channels


@pytest.mark.parametrize(
    "layer",
    [
        nn.ConvTranspose2d(3, 8, 3),
        nn.ConvTranspose2d(8, 8, 3),
        nn.ConvTranspose2d(4, 6, 3, groups=2),
        nn.ConvTranspose1d(5, 8, 3),
    ],
)
def test_channel_pruning_of_conv_transpose_removes_output_channels_and_their_bias(layer):
    torch.manual_seed(0)
    model = nn.Sequential(layer, nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(1, layer.in_channels, *([4] * (layer.weight.dim() - 2)))
    model(x)
    saved = snapshot(model)
    nc.prune_(model, 0.5, granularity="channel", layers="0")
    w, b, g = layer.weight.detach(), layer.bias.detach(), layer.groups
    # (in, out/g, *k) → (out, in/g, *k): output channel o = group * out/g + j.
    per = w.shape[1]
    out_major = w.reshape(g, w.shape[0] // g, per, -1).transpose(1, 2).reshape(g * per, -1)
    dead = (out_major == 0).all(1)
    assert int(dead.sum()) == round(0.5 * layer.out_channels)
    assert bool((b[dead] == 0).all()) and bool((b[~dead] != 0).all())
    assert bool((out_major[~dead] != 0).any(1).all())
    y = model(x)[0]  # a removed output channel outputs nothing, as after physical removal
    assert y.shape == (2,)
    nc.undo_(model)
    assert_same_state(model, saved)


def test_block_pruning_of_conv_transpose_groups_four_output_channels():
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(3, 8, 3)
    nc.prune_(nn.Sequential(conv), 0.5, granularity="block", include_output=True)
    rows = (conv.weight.detach().transpose(0, 1).reshape(8, -1) != 0).reshape(2, 4, -1)
    assert bool((rows.all(1) | ~rows.any(1)).all())


# F11 — bounded-memory global ranking


def _reference_counts(weights, amount, min_density):
    # The exact pooled ranking the selection must reproduce: sort everything (small sizes).
    caps = {
        n: w.numel() - int(torch.tensor(min_density * w.numel()).ceil()) for n, w in weights.items()
    }
    pooled = sorted(
        (float(v), i, n)
        for n, w in weights.items()
        for i, v in enumerate(sorted(w.abs().reshape(-1).tolist())[: caps[n]])
    )
    k = round(amount * sum(w.numel() for w in weights.values()))
    counts = dict.fromkeys(weights, 0)
    for _, _, n in pooled[:k]:
        counts[n] += 1
    return counts


@pytest.mark.parametrize("seed", range(4))
def test_global_selection_equals_the_exact_pooled_ranking_without_full_sorts(seed, monkeypatch):
    gen = torch.Generator().manual_seed(seed)
    weights = {
        "a": torch.randn(40, 30, generator=gen),
        "b": torch.randn(20, 10, generator=gen) * 0.01,  # would be wiped: capped
        "c": torch.randint(-3, 4, (25, 8), generator=gen).float(),  # many ties and zeros
    }
    expected = _reference_counts(weights, 0.6, 0.1)
    for name in ("sort", "topk", "argsort", "kthvalue"):
        monkeypatch.setattr(torch, name, lambda *a, **k: pytest.fail("full sort over weights"))
    with pytest.warns(UserWarning, match="b"):
        masks = global_masks(weights, 0.6, min_density=0.1)
    assert {n: int((~m).sum()) for n, m in masks.items()} == expected
    for n, w in weights.items():  # the lowest magnitudes of each layer went
        m = masks[n]
        if (~m).any() and m.any():
            assert float(w.abs()[~m].max()) <= float(w.abs()[m].min())


def test_layer_mask_removes_exactly_k_even_with_ties():
    w = torch.tensor([[0.0, 1.0, 1.0, 1.0], [1.0, 2.0, 0.0, 1.0]])
    for amount in (0.125, 0.25, 0.5, 0.75):
        m = layer_mask(w, amount)
        assert int((~m).sum()) == round(amount * 8)
        assert float(w.abs()[~m].max()) <= float(w.abs()[m].min())


# F12 — kept masks and deepcopy / pickle / torch.save


def test_kept_masks_survive_deepcopy_pickle_and_save_after_a_training_step():
    torch.manual_seed(0)
    model, x = mlp(), torch.randn(8, 16)
    nc.prune_(model, 0.5, keep_masks=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).pow(2).mean().backward()
    assert bool((model[0].weight_orig.grad != 0).any())  # gradients still reach weight_orig
    opt.step()
    # Copies right after the training step, before any no_grad forward.
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    clones = [copy.deepcopy(model), pickle.loads(pickle.dumps(model))]
    clones.append(torch.load(buf, weights_only=False))
    with torch.no_grad():
        expected = model(x)
    for clone in clones:
        with torch.no_grad():
            assert torch.equal(clone(x), expected)
        assert "0.weight_mask" in clone.state_dict()
    nc.remove_masks_(model)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# F19 — tied weights


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 2)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.out(self.b(self.a(x)))


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("keep_masks", [False, True])
def test_a_tied_weight_gets_one_random_mask(scope, keep_masks):
    torch.manual_seed(0)
    model = _Tied()
    nc.prune_(model, 0.5, method="random", scope=scope, keep_masks=keep_masks, min_density=0.0)
    assert zero_fraction(model.a.weight) == pytest.approx(0.5)
    assert torch.equal(model.a.weight, model.b.weight)
    if keep_masks:
        assert torch.equal(model.a.weight_mask, model.b.weight_mask)
        assert model.a.weight_orig is model.b.weight_orig


# F20 — arguments accepted silently or explained without the option


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"scope": "global", "min_density": -1}, ValueError, r"min_density: -1.0 is outside"),
        ({"scope": "global", "min_density": float("nan")}, ValueError, "min_density: nan"),
        ({"min_density": "abc"}, TypeError, "min_density: expected a fraction"),
        ({"layers": []}, ValueError, "layers: an empty list selects nothing"),
        ({"types": []}, ValueError, "types: an empty list selects nothing"),
        ({"layers": 42}, TypeError, "layers: expected a glob pattern"),
        ({"types": 42}, TypeError, "types: expected a layer type name"),
        ({"seed": 2**70}, ValueError, r"seed: .* is outside \[0, 2\*\*63\)"),
        ({"seed": "x"}, TypeError, "seed: expected a whole number"),
        ({"seed": 1.5}, TypeError, "seed: expected a whole number"),
        ({"amount": {0: 0.5}}, TypeError, "amount: keys are layer names or globs"),
    ],
)
def test_bad_arguments_get_one_line_naming_them_and_the_model_is_untouched(kwargs, error, match):
    model = mlp()
    saved = snapshot(model)
    amount = kwargs.pop("amount", 0.3)
    with pytest.raises(error, match=match) as err:
        nc.prune_(model, amount, **kwargs)
    assert "\n" not in str(err.value)
    assert_same_state(model, saved)
    assert nc.history(model) == []


def test_a_fraction_amount_is_taken_as_a_number():
    model = mlp()
    nc.prune_(model, Fraction(1, 2))
    assert zero_fraction(model[0].weight) == pytest.approx(0.5)
    assert nc.history(model)[-1].detail.startswith("50% l1")


# F21 — attention and recurrent weights, coverage in the report


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_real_models_prune_every_weight_matrix_run_and_undo_bit_exactly(name, scope):
    model, x = BUILDERS[name]()
    inputs = x if isinstance(x, tuple) else (x,)
    saved = snapshot(model)
    nc.prune_(model, 0.5, scope=scope)
    state = model.state_dict()
    assert list(state) == list(saved)
    matrices = [k for k in state if "proj_weight" in k or "weight_ih" in k or "weight_hh" in k]
    assert matrices and all(zero_fraction(state[k]) > 0.2 for k in matrices)
    with torch.no_grad():  # eval + no_grad: the TransformerEncoder fast path
        out = model(*inputs)
    assert torch.isfinite(out).all()
    detail = nc.history(model)[-1].detail
    assert "of parameters not pruned:" in detail and "biases/norms" in detail
    nc.undo_(model)
    assert_same_state(model, saved)


@pytest.mark.parametrize("kind", ["LSTM", "MultiheadAttention"])
def test_types_names_an_attention_or_recurrent_layer(kind):
    model, x = BUILDERS["lstm" if kind == "LSTM" else "attention"]()
    nc.prune_(model, 0.5, types=kind)
    layer = model.lstm if kind == "LSTM" else model.attn
    weights = [p for n, p in layer.named_parameters() if "weight" in n]
    assert all(zero_fraction(w) == pytest.approx(0.5, abs=0.01) for w in weights)
    with torch.no_grad():
        model(x)


def test_kept_masks_leave_attention_out_by_default_and_say_so():
    model, _ = BUILDERS["attention"]()
    nc.prune_(model, 0.5, keep_masks=True)
    assert zero_fraction(model.attn.in_proj_weight) == 0
    assert "MultiheadAttention (kept masks unsupported" in nc.history(model)[-1].detail
    with pytest.raises(ValueError, match="keep_masks: MultiheadAttention layer"):
        nc.prune_(model, 0.5, keep_masks=True, types="MultiheadAttention")


def test_the_report_states_the_share_not_pruned_and_why():
    model, _ = BUILDERS["transformer_encoder"]()
    nc.prune_(model, 0.5)
    step = nc.history(model)[-1]
    shares = step.info["not_pruned"]
    embed = model.embed.weight.numel() / sum(p.numel() for p in model.parameters())
    assert shares["embeddings (opt-in: types=['Embedding'])"] == pytest.approx(embed)
    assert f"{sum(shares.values()):.0%} of parameters not pruned" in step.detail


def test_layer_units_count_every_matrix_and_conv_transpose_output_channels():
    model, _ = BUILDERS["lstm"]()
    nc.prune_(model, 0.5, types="LSTM")
    zero, total, size = layer_units(model.lstm, "element")
    assert (
        total == size == sum(p.numel() for n, p in model.lstm.named_parameters() if "weight" in n)
    )
    assert zero == total // 2
    conv = nn.ConvTranspose2d(3, 8, 3)
    nc.prune_(nn.Sequential(conv), 0.5, granularity="channel", include_output=True)
    assert layer_units(conv, "channel")[:2] == (4, 8)
