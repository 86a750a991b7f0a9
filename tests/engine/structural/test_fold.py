"""fold_constants: removing channels that carry a constant leaves the output unchanged."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from nbcompress.engine.core.history import transaction, undo_
from nbcompress.engine.structural.fold import fold_constants


def _shrink(model: nn.Module, plan: dict) -> None:
    """Remove the planned channels by slicing (what apply_plan does, for these layer types)."""
    for (name, handler), idxs in plan.items():
        m = model.get_submodule(name)
        dim0 = next(iter(p for p in [m.weight] if p is not None))
        size = dim0.shape[0] if handler == "out" else dim0.shape[1]
        keep = torch.tensor([i for i in range(size) if i not in idxs])
        with torch.no_grad():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight = nn.Parameter(m.weight[keep])
                m.bias = nn.Parameter(m.bias[keep])
                m.running_mean = m.running_mean[keep]
                m.running_var = m.running_var[keep]
                m.num_features = len(keep)
            elif handler == "out":
                m.weight = nn.Parameter(m.weight[keep])
                if m.bias is not None:
                    m.bias = nn.Parameter(m.bias[keep])
            else:
                per_in = m.weight.shape[1]
                if getattr(m, "groups", 1) > 1:  # the same local channels go in every group
                    keep = torch.tensor([i for i in range(per_in) if i not in idxs])
                m.weight = nn.Parameter(m.weight[:, keep])


def _randomize_bn(bn: nn.modules.batchnorm._BatchNorm) -> None:
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(0.5, 2.0)  # positive after ReLU in eval and in training mode
        bn.running_mean.uniform_(-1.0, 0.0)
        bn.running_var.uniform_(0.5, 2.0)


def _zero_out(layer: nn.Module, idxs: list[int]) -> None:
    with torch.no_grad():
        layer.weight[idxs] = 0
        if layer.bias is not None:
            layer.bias[idxs] = 0


def _conv_model(k2: int = 1, pad2: int = 0, groups2: int = 1, bias2: bool = True) -> nn.Sequential:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, k2, padding=pad2, groups=groups2, bias=bias2),
    )
    _randomize_bn(model[1])
    return model.eval()


def _linear_model(bias2: bool = False) -> nn.Sequential:
    model = nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3, bias=bias2)
    )
    _randomize_bn(model[1])
    return model.eval()


def _plan(idxs: list[int], producer: str = "0", bn: str = "1", consumer: str = "3") -> dict:
    s = frozenset(idxs)
    return {(producer, "out"): s, (bn, "out"): s, (consumer, "in"): s}


def _max_delta(note: str) -> float:
    return float(re.search(r"max \|Δ\| ([0-9]+(\.[0-9]+)?(e[+-]?[0-9]+)?)", note).group(1))


@pytest.mark.parametrize(
    ("build", "x", "removed"),
    [
        (lambda: _conv_model(), torch.randn(4, 3, 6, 6), [1, 4, 6]),
        (lambda: _conv_model(k2=3, pad2=0), torch.randn(4, 3, 6, 6), [1, 4, 6]),
        (lambda: _conv_model(groups2=2), torch.randn(4, 3, 6, 6), [1, 5]),
        (lambda: _linear_model(), torch.randn(6, 5), [1, 4, 6]),
        (lambda: _linear_model(bias2=True), torch.randn(6, 5), [1, 4, 6]),
    ],
    ids=["conv1x1", "conv3x3-unpadded", "conv1x1-groups2", "linear-no-bias", "linear"],
)
def test_removing_zeroed_channels_after_folding_leaves_the_output_unchanged(
    build, x, removed
) -> None:
    model = build()
    _zero_out(model[0], removed)
    before = model(x)
    plan = _plan(removed)
    with transaction(model, "remove") as tx:
        notes = fold_constants(model, plan, x, tx)
        _shrink(model, plan)
    assert any("folded the constant values of" in n for n in notes), notes
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_without_folding_the_same_removal_changes_the_output() -> None:
    # The premise: a zeroed channel followed by BatchNorm is not silent.
    model = _conv_model()
    _zero_out(model[0], [1, 4, 6])
    x = torch.randn(4, 3, 6, 6)
    before = model(x)
    _shrink(model, _plan([1, 4, 6]))
    assert (model(x) - before).abs().max() > 1e-2


def test_a_created_bias_is_recorded_in_the_note() -> None:
    model = _linear_model(bias2=False)
    _zero_out(model[0], [0, 2])
    with transaction(model, "remove") as tx:
        notes = fold_constants(model, _plan([0, 2]), torch.randn(6, 5), tx)
    assert model[3].bias is not None and model[3].bias.abs().sum() > 0
    assert "created a bias for 3" in notes[0]


def test_a_padded_3x3_consumer_is_not_folded_and_its_change_is_measured() -> None:
    model = _conv_model(k2=3, pad2=1)
    removed = [1, 4, 6]
    _zero_out(model[0], removed)
    x = torch.randn(4, 3, 6, 6)
    bias = model[3].bias.detach().clone()
    before = model(x)
    with transaction(model, "remove") as tx:
        notes = fold_constants(model, _plan(removed), x, tx)
    assert torch.equal(model[3].bias, bias)
    [note] = [n for n in notes if n.startswith("3:")]
    assert "zero-padded" in note and "\n" not in note
    # Zeroing at the consumer is exactly the removal for a conv: the note's figure is real.
    _shrink(model, _plan(removed))
    actual = float((model(x) - before).abs().max().detach())
    assert _max_delta(note) > 1e-2
    assert _max_delta(note) == pytest.approx(actual, rel=5e-3)  # 3 digits shown


def test_a_varying_channel_is_not_folded() -> None:
    model = _conv_model()
    x = torch.randn(4, 3, 6, 6)  # nothing zeroed: every channel carries a signal
    bias = model[3].bias.detach().clone()
    with transaction(model, "remove") as tx:
        notes = fold_constants(model, _plan([2, 5]), x, tx)
    assert torch.equal(model[3].bias, bias)
    assert not any("folded" in n for n in notes)
    [note] = notes
    assert "2 removed channel(s) feeding 3 carry a varying signal" in note
    assert _max_delta(note) > 0


def test_one_value_per_channel_is_too_few_to_fold() -> None:
    model = _linear_model(bias2=True)
    _zero_out(model[0], [1])
    with transaction(model, "remove") as tx:
        notes = fold_constants(model, _plan([1]), torch.randn(1, 5), tx)
    assert not any("folded" in n for n in notes)
    assert "at least 2 examples" in notes[0]


def test_a_layernorm_consumer_gets_a_measured_note() -> None:
    model = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Linear(8, 3)).eval()
    _zero_out(model[0], [3])
    plan = {("0", "out"): frozenset({3}), ("1", "out"): frozenset({3}), ("2", "in"): {3}}
    with transaction(model, "remove") as tx:
        notes = fold_constants(model, plan, torch.randn(6, 5), tx)
    [note] = [n for n in notes if "normalise over the kept channels" in n]
    assert note.startswith("1:") and _max_delta(note) > 0


def test_rollback_restores_bit_exactly_with_parameter_identity() -> None:
    model = _linear_model(bias2=False)
    model2 = _conv_model()
    for m, x in ((model, torch.randn(6, 5)), (model2, torch.randn(2, 3, 5, 5))):
        _zero_out(m[0], [1, 4])
        state = {k: v.clone() for k, v in m.state_dict().items()}
        params = dict(m.named_parameters())
        with pytest.raises(RuntimeError, match="boom"), transaction(m, "remove") as tx:
            assert fold_constants(m, _plan([1, 4]), x, tx)
            raise RuntimeError("boom")
        assert dict(m.named_parameters()) == params  # same objects, no created bias
        assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
        assert m.state_dict().keys() == state.keys()


def test_undo_restores_the_bias_bit_exactly() -> None:
    model = _conv_model()
    _zero_out(model[0], [0, 7])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    bias = model[3].bias
    with transaction(model, "remove") as tx:
        fold_constants(model, _plan([0, 7]), torch.randn(2, 3, 5, 5), tx)
    assert not torch.equal(model[3].bias, state["3.bias"])
    undo_(model)
    assert model[3].bias is bias
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_training_mode_flags_and_running_statistics_are_left_alone() -> None:
    model = _conv_model().train()
    model[2].eval()  # a mixed state must survive too
    _zero_out(model[0], [1, 4])
    x = torch.randn(4, 3, 6, 6)
    before = model(x)
    stats = model[1].running_mean.clone(), model[1].num_batches_tracked.clone()
    flags = [m.training for m in model.modules()]
    with transaction(model, "remove") as tx:
        assert "folded" in fold_constants(model, _plan([1, 4]), x, tx)[0]
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(model[1].running_mean, stats[0])
    assert torch.equal(model[1].num_batches_tracked, stats[1])
    # In training mode BatchNorm uses batch statistics: a zeroed channel carries its shift.
    _shrink(model, _plan([1, 4]))
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_a_plan_without_input_cuts_runs_nothing() -> None:
    model = _conv_model()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    with transaction(model, "remove") as tx:
        assert (
            fold_constants(model, {("0", "out"): frozenset({1})}, torch.randn(1, 3, 4, 4), tx) == []
        )
    assert calls == []


def test_a_channel_that_is_zero_at_the_consumer_needs_nothing() -> None:
    model = _conv_model()
    with torch.no_grad():
        model[1].bias[[1, 4]] = -5.0  # ReLU turns the BatchNorm shift into exact zeros
    _zero_out(model[0], [1, 4])
    bias = model[3].bias.detach().clone()
    with transaction(model, "remove") as tx:
        assert fold_constants(model, _plan([1, 4]), torch.randn(2, 3, 5, 5), tx) == []
    assert torch.equal(model[3].bias, bias)


class _Attention(nn.Sequential):
    """A Linear into self-attention: query, key and value are one tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self[0](x)
        return self[1](h, h, h, need_weights=False)[0]


def test_attention_inputs_are_measured_not_folded() -> None:
    model = _Attention(nn.Linear(5, 8), nn.MultiheadAttention(8, 2, batch_first=True)).eval()
    lin, mha = model
    with torch.no_grad():
        lin.weight[1] = 0
        lin.bias[1] = 2.0  # a constant channel entering the attention
    in_proj = mha.in_proj_bias.detach().clone()
    plan = {("0", "out"): frozenset({1, 5}), ("1", "out"): frozenset({1, 5})}
    with transaction(model, "remove") as tx:
        notes = fold_constants(model, plan, torch.randn(3, 4, 5), tx)
    assert torch.equal(mha.in_proj_bias, in_proj)
    [stuck] = [n for n in notes if n.startswith("1: 1 removed input channel(s) carry a constant")]
    assert "attention" in stuck and _max_delta(stuck) > 0
    [varying] = [n for n in notes if "varying" in n]
    assert "1 removed channel(s) feeding 1 carry" in varying and _max_delta(varying) > 0


def test_a_depthwise_consumer_whose_outputs_go_too_needs_nothing() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8)
    ).eval()
    _randomize_bn(model[1])
    _zero_out(model[0], [2, 5])
    s = frozenset({2, 5})
    plan = {**_plan([2, 5]), ("3", "out"): s}  # its inputs and its outputs 2 and 5 go
    with transaction(model, "remove") as tx:
        assert fold_constants(model, plan, torch.randn(2, 3, 5, 5), tx) == []
    # Only the outputs kept: the padded depthwise conv reads the constant, so it is reported.
    with transaction(model, "remove") as tx:
        notes = fold_constants(model, _plan([2, 5]), torch.randn(2, 3, 5, 5), tx)
    assert notes and "zero-padded" in notes[0]


def test_unhandled_and_unseen_consumers_are_named() -> None:
    class Branches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(5, 8)
            self.rnn = nn.GRU(8, 4, batch_first=True)
            self.unused = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.rnn(self.lin(x))[0]

    model = Branches().eval()
    s = frozenset({1})
    plan = {("lin", "out"): s, ("rnn", "in"): s, ("unused", "in"): s}
    with transaction(model, "remove") as tx:
        notes = fold_constants(model, plan, torch.randn(2, 3, 5), tx)
    assert any(n.startswith("rnn: removed input channels of GRU are not checked") for n in notes)
    assert any(n.startswith("unused: not run by the example inputs") for n in notes)
