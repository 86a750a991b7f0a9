"""remove_ and prune_(granularity="channel", remove=True): one undoable step, bad input refused."""

from __future__ import annotations

import pytest
import torch
from core_models import TinyNet, same_state, state, tiny
from torch import nn

from nbcompress.engine.core.history import history, undo_
from nbcompress.engine.prune.prune import prune_
from nbcompress.engine.structural.remove import remove_


def _params(model):
    return sum(p.numel() for p in model.parameters())


def test_remove_shrinks_keeps_outputs_and_undoes_exactly():
    model, x = tiny()
    saved, y0, before = state(model), model(x), _params(model)
    remove_(model, 0.5, example_inputs=x, round_to=4)
    y = model(x)
    assert y.shape == y0.shape and torch.isfinite(y).all()
    assert _params(model) < 0.6 * before and model.fc2.out_features == 10
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.out_channels % 4 == 0 for m in convs)
    (step,) = history(model)
    assert step.name == "remove"
    assert "params" in step.detail and "MACs" in step.detail and "optimizer" in step.detail
    undo_(model)
    assert same_state(model, saved) and torch.equal(model(x), y0)
    assert not history(model)


def test_remove_preserves_training_flags_and_requires_grad():
    model, x = tiny()
    model.train()
    model.bn.eval()
    model.stem.bias.requires_grad_(False)
    remove_(model, 0.3, example_inputs=x)
    assert model.training and not model.bn.training and model.a.training
    assert not model.stem.bias.requires_grad and model.stem.weight.requires_grad


def test_remove_does_not_update_batchnorm_statistics():
    model, x = tiny()
    model.train()
    mean = model.bn_a.running_mean.clone()
    remove_(model, 0.25, example_inputs=x)
    undo_(model)
    assert torch.equal(model.bn_a.running_mean, mean)


def test_fine_tuning_after_removal_with_a_fresh_optimizer():
    model, x = tiny()
    model.train()
    old = {id(p) for p in model.parameters()}
    remove_(model, 0.5, example_inputs=x)
    # Shrunk weights are new objects (an optimizer built before holds the old ones).
    assert id(model.stem.weight) not in old and id(model.fc1.weight) not in old
    target = torch.randint(0, 10, (x.shape[0],))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad is not None for p in model.parameters())
    assert losses[-1] < 0.5 * losses[0]


def test_prune_delegates_channel_removal():
    model, x = tiny()
    twin, _ = tiny()
    prune_(model, 0.5, granularity="channel", remove=True, example_inputs=x, round_to=4)
    remove_(twin, 0.5, example_inputs=x, round_to=4)
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in twin.state_dict().items()
    }
    assert history(model)[-1].name == "remove"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(granularity="element", remove=True), "granularity: 'element' does not go with"),
        (dict(granularity="channel", round_to=8), "round_to: applies to physical removal"),
        (dict(granularity="channel", remove=True, scope="global"), "scope"),
        (dict(granularity="channel", remove=True, method="random"), "method"),
    ],
)
def test_prune_refuses_removal_options_that_do_not_fit(kwargs, match):
    model, x = tiny()
    saved = state(model)
    with pytest.raises(ValueError, match=match):
        prune_(model, 0.5, example_inputs=x, **kwargs)
    assert same_state(model, saved) and not history(model)


class _Strict(TinyNet):
    """Checks a width in its forward: removal makes it fail afterwards."""

    def forward(self, x):
        if self.stem.out_channels != 16:
            raise RuntimeError("this model insists on 16 stem channels")
        return super().forward(x)


def _bad_cases():
    x = torch.randn(2, 3, 16, 16)
    return [
        ("no input", TinyNet(), dict(amount=0.5), r"example_inputs: .*--input"),
        ("ratio 1.0", TinyNet(), dict(amount=1.0, example_inputs=x), r"amount: 1\.0"),
        ("zero", TinyNet(), dict(amount=0.0, example_inputs=x), "amount: 0 removes nothing"),
        (
            "wrong input",
            TinyNet(),
            dict(amount=0.5, example_inputs=torch.randn(2, 5, 16, 16)),
            r"example_inputs: the model failed on the example input",
        ),
        ("layers", TinyNet(), dict(amount=0.5, example_inputs=x, layers="nope*"), "layers:"),
        ("ignore", TinyNet(), dict(amount=0.5, example_inputs=x, ignore="nope"), "ignore:"),
        ("dict key", TinyNet(), dict(amount={"nope": 0.5}, example_inputs=x), "amount: key"),
        ("round_to", TinyNet(), dict(amount=0.5, example_inputs=x, round_to=0), "round_to:"),
        ("forward", _Strict(), dict(amount=0.5, example_inputs=x), "forward fails after"),
    ]


@pytest.mark.parametrize(("label", "model", "kwargs", "match"), _bad_cases())
def test_bad_input_is_one_line_and_leaves_the_model_exact(label, model, kwargs, match):
    model.eval()
    saved = state(model)
    with pytest.raises(ValueError, match=match) as info:
        remove_(model, **kwargs)
    assert "\n" not in str(info.value), label
    assert same_state(model, saved) and not history(model)


class _Runaway(nn.Module):
    """Fine in the user's forward; allocates without bound when traced (grad enabled)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        if torch.is_grad_enabled():
            hog = []
            while True:
                hog.append(bytearray(16 << 20))
        return self.fc(self.conv(x).mean((2, 3)))


def test_memory_runaway_in_the_graph_build_is_refused_cleanly():
    model = _Runaway().eval()
    saved = state(model)
    with pytest.raises(ValueError, match=r"more than .* memory.*ignore=") as info:
        remove_(model, 0.5, example_inputs=torch.randn(1, 3, 8, 8), memory=200 << 20)
    assert "\n" not in str(info.value)
    assert same_state(model, saved) and not history(model)
