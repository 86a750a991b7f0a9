"""How trial parameters become ratios, and the allocations that start a front."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nbcompress.engine.search.space import (
    MAX_RATIO,
    MIN_KEEP,
    PARAMETERISATION,
    Space,
    front_seeds,
    suggest_ratios,
)

optuna = pytest.importorskip("optuna")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)
    )


def _ask(study, space: Space, target: float | None) -> tuple[object, list[float]]:
    trial = study.ask()
    return trial, suggest_ratios(trial, space, target)


def test_without_a_target_keep_is_sampled_on_a_log_scale() -> None:
    space = Space.of(_model(), None, "element")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    ratios = []
    for _ in range(400):
        trial, found = _ask(study, space, None)
        dist = trial.distributions[space.names[0]]
        assert (dist.low, dist.high, dist.log) == (MIN_KEEP, 1.0, True)
        assert found == [1.0 - trial.params[n] for n in space.names]
        ratios += found
    assert all(0.0 <= r <= MAX_RATIO + 1e-12 for r in ratios)
    # log-uniform keep in [0.01, 1]: half the proposals keep at most 10% (ratio >= 0.9);
    # uniform ratios would put only 10% of them there
    share = sum(r >= 0.9 for r in ratios) / len(ratios)
    assert 0.4 < share < 0.6


def test_with_a_target_scores_are_projected_onto_the_budget() -> None:
    space = Space.of(_model(), None, "element")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(20):
        trial, ratios = _ask(study, space, 0.8)
        assert not trial.distributions[space.names[0]].log
        assert space.sparsity(ratios) == pytest.approx(0.8, abs=1e-9)


def test_the_parameterisation_has_a_name_for_the_study_signature() -> None:
    assert PARAMETERISATION == "keep-log"


def test_front_seeds_spread_over_sparsities_alternating_global_l1_and_uniform() -> None:
    model = _model()
    space = Space.of(model, None, "element")
    seeds = front_seeds(model, space, 6, low=0.3, high=0.9)
    assert len(seeds) == 6
    for params in seeds:
        assert list(params) == list(space.names)
        assert all(MIN_KEEP <= k <= 1.0 for k in params.values())
    sparsities = [space.sparsity([1.0 - k for k in p.values()]) for p in seeds]
    assert sparsities == pytest.approx([0.3, 0.42, 0.54, 0.66, 0.78, 0.9], abs=0.01)
    uniform = seeds[1::2]
    assert all(len({round(k, 9) for k in p.values()}) == 1 for p in uniform)
    glob = [[1.0 - k for k in p.values()] for p in seeds[0::2]]
    for ratios, target in zip(glob, (0.3, 0.54, 0.78)):
        assert ratios == pytest.approx(space.global_l1(model, target))
        assert len({round(r, 6) for r in ratios}) > 1  # one threshold, not one ratio


def test_front_seeds_are_accepted_as_enqueued_trials() -> None:
    model = _model()
    space = Space.of(model, None, "element")
    study = optuna.create_study(
        sampler=optuna.samplers.NSGAIISampler(population_size=4, seed=0),
        directions=["maximize", "maximize"],
    )
    seeds = front_seeds(model, space, 4)
    for params in seeds:
        study.enqueue_trial(params)
    for params in seeds:
        trial, ratios = _ask(study, space, None)
        assert ratios == pytest.approx([1.0 - params[n] for n in space.names])
        study.tell(trial, [0.0, space.sparsity(ratios)])


@pytest.mark.parametrize("n", [0, 1])
def test_front_seeds_few(n: int) -> None:
    model = _model()
    space = Space.of(model, None, "element")
    seeds = front_seeds(model, space, n, low=0.5, high=0.9)
    assert len(seeds) == n
    if n:
        assert space.sparsity([1.0 - k for k in seeds[0].values()]) == pytest.approx(0.5, abs=0.01)
