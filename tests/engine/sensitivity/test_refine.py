"""Measured refinement (refine, suggest(refine=...), prune_to_(refine=N)): never worse, exact."""

import pytest
import torch

import nbcompress as nc
from nbcompress.engine.core.history import trial
from nbcompress.engine.sensitivity.evaluate import EvaluationError
from nbcompress.engine.sensitivity.registry import latest_suggestion
from nbcompress.engine.sensitivity.result import SensitivityResult
from tests.helpers import assert_same_state, cnn, snapshot
from tests.sensitivity_helpers import mlp_with_agreement

RATIOS = [0.2, 0.4, 0.6, 0.8, 0.9]


@pytest.fixture
def setup():
    """An MLP, and a continuous metric of it: distance of its output to the dense output."""
    model, x, agreement = mlp_with_agreement()
    reference = model(x).detach()

    def distance(m):
        with torch.no_grad():
            return float(((m(x) - reference) ** 2).mean())

    return model, agreement, distance


def linear_weights(model, names=None):
    """Weights of the Linear/Conv2d layers, or of those named (the layers an allocation covers)."""
    return [
        m.weight
        for n, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and (names is None or n in names)
    ]


def overall_sparsity(model, names=None):
    weights = linear_weights(model, names)
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def measured_with(model, ratios, evaluate):
    # The target is a share of the layers the allocation covers (the output layer may be out).
    with trial(model):
        nc.prune_(model, {n: r for n, r in ratios.items() if r}, include_output=True)
        return evaluate(model), overall_sparsity(model, ratios)


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9])
def test_refinement_is_never_worse_than_its_candidates_and_respects_the_target(setup, target):
    model, _, distance = setup
    result = nc.sensitivity(model, distance, ratios=RATIOS, progress=False)
    suggestion = result.suggest(target, check=False)  # the curves' own choice, unmeasured
    found = nc.refine(
        model, distance, target, candidates={"curves": suggestion.ratios},
        higher_is_better=False, budget=40,
    )  # fmt: skip
    candidates = [s["measured"] for s in found.steps if s["step"].startswith("candidate")]
    assert len(candidates) == 3 and set(found.candidates) == {"uniform L1", "global L1", "curves"}
    assert found.measured <= min(candidates)
    value, achieved = measured_with(model, found.ratios, distance)
    assert value == found.measured  # what it reports is what the allocation measures
    # At least the target, up to rounding half a weight per layer.
    assert achieved >= target - 1.5 / sum(w.numel() for w in linear_weights(model, found.ratios))
    assert found.sparsity == pytest.approx(achieved)
    assert found.evaluations <= len(candidates) + 40


def test_with_higher_is_better_it_maximises(setup):
    model, agreement, _ = setup
    found = nc.refine(model, agreement, 0.8, budget=30)
    candidates = [s["measured"] for s in found.steps if s["step"].startswith("candidate")]
    assert found.measured >= max(candidates)
    assert found.start in ("uniform L1", "global L1")


def test_kept_moves_improve_strictly_and_a_zero_budget_returns_the_best_candidate(setup):
    model, _, distance = setup
    found = nc.refine(model, distance, 0.8, higher_is_better=False, budget=60)
    moves = [s["measured"] for s in found.steps if s["step"].startswith("move")]
    assert moves, "the search should find at least one improving move on this model"
    assert all(b < a for a, b in zip(moves, moves[1:], strict=False))
    none = nc.refine(model, distance, 0.8, higher_is_better=False, budget=0)
    assert none.evaluations == 2 and none.measured == min(s["measured"] for s in none.steps)


def test_model_is_bit_exact_after_a_refinement_and_nothing_is_recorded():
    model = cnn()
    model.train()  # BatchNorm would update its statistics if evaluated in training mode
    x = torch.randn(6, 1, 8, 8)
    saved = snapshot(model)

    def evaluate(m):
        m.train()  # a careless evaluate: the buffers it changes must be restored too
        with torch.no_grad():
            return float(m(x).square().mean())

    found = nc.refine(model, evaluate, 0.7, budget=15, higher_is_better=False)
    assert found.evaluations > 2
    assert_same_state(model, saved)
    assert model.training and nc.history(model) == []


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_eval_that_raises_mid_search_rolls_back(setup, error):
    model, _, distance = setup
    saved = snapshot(model)
    calls = []

    def flaky(m):
        calls.append(1)
        if len(calls) == 6:  # after the candidates, inside the search
            raise error("validation data gone")
        return distance(m)

    expected = EvaluationError if error is RuntimeError else KeyboardInterrupt
    with pytest.raises(expected):
        nc.refine(model, flaky, 0.8, higher_is_better=False, budget=20)
    assert len(calls) == 6
    assert_same_state(model, saved)
    assert nc.history(model) == []


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"evaluate": None}, ValueError, "evaluate: refinement measures"),
        ({"evaluate": 3}, TypeError, "evaluate: expected a function"),
        ({"target_sparsity": 1.2}, ValueError, "target_sparsity: 1.2 is outside"),
        ({"budget": -1}, ValueError, "budget: expected a number of evaluations"),
        ({"budget": 2.5}, ValueError, "budget: expected a number of evaluations"),
        ({"step": 0}, ValueError, "step: expected a fraction"),
        ({"candidates": [0.5]}, TypeError, "candidates: expected a dict"),
        ({"candidates": {"mine": {"9": 0.5}}}, ValueError, r"candidates\['mine'\]: '9' not"),
        ({"candidates": {"mine": {"0": 1.5}}}, ValueError, r"candidates\['mine'\]\['0'\]"),
        ({"layers": []}, ValueError, "layers: an empty list"),
        ({"granularity": "row"}, ValueError, "granularity: 'row' is unknown"),
    ],
)
def test_bad_input_is_one_clear_error_with_the_model_untouched(setup, kwargs, error, match):
    model, _, distance = setup
    saved = snapshot(model)
    args = {"evaluate": distance, "target_sparsity": 0.8, **kwargs}
    with pytest.raises(error, match=match):
        nc.refine(model, args.pop("evaluate"), args.pop("target_sparsity"), **args)
    assert_same_state(model, saved)
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        nc.refine("model", distance, 0.8)


def test_channel_granularity_moves_whole_channels(setup):
    model, _, distance = setup
    found = nc.refine(
        model, distance, 0.5, granularity="channel", higher_is_better=False, budget=20
    )
    for name, ratio in found.ratios.items():
        out = model.get_submodule(name).weight.shape[0]
        assert ratio * out == pytest.approx(round(ratio * out))
    assert found.sparsity >= 0.5 - 0.5 * sum(w.shape[1] for w in linear_weights(model)) / sum(
        w.numel() for w in linear_weights(model)
    )


def test_block_granularity_sweeps_and_refines_in_whole_4x1_blocks(setup):
    model, _, distance = setup
    result = nc.sensitivity(model, distance, ratios=RATIOS, granularity="block", progress=False)
    assert result.granularity == "block"
    found = nc.refine(model, distance, 0.6, granularity="block", higher_is_better=False, budget=15)
    with trial(model):
        nc.prune_(model, found.ratios, include_output=True, granularity="block")
        for w in linear_weights(model):
            groups = (w != 0).reshape(w.shape[0] // 4, 4, -1)  # mlp(): rows are multiples of 4
            assert bool((groups.all(1) | ~groups.any(1)).all())
        assert overall_sparsity(model, found.ratios) == pytest.approx(found.sparsity)


def test_suggest_with_refine_reports_predicted_and_measured(setup):
    model, _, distance = setup
    saved = snapshot(model)
    result = nc.sensitivity(model, distance, ratios=RATIOS, progress=False, higher_is_better=False)
    plain = result.suggest(0.8, check=False)  # the curves' choice, as refine's candidate
    # reconstruct=False: the refinement's own best, not a least-squares re-fit of it.
    refined = result.suggest(0.8, evaluate=distance, refine=30, reconstruct=False)
    # Candidates are rounded to whole weights.
    assert refined.refinement.candidates["curve suggestion"] == pytest.approx(
        plain.ratios, abs=0.01
    )
    assert refined.measured == refined.refinement.measured
    assert refined.measured <= measured_with(model, plain.ratios, distance)[0]
    assert refined.predicted == result.predict(refined.ratios)
    assert refined.sparsity == pytest.approx(result.sparsity_of(refined.ratios))
    assert "measured" in str(refined) and "evaluations in" in str(refined)
    assert_same_state(model, saved)
    assert latest_suggestion(model) is refined
    with pytest.warns(DeprecationWarning, match=r"suggest\(refine=evaluate\) is deprecated"):
        # The old spelling, one release.
        old = result.suggest(0.8, refine=distance, budget=30, reconstruct=False)
    assert old.ratios == refined.ratios and old.measured == refined.measured


def test_suggest_refine_needs_a_target_sparsity_and_a_live_model(setup, tmp_path):
    model, _, distance = setup
    result = nc.sensitivity(model, distance, ratios=RATIOS, progress=False, higher_is_better=False)
    with pytest.raises(ValueError, match="refine: refines a target_sparsity suggestion"):
        result.suggest(max_drop=0.01, evaluate=distance, refine=100)
    with pytest.raises(ValueError, match="refine: expected a number of evaluations"):
        result.suggest(0.8, evaluate=distance, refine=-3)
    # evaluate alone checks the suggestion against uniform and global L1 (three evaluations).
    checked = result.suggest(0.8, evaluate=distance)
    assert checked.refinement.evaluations == 3 and len(checked.refinement.steps) == 3
    # refine=N alone measures with the sweep's own evaluate.
    assert result.suggest(0.8, refine=10).refinement.evaluations > 3
    with pytest.raises(ValueError, match="check: checks a target_sparsity"):
        result.suggest(max_drop=0.01, check=True)
    with pytest.raises(ValueError, match="check: refine=N measures"):
        result.suggest(0.8, refine=10, check=False)
    # The old spelling (refine=evaluate, budget=N) still works for one release, with a warning.
    old_spelling = pytest.warns(DeprecationWarning, match="evaluate=fn, refine=100")
    with old_spelling, pytest.raises(ValueError, match="refine: refines a target_sparsity"):
        result.suggest(max_drop=0.01, refine=distance)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="budget: expected"):
        result.suggest(0.8, refine=distance, budget=-3)
    path = tmp_path / "sweep.json"
    result.save(path)
    with pytest.raises(ValueError, match="refine: this result is not attached to a live model"):
        SensitivityResult.load(path).suggest(0.8, evaluate=distance, refine=100)


def test_prune_to_with_refine_applies_the_best_measured_as_one_undo_step(setup):
    model, _, distance = setup
    saved = snapshot(model)
    report = nc.prune_to_(
        model, distance, 0.8, stages=2, ratios=RATIOS, higher_is_better=False, refine=30,
        progress=False,
    )  # fmt: skip
    found = report.refinement
    assert set(found.candidates) == {"uniform L1", "global L1", "staged", "one sweep"}
    staged = next(s["measured"] for s in found.steps if s["step"] == "candidate: staged")
    assert report.measured == found.measured == distance(model) <= staged
    assert report.stages[-1]["stage"].startswith("refined (from ")
    assert report.ratios == found.ratios
    assert overall_sparsity(model, found.ratios) == pytest.approx(found.sparsity)
    assert "2 stage(s) + measured refinement" in str(report)
    assert len(nc.history(model)) == 1
    nc.undo_(model)
    assert_same_state(model, saved)


def test_prune_to_refine_failure_rolls_back_the_stages_too(setup):
    model, _, distance = setup
    saved = snapshot(model)
    plain = []
    nc.prune_to_(
        model, lambda m: plain.append(1) or distance(m), 0.8, stages=2, ratios=RATIOS,
        higher_is_better=False, progress=False,
    )  # fmt: skip
    nc.undo_(model)
    calls = []

    def flaky(m):
        calls.append(1)
        if len(calls) == len(plain) + 3:  # the stages are done: inside the refinement
            raise RuntimeError("validation data gone")
        return distance(m)

    with pytest.raises(EvaluationError, match="validation data gone"):
        nc.prune_to_(
            model, flaky, 0.8, stages=2, ratios=RATIOS, higher_is_better=False, refine=30,
            progress=False,
        )  # fmt: skip
    assert_same_state(model, saved)
    assert nc.history(model) == []
    with pytest.raises(ValueError, match="refine: expected a number of evaluations"):
        nc.prune_to_(model, distance, 0.8, refine=-1, progress=False)
    assert_same_state(model, saved)
