import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nbcompress.engine.schedule.regularize import L1Penalty, l1_penalty
from tests.helpers import cnn, mlp


def test_l1_penalty_is_weight_times_sum_of_abs_and_leaves_the_output_layer_alone():
    model = mlp()
    expected = 0.5 * (model[0].weight.abs().sum() + model[2].weight.abs().sum())
    assert torch.allclose(l1_penalty(model, 0.5), expected)
    every = l1_penalty(model, 1.0, layers=["0", "2", "4"])  # named literally: taken as intent
    assert torch.allclose(every, sum(model[i].weight.abs().sum() for i in (0, 2, 4)))


def test_l1_gradient_is_weight_times_sign_and_biases_get_none():
    model = mlp()
    l1_penalty(model, 0.25).backward()
    for i in (0, 2):
        assert torch.equal(model[i].weight.grad, 0.25 * torch.sign(model[i].weight.detach()))
        assert model[i].bias.grad is None
    assert model[4].weight.grad is None


@pytest.mark.parametrize("group", [False, True])
def test_the_penalty_reaches_weights_under_kept_masks_after_a_forward_pass(group):
    # Kept masks leave a detached copy of weight_orig · mask on the module after each forward
    # pass; a penalty on that copy would silently have no gradient (gradual pruning + L1).
    from nbcompress import GradualPruner, PolynomialDecay, prune_

    for keep in ("prune_", "gradual"):
        model = mlp()
        if keep == "prune_":
            prune_(model, 0.5, keep_masks=True)
        else:
            pruner = GradualPruner(model, PolynomialDecay(0.5, 0.6, 0, 2, frequency=1))
            pruner.step()
        model(torch.randn(4, 16))
        l1_penalty(model, 0.25, group=group).backward()
        orig, mask = model[0].weight_orig, model[0].weight_mask
        assert orig.grad is not None, keep
        if group:
            live = orig.detach() * mask
            rows = live / torch.linalg.vector_norm(live, dim=1, keepdim=True)
            assert torch.allclose(orig.grad, 0.25 * rows * mask), keep
        else:
            assert torch.equal(orig.grad, 0.25 * torch.sign(orig.detach() * mask) * mask), keep


def test_group_lasso_sums_row_norms_and_its_gradient_is_the_unit_row():
    model = mlp()
    w = model[0].weight
    with torch.no_grad():
        w[3] = 0  # a row already at zero gets a zero (not NaN) gradient
    l1_penalty(model, 2.0, layers="0", group=True).backward()
    norms = w.detach().norm(dim=1)
    assert torch.allclose(l1_penalty(model, 2.0, layers="0", group=True), 2 * norms.sum())
    unit = w.detach() / norms.clamp_min(1e-30)[:, None]
    assert torch.allclose(w.grad, 2 * unit)
    assert torch.equal(w.grad[3], torch.zeros(16))


def test_group_lasso_groups_output_channels_of_convs_and_transposed_convs():
    conv = cnn()
    w = conv[0].weight.detach()
    got = l1_penalty(conv, 1.0, layers="0", group=True)
    assert torch.allclose(got, w.reshape(8, -1).norm(dim=1).sum())
    model = nn.Sequential(nn.ConvTranspose2d(3, 5, 2), nn.Conv2d(5, 2, 1))
    w = model[0].weight.detach()  # (in=3, out=5, 2, 2)
    got = l1_penalty(model, 1.0, layers="0", group=True)
    assert torch.allclose(got, w.transpose(0, 1).reshape(5, -1).norm(dim=1).sum())
    # Grouped: output channel g·4 + j is column j of group g's rows (4 outputs per group).
    grouped = nn.Sequential(nn.ConvTranspose2d(4, 8, 3, groups=2), nn.Conv2d(8, 2, 1))
    w = grouped[0].weight.detach()  # (in=4, out/groups=4, 3, 3)
    channels = [w[2 * g : 2 * g + 2, j] for g in range(2) for j in range(4)]
    expected = sum(c.norm() for c in channels)
    assert torch.allclose(l1_penalty(grouped, 1.0, layers="0", group=True), expected)


def test_scheduled_weight_is_read_at_the_step():
    model = mlp()
    base = l1_penalty(model, 1.0)
    assert torch.allclose(l1_penalty(model, lambda s: 1e-3 * s, step=10), 1e-2 * base)
    # A TF-MOT-style schedule returns (update_now, value).
    assert torch.allclose(l1_penalty(model, lambda s: (True, 0.5), step=3), 0.5 * base)
    penalty = L1Penalty(model, lambda s: 2.0)
    assert penalty.layers == ["0", "2"]
    assert torch.allclose(penalty(0), 2 * base)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"weight": -1e-4}, r"^weight: -0\.0001 is not a finite number >= 0.*e\.g\. 1e-4"),
        ({"weight": float("nan")}, r"^weight: nan is not a finite number"),
        ({"weight": 1e-4, "layers": "nope.*"}, r"^layers: pattern 'nope\.\*' matches no layer"),
        ({"weight": lambda s: -1.0, "step": 5}, r"^weight: -1\.0 \(the schedule's value at step 5"),
        ({"weight": lambda s: 1.0}, r"^step: the penalty weight is a schedule; pass the"),
    ],
)
def test_bad_input_is_one_line_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        l1_penalty(mlp(), **kwargs)
    assert "\n" not in str(info.value)


def test_weight_of_the_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match=r"^weight: expected a number >= 0 such as 1e-4"):
        l1_penalty(mlp(), "1e-4")


def _train(l1: float, group: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    model = mlp()
    x = torch.randn(256, 16)
    y = (x[:, :4].argmax(1)).long()  # only 4 of the 16 inputs matter
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if l1:
            loss = loss + l1_penalty(model, l1, group=group)
        loss.backward()
        opt.step()
    return model


def test_training_with_l1_leaves_more_weights_near_zero():
    def near_zero(model):
        w = torch.cat([model[i].weight.detach().flatten() for i in (0, 2)])
        return float((w.abs() < 1e-2).float().mean())

    plain, l1 = near_zero(_train(0.0)), near_zero(_train(1e-2))
    assert l1 > plain + 0.3, (plain, l1)


def test_training_with_group_lasso_leaves_more_rows_near_zero():
    def small_rows(model):
        return int((model[0].weight.detach().norm(dim=1) < 0.05).sum())

    assert small_rows(_train(0.05, group=True)) > small_rows(_train(0.0)) + 10
