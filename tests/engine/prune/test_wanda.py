"""Wanda importance, calibration statistics and least-squares reconstruction."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nbcompress as nc
from nbcompress.engine.prune.calibrate import (
    calibration_inputs,
    collect_stats,
    forward_order,
    im2col_sq_norms,
)
from nbcompress.engine.prune.prune import prune_, prune_ratios_
from nbcompress.engine.prune.reconstruct import reconstruct_rows
from nbcompress.engine.prune.wanda import wanda_mask
from tests.helpers import assert_same_state, mlp, snapshot


def scaled_inputs(n: int = 64, features: int = 16, seed: int = 0) -> torch.Tensor:
    """Inputs whose first half of features is 1000× larger than the second half."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.cat([torch.full((features // 2,), 1000.0), torch.ones(features // 2)])
    return torch.randn(n, features, generator=g) * scale


def test_wanda_keeps_small_weights_on_large_inputs_where_l1_drops_them():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8, bias=False)
    with torch.no_grad():
        # Small weights on the loud inputs, large weights on the quiet ones.
        layer.weight[:, :8] = 0.01 * torch.randn(8, 8).sign()
        layer.weight[:, 8:] = torch.randn(8, 8).sign()
    x = scaled_inputs()
    l1 = nn.Sequential(layer)
    wanda = nn.Sequential(nn.Linear(16, 8, bias=False))
    wanda[0].weight.data.copy_(layer.weight.data)
    prune_(l1, 0.5, include_output=True)
    prune_(wanda, 0.5, method="wanda", example_inputs=x, include_output=True)
    assert (l1[0].weight[:, :8] == 0).all() and (l1[0].weight[:, 8:] != 0).all()
    assert (wanda[0].weight[:, :8] != 0).all() and (wanda[0].weight[:, 8:] == 0).all()


def test_element_wanda_gives_every_row_the_same_sparsity_existing_zeros_counted():
    torch.manual_seed(1)
    model = mlp()
    with torch.no_grad():
        model[0].weight[0, :10] = 0  # row 0 already 10/16 sparse
    prune_(model, 0.5, method="wanda", example_inputs=torch.randn(32, 16))
    zeros = (model[0].weight == 0).sum(1)
    assert zeros[0] == 10  # more than its share already: nothing revived, nothing more cut
    assert (zeros[1:] == 8).all()
    assert ((model[2].weight == 0).sum(1) == 16).all()


def stats_of(layer: nn.Module, x: torch.Tensor):
    return collect_stats(layer, [(x,)], {"l": layer}).layers["l"]


@pytest.mark.parametrize("granularity", ["block", "channel"])
def test_block_and_channel_wanda_rank_summed_scores(granularity):
    torch.manual_seed(2)
    layer = nn.Linear(6, 8, bias=False)
    x = torch.randn(40, 6) * torch.tensor([5.0, 1, 1, 1, 1, 0.1])
    stats = stats_of(layer, x)
    mask = wanda_mask(layer.weight.detach(), 0.5, stats, granularity)
    s = layer.weight.detach().abs() * stats.norms()[0]
    if granularity == "channel":
        expect = s.sum(1).argsort()[:4]
        assert (~mask[expect]).all() and mask.sum() == 4 * 6
    else:
        blocks = s.reshape(2, 4, 6).sum(1).reshape(-1)  # (block, input) units
        expect = torch.zeros(12, dtype=torch.bool)
        expect[blocks.argsort()[6:]] = True
        assert torch.equal(mask.reshape(2, 4, 6)[:, 0].reshape(-1), expect)
        assert torch.equal(mask, mask.reshape(2, 4, 6)[:, :1].expand(2, 4, 6).reshape(8, 6))


@pytest.mark.parametrize(
    "conv, shape",
    [
        (nn.Conv2d(4, 6, 3, stride=2, padding=1), (2, 4, 9, 9)),
        (
            nn.Conv2d(4, 8, (3, 2), stride=(1, 2), padding=(2, 1), dilation=2, groups=2),
            (2, 4, 10, 9),
        ),
        (nn.Conv2d(3, 3, 3, padding=1, groups=3, padding_mode="reflect"), (1, 3, 7, 7)),
        (nn.Conv1d(3, 5, 3, padding=1, stride=2), (2, 3, 11)),
    ],
)
def test_conv_input_norms_are_the_im2col_column_norms(conv, shape):
    torch.manual_seed(3)
    x = torch.randn(shape)
    xp = F.pad(
        x,
        conv._reversed_padding_repeated_twice,
        "constant" if conv.padding_mode == "zeros" else conv.padding_mode,
    )
    if xp.dim() == 3:
        cols = F.unfold(
            xp.unsqueeze(2),
            (1, *conv.kernel_size),
            dilation=(1, *conv.dilation),
            stride=(1, *conv.stride),
        )
    else:
        cols = F.unfold(xp, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    brute = cols.double().square().sum((0, 2)).reshape(conv.groups, -1)
    assert torch.allclose(im2col_sq_norms(conv, x), brute)
    stats = collect_stats(conv, [(x,)], {"c": conv}, gram=True).layers["c"]
    assert torch.allclose(stats.sq, brute)
    assert torch.allclose(torch.diagonal(stats.gram, dim1=1, dim2=2), brute)
    # Each output of the conv is its weight row times an im2col column.
    w = conv.weight.detach().reshape(conv.groups, conv.out_channels // conv.groups, -1)
    c = cols.reshape(shape[0], conv.groups, -1, cols.shape[-1])
    out = torch.einsum("god,ngdl->ngol", w, c).reshape(shape[0], conv.out_channels, -1)
    assert torch.allclose(out + conv.bias[:, None], conv(x).flatten(2), atol=1e-5)


def test_reconstruction_is_the_least_squares_solution():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, 8, generator=g, dtype=torch.float64)
    w = torch.randn(5, 8, generator=g, dtype=torch.float64)
    keep = torch.rand(5, 8, generator=g) > 0.5
    gram = (x.T @ x).unsqueeze(0)
    exact = reconstruct_rows(w, keep, gram, damping=0.0)
    lam = 0.01 * torch.diagonal(gram[0]).mean()
    damped = reconstruct_rows(w, keep, gram)
    for r in range(5):
        s = keep[r]
        sol = torch.linalg.lstsq(x[:, s], x @ w[r]).solution
        assert torch.allclose(exact[r, s], sol, rtol=1e-4, atol=1e-5)
        # Damped: least squares on inputs stacked with sqrt(λ)·I, pulled to the old weights.
        a = torch.cat([x[:, s], lam.sqrt() * torch.eye(int(s.sum()), dtype=torch.float64)])
        b = torch.cat([x @ w[r], lam.sqrt() * w[r, s]])
        assert torch.allclose(damped[r, s], torch.linalg.lstsq(a, b).solution, rtol=1e-4, atol=1e-5)
        assert (exact[r, ~s] == 0).all()


def output_error(model: nn.Module, dense: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x) - dense(x)).norm())


@pytest.mark.parametrize("method", ["l1", "wanda"])
def test_reconstruct_reduces_the_output_error_of_the_masked_model(method):
    torch.manual_seed(5)
    dense = mlp()
    # Correlated inputs: what a pruned weight carried, its kept neighbours can carry.
    x = torch.randn(128, 4) @ torch.randn(4, 16) + 0.1 * torch.randn(128, 16)
    masked, refit = mlp(), mlp()
    masked.load_state_dict(dense.state_dict())
    refit.load_state_dict(dense.state_dict())
    prune_(masked, 0.7, method=method, example_inputs=x)
    prune_(refit, 0.7, method=method, example_inputs=x, reconstruct=True)
    # The first layer: the same mask (measured on the same inputs), re-fitted values.
    assert torch.equal(masked[0].weight == 0, refit[0].weight == 0)
    assert not torch.equal(masked[0].weight, refit[0].weight)
    if method == "l1":  # wanda measures later layers on re-fitted inputs: other masks
        assert all(
            torch.equal(a == 0, b == 0) for a, b in zip(masked.parameters(), refit.parameters())
        )
    assert output_error(refit, dense, x) < output_error(masked, dense, x)
    with torch.no_grad():
        first = dense[0](x)
        assert (refit[0](x) - first).norm() < 0.9 * (masked[0](x) - first).norm()


def test_reconstruct_measures_each_layer_after_the_earlier_ones_were_refitted(monkeypatch):
    from nbcompress.engine.prune import step

    torch.manual_seed(6)
    model = mlp()
    x = torch.randn(64, 16)
    seen = []
    real = step.reconstruct_rows

    def spy(weight, keep, gram, *args):
        seen.append(gram.clone())
        return real(weight, keep, gram, *args)

    monkeypatch.setattr(step, "reconstruct_rows", spy)
    # Layers named in reverse order: still processed in forward order.
    prune_ratios_(model, {"2": 0.6, "0": 0.6}, example_inputs=x, reconstruct=True)
    with torch.no_grad():
        h = torch.relu(model[0](x))  # model[0] is already pruned and re-fitted
    assert torch.allclose(seen[1][0], (h.T @ h).double(), rtol=1e-4)
    assert seen[0].shape == (1, 16, 16)


def test_forward_order_and_uncalled_layers():
    model = nn.ModuleDict(dict(b=nn.Linear(4, 4), a=nn.Linear(4, 4), unused=nn.Linear(4, 4)))
    model.forward = lambda x: model["a"](model["b"](x))
    order, calls = forward_order(model, (torch.randn(2, 4),), dict(model.items()))
    assert order == ["b", "a", "unused"] and calls == dict(b=1, a=1, unused=0)


def test_layers_wanda_cannot_score_fall_back_to_l1_with_a_note():
    model = nn.Sequential(nn.Linear(8, 8), nn.GRU(8, 8, batch_first=True))
    seq = nn.Sequential(model[0])
    x = torch.randn(4, 3, 8)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.rnn, self.head = (
                nn.Linear(8, 8),
                nn.GRU(8, 8, batch_first=True),
                nn.Linear(8, 2),
            )

        def forward(self, x):
            return self.head(self.rnn(self.fc(x))[0])

    net = Net()
    del model, seq
    prune_(net, 0.5, method="wanda", example_inputs=x, reconstruct=True)
    step = nc.history(net)[-1]
    assert "wanda: scored by L1 instead for rnn.weight_ih_l0" in step.detail
    assert "the inputs of GRU layers are not measured" in step.detail
    assert "reconstruct: not re-fitted" in step.detail
    assert (net.rnn.weight_ih_l0 == 0).float().mean() == 0.5


def test_channel_reconstruct_says_it_refits_nothing():
    model = mlp()
    prune_(model, 0.5, granularity="channel", example_inputs=torch.randn(8, 16), reconstruct=True)
    assert "nothing to re-fit" in nc.history(model)[-1].detail


def test_wanda_with_global_scope_is_refused_in_one_line():
    model = mlp()
    saved = snapshot(model)
    with pytest.raises(ValueError, match=r"^scope: method='wanda' compares .* scope='layer'"):
        prune_(model, 0.5, method="wanda", scope="global", example_inputs=torch.randn(4, 16))
    assert_same_state(model, saved)


@pytest.mark.parametrize("kwargs", [dict(method="wanda"), dict(reconstruct=True)])
def test_missing_calibration_inputs_name_the_argument_and_leave_the_model(kwargs):
    model = mlp()
    saved = snapshot(model)
    with pytest.raises(ValueError, match=r"^example_inputs: .* needs calibration inputs: pass "):
        prune_(model, 0.5, **kwargs)
    assert_same_state(model, saved)
    assert nc.history(model) == []


@pytest.mark.parametrize("reconstruct", [False, True])
def test_wrong_shape_calibration_input_is_one_line_and_the_model_is_untouched(reconstruct):
    model = mlp()
    saved = snapshot(model)
    with pytest.raises(ValueError, match=r"^example_inputs: the model failed on the example"):
        prune_(
            model, 0.5, method="wanda", example_inputs=torch.randn(4, 7), reconstruct=reconstruct
        )
    assert_same_state(model, saved)
    assert nc.history(model) == []


def test_a_failing_solve_part_way_rolls_everything_back(monkeypatch):
    from nbcompress.engine.prune import step

    model = mlp()
    saved = snapshot(model)
    calls = []

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("reconstruct: boom")
        return reconstruct_rows(*args, **kwargs)

    monkeypatch.setattr(step, "reconstruct_rows", second_fails)
    with pytest.raises(ValueError, match="boom"):
        prune_(model, 0.5, method="wanda", example_inputs=torch.randn(8, 16), reconstruct=True)
    assert_same_state(model, saved)
    assert nc.history(model) == []


def test_undo_restores_a_reconstructed_step_bit_exactly():
    model = mlp()
    saved = snapshot(model)
    prune_(model, 0.6, method="wanda", example_inputs=torch.randn(32, 16), reconstruct=True)
    assert "wanda + reconstruct" in nc.history(model)[-1].detail
    nc.undo_(model)
    assert_same_state(model, saved)


def test_a_loader_of_pairs_calibrates_like_the_concatenated_batch():
    torch.manual_seed(7)
    x = torch.randn(48, 16)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(48)), 16)
    assert len(calibration_inputs(loader)) == 3
    one, many = mlp(), mlp()
    many.load_state_dict(one.state_dict())
    prune_(one, 0.5, method="wanda", example_inputs=x, reconstruct=True)
    prune_(many, 0.5, method="wanda", example_inputs=loader, reconstruct=True)
    for a, b in zip(one.parameters(), many.parameters()):
        assert torch.equal(a == 0, b == 0)
        assert torch.allclose(a, b, atol=1e-5)


def test_calibration_inputs_refuse_what_is_not_an_input():
    with pytest.raises(TypeError, match=r"^example_inputs: expected calibration inputs, got int"):
        calibration_inputs(3)
    with pytest.raises(ValueError, match=r"^example_inputs: the calibration data holds no batch"):
        calibration_inputs([])


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_reconstruct_lowers_the_layer_output_error_with_the_same_mask(groups):
    torch.manual_seed(8)
    conv = nn.Conv2d(4, 8, 3, padding=1, groups=groups)
    x = torch.randn(16, 1, 8, 8).expand(16, 4, 8, 8) + 0.1 * torch.randn(16, 4, 8, 8)
    masked, refit = nn.Sequential(conv), __import__("copy").deepcopy(nn.Sequential(conv))
    with torch.no_grad():
        ref = conv(x).clone()
    prune_(masked, 0.5, method="wanda", example_inputs=x, include_output=True)
    prune_(refit, 0.5, method="wanda", example_inputs=x, include_output=True, reconstruct=True)
    assert torch.equal(masked[0].weight == 0, refit[0].weight == 0)
    assert ((refit[0].weight == 0).reshape(8, -1).sum(1) == 18 // groups).all()
    with torch.no_grad():
        assert (refit(x) - ref).norm() < 0.9 * (masked(x) - ref).norm()


def test_reconstruct_with_kept_masks_refits_the_original_and_keeps_the_mask():
    torch.manual_seed(9)
    model, twin = mlp(), mlp()
    twin.load_state_dict(model.state_dict())
    before = snapshot(model)
    x = torch.randn(64, 4) @ torch.randn(4, 16)
    prune_(model, 0.5, example_inputs=x, reconstruct=True, keep_masks=True)
    prune_(twin, 0.5, example_inputs=x, reconstruct=True)
    layer = model[0]
    assert torch.equal(layer.weight, layer.weight_orig * layer.weight_mask)
    assert torch.equal(layer.weight, twin[0].weight)  # the same re-fit as without masks
    nc.undo_(model)
    assert_same_state(model, before)
