"""Predictions and suggestions from sensitivity curves; applying them; save/load; plots."""

import gc
import itertools

import pytest
import torch
from matplotlib.figure import Figure

import nbcompress as nc
from nbcompress.engine.sensitivity.evaluate import EvaluationError
from nbcompress.engine.sensitivity.registry import latest, latest_suggestion, remember
from nbcompress.engine.sensitivity.result import SensitivityResult
from tests.helpers import assert_same_state, mlp, snapshot, zero_fraction
from tests.sensitivity_helpers import mlp_with_agreement

GRID = [0.25, 0.5, 0.75]


def make_result(curves, sizes, *, baseline=1.0, higher=True, macs=None, ratios=GRID):
    return SensitivityResult(
        layers=list(curves), ratios=list(ratios), baseline=baseline, curves=curves,
        sizes=sizes, macs=macs or dict.fromkeys(curves), metric="acc", higher_is_better=higher,
        proxy=False, granularity="element", evaluations=1 + 3 * len(curves), seconds=0.1,
        complete=True,
    )  # fmt: skip


@pytest.fixture
def synthetic():
    # "a" is robust, "b" is sensitive, "c" is tiny and very sensitive.
    return make_result(
        {"a": [1.0, 0.99, 0.97], "b": [0.9, 0.7, 0.3], "c": [0.5, 0.2, 0.1]},
        {"a": 1000, "b": 1000, "c": 100},
    )


def brute_force(result, feasible, key):
    options = [[0.0, *result.ratios] for _ in result.layers]
    best = None
    for combo in itertools.product(*options):
        ratios = dict(zip(result.layers, combo, strict=True))
        if feasible(ratios) and (best is None or key(ratios) < key(best)):
            best = ratios
    return best


def test_predict_interpolates_each_curve_and_sums_the_drops(synthetic):
    assert synthetic.predict({}) == 1.0
    assert synthetic.predict({"b": 0.5}) == pytest.approx(0.7)
    assert synthetic.predict({"b": 0.375}) == pytest.approx(0.8)  # halfway 0.9 → 0.7
    assert synthetic.predict({"a": 0.75, "b": 0.25}) == pytest.approx(1.0 - 0.03 - 0.1)
    assert synthetic.sparsity_of({"a": 0.5, "c": 1 / 2}) == pytest.approx(550 / 2100)
    with pytest.raises(ValueError, match="ratios: 'zz' not analysed"):
        synthetic.predict({"zz": 0.5})
    with pytest.raises(ValueError, match=r"ratios\['a'\]: 1.5 is outside"):
        synthetic.predict({"a": 1.5})


def test_noise_never_predicts_a_gain_and_more_pruning_never_helps():
    result = make_result({"a": [1.02, 0.9, 0.95]}, {"a": 10})
    assert result.predict({"a": 0.25}) == 1.0
    assert result.predict({"a": 0.75}) == pytest.approx(0.9)


def test_target_sparsity_is_met_at_the_smallest_predicted_drop(synthetic):
    s = synthetic.suggest(0.5)
    assert s.sparsity >= 0.5 and s.ratios["a"] > s.ratios["b"] >= s.ratios["c"]
    assert s.predicted == synthetic.predict(s.ratios)
    best = brute_force(
        synthetic, lambda r: synthetic.sparsity_of(r) >= 0.5, lambda r: -synthetic.predict(r)
    )
    # The grid optimum is reachable; interpolated in-between ratios may only do better.
    assert s.predicted >= synthetic.predict(best) - 1e-9
    assert s.objective == "params" and s.target == "sparsity 50%"
    assert s.removed == round(sum(r * synthetic.sizes[n] for n, r in s.ratios.items()))


def test_max_drop_removes_the_most_within_the_budget(synthetic):
    s = synthetic.suggest(max_drop=0.12)
    assert 1.0 - s.predicted <= 0.12 + 1e-9
    best = brute_force(
        synthetic,
        lambda r: 1.0 - synthetic.predict(r) <= 0.12 + 1e-9,
        lambda r: -synthetic.sparsity_of(r),
    )
    assert s.sparsity >= synthetic.sparsity_of(best) - 1e-9
    assert s.ratios["a"] == 0.75


def test_objective_macs_counts_macs():
    result = make_result(
        {"a": [1.0, 1.0, 1.0], "b": [1.0, 1.0, 1.0]}, {"a": 10, "b": 10}, macs={"a": 100, "b": 1}
    )
    s = result.suggest(0.3, objective="macs")
    assert s.objective == "macs" and s.ratios["a"] >= 0.3 - 1e-9
    assert s.removed == round(100 * s.ratios["a"] + s.ratios["b"])
    with pytest.raises(ValueError, match="objective: MACs are unknown"):
        make_result({"a": [1.0] * 3}, {"a": 4}).suggest(0.2, objective="macs")
    with pytest.raises(ValueError, match="objective: 'flops' is unknown"):
        result.suggest(0.2, objective="flops")


def test_lower_is_better_suggestion():
    result = make_result(
        {"a": [2.0, 2.1, 2.2], "b": [3.0, 5.0, 9.0]}, {"a": 10, "b": 10}, baseline=2.0, higher=False
    )
    s = result.suggest(0.3)
    assert s.ratios["a"] >= 0.6 and s.ratios["b"] == 0.0 and s.predicted >= 2.0


def test_unreachable_budgets_say_what_is_reachable(synthetic):
    with pytest.raises(ValueError, match=r"target_sparsity: 90.0% cannot .* Closest reachable"):
        synthetic.suggest(0.9)
    sensitive = make_result({"b": [0.9, 0.7, 0.3]}, {"b": 100})
    # The cheapest step is 1% of "b", interpolated: 0.1 × 0.01 / 0.25.
    with pytest.raises(ValueError, match=r"max_drop: 0.001 allows no pruning.*max_drop=0.004"):
        sensitive.suggest(max_drop=0.001)
    with pytest.raises(ValueError, match="give exactly one"):
        synthetic.suggest()
    with pytest.raises(ValueError, match="give exactly one"):
        synthetic.suggest(0.5, max_drop=0.1)
    with pytest.raises(ValueError, match="target_sparsity"):
        synthetic.suggest(1.2)


def test_suggestion_prints_and_renders(synthetic):
    s = synthetic.suggest(0.5)
    text, page = str(s), s._repr_html_()
    assert "sparsity 50%" in text and "predicted acc" in text and "a" in text
    assert "<table" in page and s.rows[0]["layer"] == "a"


def test_save_load_round_trip(tmp_path, synthetic):
    synthetic.curves["c"][2] = None
    synthetic.notes.append("a note")
    synthetic.save(tmp_path / "r.json")
    loaded = SensitivityResult.load(tmp_path / "r.json")
    assert loaded == synthetic
    assert loaded.suggest(0.4).ratios == synthetic.suggest(0.4).ratios
    (tmp_path / "bad.json").write_text('{"layers": []}')
    with pytest.raises(ValueError, match="not a saved nbcompress sensitivity result"):
        SensitivityResult.load(tmp_path / "bad.json")


def test_plots_are_figures_without_pyplot_state(synthetic):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    fig = synthetic.plot()
    assert isinstance(fig, Figure) and len(fig.axes[0].lines) == 1 + 3  # baseline + layers
    many = make_result({f"l{i}": [1.0, 0.9, 0.5] for i in range(20)}, dict.fromkeys(
        (f"l{i}" for i in range(20)), 10))  # fmt: skip
    assert len(many.plot().axes[0].images) == 1  # auto → heat map
    assert len(synthetic.plot("heatmap").axes[0].images) == 1
    with pytest.raises(ValueError, match="kind"):
        synthetic.plot("pie")
    assert plt.get_fignums() == before
    assert "<img" in synthetic._repr_html_() and "<table" in synthetic._repr_html_()
    assert synthetic.rows[1] == {"layer": "b", "params": 1000, "MACs": None,
                                 "25%": 0.9, "50%": 0.7, "75%": 0.3}  # fmt: skip


# --- applying a suggestion to a live model -------------------------------------------------


@pytest.fixture
def swept():
    model, _, agreement = mlp_with_agreement()
    result = nc.sensitivity(model, agreement, ratios=[0.3, 0.6, 0.9], progress=False)
    return model, agreement, result


def test_apply_suggestion_prunes_measures_and_undoes(swept):
    model, agreement, result = swept
    saved = snapshot(model)
    s = result.suggest(0.6)
    assert latest_suggestion(model) is s and latest(model) is result
    report = nc.apply_suggestion_(model)  # default: the latest suggestion and evaluate
    for name, ratio in s.ratios.items():
        assert zero_fraction(model.get_submodule(name).weight) == pytest.approx(ratio, abs=0.01)
    assert report.measured == agreement(model) and report.predicted == s.predicted
    assert "predicted" in str(report) and "measured" in report._repr_html_()
    assert [step.name for step in nc.history(model)] == ["prune"]
    nc.undo_(model)
    assert_same_state(model, saved)


def test_apply_rolls_back_when_measuring_fails(swept):
    model, _, result = swept
    saved = snapshot(model)

    def broken(m):
        raise RuntimeError("no data")

    with pytest.raises(EvaluationError, match="evaluate: broken"):
        nc.apply_suggestion_(model, result.suggest(0.5), evaluate=broken)
    assert_same_state(model, saved)
    assert nc.history(model) == []


def test_apply_without_suggestion_or_measurement():
    model = mlp()
    with pytest.raises(ValueError, match="suggestion: none recorded"):
        nc.apply_suggestion_(model)
    result = nc.sensitivity(model, example_inputs=torch.randn(8, 16), ratios=[0.5], progress=False)
    report = nc.apply_suggestion_(model, result.suggest(0.3), example_inputs=torch.randn(8, 16))
    assert report.proxy and 0 < report.measured <= 1 + 1e-6
    loaded = make_result({"0": [1.0] * 3}, {"0": 16 * 32})
    remember(model, loaded)
    assert latest(model) is loaded and latest_suggestion(model) is None
    report = nc.apply_suggestion_(model, loaded.suggest(0.5))
    assert report.measured is None and "Not measured" in str(report)


def test_registry_does_not_keep_models_alive():
    model = mlp()
    evaluate = lambda m: float(m(torch.ones(1, 16)).sum().detach())  # noqa: E731 - a closure over m
    nc.sensitivity(model, evaluate, ratios=[0.5], progress=False).suggest(0.2)
    from nbcompress.engine.sensitivity.registry import tracked

    gc.collect()  # earlier tests' cyclic garbage (e.g. kept tracebacks) is not ours to count
    count = tracked()
    del model
    gc.collect()
    assert tracked() == count - 1


def test_apply_to_another_model_or_with_explicit_evaluate_on_a_proxy(swept):
    model, agreement, result = swept
    other = torch.nn.Sequential(torch.nn.Linear(16, 4))
    saved = snapshot(other)
    with pytest.raises(ValueError, match=r"suggestion: layer\(s\) .*2.* not in this model"):
        nc.apply_suggestion_(other, result.suggest(0.5))
    assert_same_state(other, saved)
    proxy = nc.sensitivity(model, example_inputs=torch.randn(8, 16), ratios=[0.5], progress=False)
    report = nc.apply_suggestion_(model, proxy.suggest(0.3), evaluate=agreement)
    assert report.measured == agreement(model) and any("proxy" in n for n in report.notes)
