"""The sensitivity sweep: curves, bit-exact restore, failures, interrupts, bad input."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nbcompress as nc
from nbcompress import zoo
from nbcompress.engine.core.history import trial
from nbcompress.engine.sensitivity.evaluate import EvaluationError
from nbcompress.engine.sensitivity.registry import latest
from tests.helpers import assert_same_state, cnn, mlp, snapshot, zero_fraction

RATIOS = [0.3, 0.6, 0.9]


@pytest.fixture(scope="module")
def digits():
    return zoo.load_digits(8)


@pytest.fixture(scope="module")
def trained_state(digits):
    torch.manual_seed(0)
    model = zoo.LeNet300()
    zoo.train(model, digits.x_train, digits.y_train, epochs=8, lr=3e-3)
    return snapshot(model)


@pytest.fixture
def lenet(trained_state):
    model = zoo.LeNet300()
    model.load_state_dict(trained_state)
    return model.eval()


@pytest.fixture
def evaluate(digits):
    x, y = digits.x_test[:200], digits.y_test[:200]
    return lambda m: zoo.accuracy(m, x, y)


def test_sweep_leaves_model_bit_exactly_unchanged_and_records_no_history(lenet, evaluate):
    saved = snapshot(lenet)
    lenet.fc2.train()  # a mixed training flag must survive the eval-mode sweep
    result = nc.sensitivity(lenet, evaluate, ratios=RATIOS, progress=False)
    assert_same_state(lenet, saved)
    assert lenet.fc2.training and not lenet.fc1.training
    assert nc.history(lenet) == []
    assert result.complete


def test_curves_cover_every_layer_including_the_output_layer(lenet, evaluate):
    result = nc.sensitivity(
        lenet, evaluate, ratios=[0.9, 0.3, 0.6, 0.3], include_output=True, progress=False
    )
    assert result.layers == ["fc1", "fc2", "fc3"]
    assert result.ratios == RATIOS  # sorted, duplicates dropped
    assert result.baseline == evaluate(lenet)
    assert all(len(c) == 3 and None not in c for c in result.curves.values())
    assert result.evaluations == 1 + 3 * 3
    assert result.sizes == {"fc1": 64 * 300, "fc2": 300 * 100, "fc3": 100 * 10}
    assert result.seconds > 0 and not result.proxy
    # Pruning 90% of the output layer hurts more than 30% of it.
    assert result.curves["fc3"][2] < result.curves["fc3"][0]


def test_by_default_the_output_layer_is_left_alone_with_a_note(lenet, evaluate):
    result = nc.sensitivity(lenet, evaluate, ratios=RATIOS, progress=False)
    assert result.layers == ["fc1", "fc2"] and result.evaluations == 1 + 2 * 3
    assert any("Output layer fc3 left alone" in n for n in result.notes)
    assert "fc3" not in result.suggest(0.5, check=False).ratios
    # Named literally, it is analysed: naming it is taken as intent.
    alone = nc.sensitivity(lenet, evaluate, ratios=[0.5], layers="fc3", progress=False)
    assert alone.layers == ["fc3"]


def test_the_output_layer_is_found_from_the_forward_not_registration_order():
    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 3)  # registered first, used last
            self.body = nn.Linear(4, 8)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

    torch.manual_seed(0)
    result = nc.sensitivity(HeadFirst(), lambda m: 1.0, ratios=[0.5], progress=False)
    assert result.layers == ["body"]
    assert any("Output layer head left alone" in n for n in result.notes)


@pytest.mark.parametrize("granularity", ["element", "block", "channel"])
def test_each_point_is_the_metric_with_only_that_layer_pruned(lenet, evaluate, granularity):
    result = nc.sensitivity(lenet, evaluate, ratios=RATIOS, granularity=granularity, progress=False)
    with trial(lenet):
        nc.prune_(lenet, {"fc2": 0.6}, layers="fc2", granularity=granularity)
        assert zero_fraction(lenet.fc2.weight) == pytest.approx(0.6, abs=0.01)
        expected = evaluate(lenet)
    assert result.curves["fc2"][1] == expected
    assert result.granularity == granularity


def test_evaluate_raising_midway_restores_model_and_keeps_partial_result(lenet, evaluate):
    saved = snapshot(lenet)
    calls = []

    def flaky(model):
        calls.append(1)
        if len(calls) == 5:
            raise ZeroDivisionError("boom")
        return evaluate(model)

    with pytest.raises(EvaluationError, match=r"evaluate: flaky\(model\) raised ZeroDivisionError"):
        nc.sensitivity(lenet, flaky, ratios=RATIOS, include_output=True, progress=False)
    assert_same_state(lenet, saved)
    partial = latest(lenet)
    assert not partial.complete
    # Calls: baseline, fc1 × 3, then the failing first point of fc2.
    assert None not in partial.curves["fc1"] and partial.evaluations == 4
    assert partial.curves["fc2"] == [None] * 3
    assert any("Stopped by an error" in n for n in partial.notes)
    assert partial.suggest(max_drop=1.0).ratios["fc3"] == 0.0  # unevaluated: never pruned


def test_keyboard_interrupt_returns_partial_result_with_model_restored(lenet, evaluate):
    saved = snapshot(lenet)
    calls = []

    def interrupted(model):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return evaluate(model)

    result = nc.sensitivity(lenet, interrupted, ratios=RATIOS, progress=False)
    assert_same_state(lenet, saved)
    assert not result.complete and result.evaluations == 3
    assert any("Interrupted" in n for n in result.notes)
    assert result.curves["fc1"][2] is None and result.curves["fc2"] == [None] * 3
    assert "INCOMPLETE" in str(result)


def test_buffers_changed_by_evaluate_are_restored():
    model = cnn()
    saved = snapshot(model)
    x = torch.randn(4, 1, 8, 8)

    def trains_batchnorm(m):
        m.train()  # a careless evaluate: updates BatchNorm running statistics
        return float(m(x).sum().detach())

    nc.sensitivity(model, trains_batchnorm, ratios=[0.5], progress=False)
    assert_same_state(model, saved)
    assert model.training


def test_lower_is_better_metric(lenet, digits):
    def loss(m):
        with torch.no_grad():
            return float(F.cross_entropy(m(digits.x_test), digits.y_test))

    result = nc.sensitivity(
        lenet, loss, ratios=RATIOS, higher_is_better=False, include_output=True, progress=False
    )
    assert result.metric == "loss" and not result.higher_is_better
    assert result.curves["fc3"][2] > result.baseline
    assert result.predict({"fc3": 0.9}) == pytest.approx(result.curves["fc3"][2])
    assert result.predict({"fc1": 0.9, "fc3": 0.9}) >= result.predict({"fc3": 0.9})


def test_proxy_without_evaluate_is_labelled_and_compares_to_dense_output(lenet, digits):
    result = nc.sensitivity(
        lenet, example_inputs=digits.x_test[:32], ratios=RATIOS, include_output=True,
        progress=False,
    )  # fmt: skip
    assert result.proxy and "KL" in result.metric and result.baseline == pytest.approx(1.0)
    assert all(0 < v <= 1 + 1e-6 for c in result.curves.values() for v in c)
    assert result.macs == {"fc1": 32 * 64 * 300, "fc2": 32 * 300 * 100, "fc3": 32 * 100 * 10}
    assert "proxy" in str(result)


def test_proxy_for_non_classifier_uses_cosine_similarity():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    result = nc.sensitivity(model, example_inputs=torch.randn(16, 8), ratios=[0.5], progress=False)
    assert "cosine" in result.metric and result.baseline == pytest.approx(1.0)


def test_early_stop_skips_the_rest_of_a_layer(lenet, evaluate):
    result = nc.sensitivity(
        lenet,
        evaluate,
        ratios=[0.5, 0.9, 0.95, 0.99],
        early_stop=0.05,
        include_output=True,
        progress=False,
    )
    fc3 = result.curves["fc3"]
    stopped = next(i for i, v in enumerate(fc3) if result.baseline - v > 0.05)
    assert fc3[stopped + 1 :] == [None] * (3 - stopped)
    assert result.evaluations == 1 + sum(v is not None for c in result.curves.values() for v in c)
    assert any("early stop" in n for n in result.notes)


def test_max_layers_keeps_the_largest(lenet, evaluate):
    result = nc.sensitivity(
        lenet, evaluate, ratios=[0.5], max_layers=2, include_output=True, progress=False
    )
    assert result.layers == ["fc1", "fc2"]
    assert any("max_layers=2" in n for n in result.notes)


def test_callback_sees_each_evaluation_and_progress_goes_to_stdout(lenet, evaluate, capsys):
    seen = []
    nc.sensitivity(
        lenet,
        evaluate,
        ratios=[0.5, 0.9],
        include_output=True,
        callback=lambda r, layer, q: seen.append((layer, q, r.evaluations)),
    )
    assert seen == [("fc1", 0.5, 2), ("fc1", 0.9, 3), ("fc2", 0.5, 4), ("fc2", 0.9, 5),
                    ("fc3", 0.5, 6), ("fc3", 0.9, 7)]  # fmt: skip
    out = capsys.readouterr()
    assert "sensitivity [6/6" in out.out and "fc3" in out.out
    assert out.err == ""  # progress is normal output, not the stderr (error) box


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"evaluate": "accuracy"}, TypeError, "evaluate: expected a function"),
        (
            {"evaluate": lambda m: "high"},
            TypeError,
            "evaluate: <lambda> returned str 'high'; it must",
        ),
        ({"evaluate": lambda m: float("nan")}, ValueError, "evaluate: returned nan"),
        ({"ratios": [0.5, 1.0]}, ValueError, r"ratios\[1\]: 1.0 is outside \(0, 1\)"),
        ({"ratios": [0.0]}, ValueError, r"ratios\[0\]"),
        ({"ratios": [-0.1]}, ValueError, r"ratios\[0\]"),
        ({"ratios": "0.1,0.5"}, TypeError, "ratios: expected a non-empty list"),
        ({"ratios": []}, TypeError, "ratios: expected a non-empty list"),
        ({"layers": []}, ValueError, "layers: an empty list selects nothing"),
        ({"layers": "conv*"}, ValueError, "layers: pattern 'conv\\*' matches no layer"),
        ({"evaluate": None}, ValueError, "evaluate: give an evaluation function"),
        ({"granularity": "row"}, ValueError, "granularity"),
        ({"max_layers": 0}, ValueError, "max_layers"),
        ({"early_stop": -1}, ValueError, "early_stop"),
        ({"example_inputs": torch.randn(2, 3)}, ValueError, "example_inputs: the model failed"),
    ],
)
def test_bad_input_gives_one_clear_error_and_leaves_model_untouched(kwargs, error, match):
    model = mlp()
    saved = snapshot(model)
    args = {"evaluate": lambda m: 1.0, "ratios": [0.5], "progress": False, **kwargs}
    with pytest.raises(error, match=match):
        nc.sensitivity(model, **args)
    assert_same_state(model, saved)
    assert nc.history(model) == []


def test_layers_with_several_weight_matrices_are_analysed_and_channels_refused():
    # Issue 11: MultiheadAttention (no single `weight`) is analysed like prune_ prunes it;
    # it has no output channels, so channel granularity is refused as prune_ refuses it.
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    result = nc.sensitivity(
        model, lambda m: 1.0, types="MultiheadAttention", include_output=True, progress=False
    )
    assert result.layers == ["0"] and result.sizes["0"] == 4 * 8 * 8
    with pytest.raises(ValueError, match="granularity: MultiheadAttention layer.* '0' cannot be"):
        nc.sensitivity(
            model, lambda m: 1.0, types="MultiheadAttention", granularity="channel",
            include_output=True, progress=False,
        )  # fmt: skip


def test_non_number_midway_names_evaluate_and_restores(lenet):
    saved = snapshot(lenet)
    values = iter([0.9, 0.8, None])
    with pytest.raises(TypeError, match="evaluate: .* returned NoneType") as info:
        nc.sensitivity(lenet, lambda m: next(values), ratios=RATIOS, progress=False)
    assert_same_state(lenet, saved)
    assert info.value.result.curves["fc1"][0] == 0.8


def test_tensor_results_are_accepted(lenet, digits):
    result = nc.sensitivity(
        lenet, lambda m: m(digits.x_test[:8]).max(), ratios=[0.5], layers="fc3", progress=False
    )
    assert isinstance(result.baseline, float) and result.layers == ["fc3"]


def test_already_pruned_layers_start_at_their_sparsity(lenet, evaluate):
    nc.prune_(lenet, {"fc1": 0.5}, layers="fc1")
    result = nc.sensitivity(lenet, evaluate, ratios=RATIOS, include_output=True, progress=False)
    assert result.start["fc1"] == pytest.approx(0.5, abs=1e-3) and result.start["fc2"] == 0.0
    assert result.curves["fc1"][0] == result.baseline  # 30% < 50%: nothing to evaluate
    assert result.evaluations == 1 + 3 * 3 - 1
    total = sum(result.sizes.values())
    assert result.sparsity_of({}) == pytest.approx(0.5 * result.sizes["fc1"] / total, rel=1e-3)
    suggestion = result.suggest(0.3)
    assert suggestion.ratios["fc1"] >= result.start["fc1"] - 1e-9
    assert suggestion.sparsity >= 0.3
