"""search(): budget projection, restored trials, failures, memo, seeds, storage, Ctrl-C."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from nbcompress.engine.core.history import history_token
from nbcompress.engine.prune.prune import prune_
from nbcompress.engine.search.samplers import SAMPLERS
from nbcompress.engine.search.search import search
from nbcompress.engine.search.space import MAX_RATIO, Space, project
from tests.engine.search.search_helpers import Fidelity
from tests.helpers import assert_same_state, cnn, mlp, snapshot


def _mlp() -> tuple[torch.nn.Module, Fidelity]:
    torch.manual_seed(0)
    model = mlp()
    return model, Fidelity(model, (16,))


@pytest.mark.parametrize("target", [0.05, 0.5, 0.9, MAX_RATIO])
def test_projection_meets_the_budget_exactly(target: float) -> None:
    rng = random.Random(1)
    counts = [rng.randint(10, 5000) for _ in range(6)]
    for _ in range(20):
        scores = [rng.uniform(0.01, 1.0) for _ in counts]
        scores[0] *= 1000 if rng.random() < 0.3 else 1  # one layer wants to keep everything
        ratios = project(scores, counts, target)
        total = sum(r * n for r, n in zip(ratios, counts)) / sum(counts)
        assert total == pytest.approx(target, abs=1e-9)
        assert all(0.0 <= r <= MAX_RATIO + 1e-12 for r in ratios)


def test_every_trial_meets_the_target_and_nothing_leaks() -> None:
    model, evaluate = _mlp()
    saved = snapshot(model)
    result = search(model, evaluate, target_sparsity=0.7, n_trials=12, seed=0, progress=False)
    assert_same_state(model, saved)
    assert history_token(model) == ()  # no step recorded by the trials
    assert len(result.trials) == 12 and evaluate.calls == 12
    assert all(t.state == "complete" for t in result.trials)
    space = Space.of(model, None, "element")
    for t in result.trials:
        assert t.sparsity == pytest.approx(0.7, abs=1e-9)
        assert space.sparsity(list(t.ratios.values())) == pytest.approx(0.7, abs=1e-9)
    assert set(result.trials[0].ratios) == {"0", "2"}  # the output layer "4" is left alone
    assert len({tuple(t.ratios.values()) for t in result.trials}) > 5


def test_warm_start_trials_are_uniform_then_global_l1() -> None:
    model, evaluate = _mlp()
    result = search(model, evaluate, target_sparsity=0.6, n_trials=3, seed=0, progress=False)
    assert list(result.trials[0].ratios.values()) == pytest.approx([0.6, 0.6])
    reference = copy.deepcopy(model)
    prune_(reference, 0.6, scope="global", min_density=0.01)
    for name, ratio in result.trials[1].ratios.items():
        weight = reference.get_submodule(name).weight
        assert ratio == pytest.approx(float((weight == 0).float().mean()), abs=2e-3)
    assert result.trials[1].ratios != result.trials[0].ratios


def test_a_failing_evaluate_marks_the_trial_failed_and_the_search_goes_on() -> None:
    model, fidelity = _mlp()
    saved = snapshot(model)

    calls = []

    def flaky(m: torch.nn.Module) -> float:
        calls.append(1)
        if len(calls) % 3 == 2:
            raise RuntimeError("boom\nsecond line")
        return float("nan") if len(calls) == 6 else fidelity(m)

    result = search(model, flaky, target_sparsity=0.5, n_trials=9, seed=0, progress=False)
    assert_same_state(model, saved)
    failed = [t for t in result.trials if t.state == "fail"]
    assert len(failed) == 4 and len(result.completed()) == 5
    assert failed[0].error == "RuntimeError: boom" and failed[0].metric is None
    assert any("returned nan" in (t.error or "") for t in failed)


def test_every_trial_failing_is_one_error_naming_evaluate() -> None:
    model, _ = _mlp()
    saved = snapshot(model)

    def broken(m: torch.nn.Module) -> float:
        raise KeyError("labels")

    with pytest.raises(ValueError, match=r"^evaluate: failed on every trial \(4\).*KeyError"):
        search(model, broken, target_sparsity=0.5, n_trials=4, seed=0, progress=False)
    assert_same_state(model, saved)


def test_a_repeated_allocation_is_not_evaluated_again() -> None:
    model, evaluate = _mlp()
    # One searched layer: the projection gives it the target whatever the score.
    result = search(
        model, evaluate, target_sparsity=0.5, n_trials=5, layers="0", seed=0, progress=False
    )
    assert evaluate.calls == 1
    assert len(result.completed()) == 5 and len(result.pareto()) == 1


@pytest.mark.parametrize("sampler", ["tpe", "gp", "nsga2", "random"])
def test_the_same_seed_gives_the_same_trials(sampler: str) -> None:
    runs = []
    for _ in range(2):
        model, evaluate = _mlp()
        # 14 trials: the first population (seeded allocations) is the same for every seed.
        result = search(model, evaluate, sampler=sampler, n_trials=14, seed=3, progress=False)
        runs.append([(t.ratios, t.metric) for t in result.trials])
    assert runs[0] == runs[1]
    model, evaluate = _mlp()
    other = search(model, evaluate, sampler=sampler, n_trials=14, seed=4, progress=False)
    assert [t.ratios for t in other.trials] != [r for r, _ in runs[0]]


def test_storage_resumes_the_study_and_refuses_another_model(tmp_path) -> None:
    path = tmp_path / "search.db"
    model, evaluate = _mlp()
    first = search(model, evaluate, target_sparsity=0.6, n_trials=4, storage=path, seed=0,
                   progress=False)  # fmt: skip
    again = search(model, evaluate, target_sparsity=0.6, n_trials=3, storage=str(path),
                   seed=1, progress=False)  # fmt: skip
    assert len(again.trials) == 7 and again.study_name == first.study_name
    assert [t.ratios for t in again.trials[:4]] == [t.ratios for t in first.trials]
    assert evaluate.calls <= 7
    other = cnn()
    other_eval = Fidelity(other, (1, 8, 8))
    saved = snapshot(other)
    with pytest.raises(ValueError, match=r"^storage: .*another model"):
        search(other, other_eval, target_sparsity=0.6, n_trials=2, storage=path,
               progress=False)  # fmt: skip
    assert_same_state(other, saved)


def test_ctrl_c_keeps_the_finished_trials_and_restores_the_model() -> None:
    model, fidelity = _mlp()
    saved = snapshot(model)

    def interrupted(m: torch.nn.Module) -> float:
        if fidelity.calls == 3:
            raise KeyboardInterrupt
        return fidelity(m)

    result = search(model, interrupted, target_sparsity=0.5, n_trials=10, seed=0, progress=False)
    assert result.interrupted
    assert_same_state(model, saved)
    assert len(result.completed()) == 3 and result.trials[-1].state == "fail"
    assert "interrupted" in repr(result)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_each_sampler_runs_with_a_target(sampler: str) -> None:
    model, evaluate = _mlp()
    result = search(model, evaluate, target_sparsity=0.6, sampler=sampler, n_trials=8, seed=0,
                    progress=False)  # fmt: skip
    assert len(result.completed()) == 8
    assert all(t.sparsity == pytest.approx(0.6, abs=1e-9) for t in result.trials)


@pytest.mark.parametrize("sampler", ["tpe", "gp", "nsga2", "random"])
def test_each_multi_objective_sampler_finds_a_front(sampler: str) -> None:
    torch.manual_seed(0)
    model = cnn()  # in training mode: evaluate updates the BatchNorm statistics
    evaluate = Fidelity(model, (1, 8, 8))
    saved = snapshot(model)
    result = search(model, evaluate, sampler=sampler, n_trials=10, seed=0,
                    progress=False)  # fmt: skip
    assert_same_state(model, saved)
    sparsities = {round(t.sparsity, 6) for t in result.trials}
    assert len(sparsities) > 5  # sparsity is searched, not fixed
    front = result.pareto()
    assert front and all(0.0 <= t.sparsity <= MAX_RATIO for t in front)


def test_cmaes_refuses_two_objectives() -> None:
    model, evaluate = _mlp()
    with pytest.raises(ValueError, match=r"^sampler: 'cmaes' optimises one objective"):
        search(model, evaluate, sampler="cmaes", n_trials=3, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(evaluate=3), TypeError, r"^evaluate: expected a function"),
        (dict(target_sparsity=1.0), ValueError, r"^target_sparsity: 1.0 is outside"),
        (dict(target_sparsity=0), ValueError, r"^target_sparsity: 0 is outside"),
        (dict(target_sparsity=-0.2), ValueError, r"^target_sparsity"),
        (dict(target_sparsity="0.9"), TypeError, r"^target_sparsity"),
        (dict(n_trials=0), ValueError, r"^n_trials: expected a whole number"),
        (dict(objectives=("speed",)), ValueError, r"^objectives: "),
        (dict(objectives=("sparsity",), target_sparsity=0.5), ValueError, r"^objectives: "),
        (dict(layers="nope*"), ValueError, r"^layers: pattern 'nope\*' matches no layer"),
        (dict(sampler="bayes"), ValueError, r"^sampler: 'bayes' is unknown; choose one of"),
        (dict(method="wanda"), ValueError, r"^example_inputs: method='wanda' and reconstruct"),
        (dict(reconstruct=True), ValueError, r"^example_inputs: method='wanda' and reconstruct"),
        (dict(method="magnitude"), ValueError, r"^method: 'magnitude' is unknown"),
        (dict(granularity="row"), ValueError, r"^granularity: 'row' is unknown"),
        (dict(seed=1.5), TypeError, r"^seed: "),
        (dict(storage=3), TypeError, r"^storage: expected a SQLite file name"),
        (dict(storage="/no/such/dir/s.db"), ValueError, r"^storage: '/no/such/dir/s.db' cannot"),
    ],
)
def test_bad_input_is_one_line_naming_the_argument(kwargs, error, match) -> None:
    model, evaluate = _mlp()
    saved = snapshot(model)
    kwargs = {"evaluate": evaluate, "n_trials": 2, "progress": False, **kwargs}
    with pytest.raises(error, match=match) as info:
        search(model, kwargs.pop("evaluate"), **kwargs)
    assert "\n" not in str(info.value)
    assert_same_state(model, saved)
    assert evaluate.calls == 0


def test_without_optuna_the_error_names_the_extra(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "optuna", None)
    model, evaluate = _mlp()
    with pytest.raises(ImportError, match=r'pip install "nbcompress\[search\]"'):
        search(model, evaluate, n_trials=2, progress=False)


def test_nsga2_population_is_sized_for_the_budget() -> None:
    from nbcompress.engine.search.samplers import make_sampler

    sizes = [make_sampler("nsga2", n, 0, 2)._population_size for n in (12, 60, 90, 300)]
    assert sizes == [10, 10, 15, 20]


def test_numpy_and_tensor_metrics_are_accepted() -> None:
    import numpy as np

    model, fidelity = _mlp()
    for wrap in (np.float32, torch.tensor):
        result = search(model, lambda m, w=wrap: w(fidelity(m)), target_sparsity=0.5,
                        n_trials=3, seed=0, progress=False)  # fmt: skip
        assert len(result.completed()) == 3
        assert isinstance(result.trials[0].metric, float)


_RESUME = """
import json, sys, torch
from nbcompress.engine.search.search import search
from tests.engine.search.search_helpers import Fidelity
from tests.helpers import mlp
torch.manual_seed(0)
model = mlp()
result = search(model, Fidelity(model, (16,)), target_sparsity=0.6, n_trials=int(sys.argv[2]),
                storage=sys.argv[1], seed=int(sys.argv[2]), progress=False)
print(json.dumps([t.ratios for t in result.trials]))
"""


def test_storage_resumes_in_a_new_process(tmp_path) -> None:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": str(root)}
    path = str(tmp_path / "search.db")

    def run(n: int) -> list:
        out = subprocess.run([sys.executable, "-c", _RESUME, path, str(n)], cwd=root, env=env,
                             capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
        return json.loads(out.stdout.strip().splitlines()[-1])

    first = run(3)
    second = run(2)
    assert len(first) == 3 and len(second) == 5 and second[:3] == first


@pytest.mark.parametrize("kwargs", [dict(reconstruct=True), dict(method="wanda")])
def test_trials_prune_with_calibration_inputs_as_applied_and_leave_the_model(kwargs) -> None:
    from nbcompress.engine.core.history import undo_
    from nbcompress.engine.prune.prune import prune_ratios_

    model, evaluate = _mlp()
    before = snapshot(model)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    result = search(model, evaluate, target_sparsity=0.8, n_trials=4, seed=0, progress=False,
                    example_inputs=x, **kwargs)  # fmt: skip
    assert_same_state(model, before)
    best = result.best()
    # The metric of a trial is that of the calibrated pruning, not of plain L1.
    twin = copy.deepcopy(model)
    prune_ratios_(twin, best.ratios, example_inputs=x, **kwargs)
    assert best.metric == evaluate(twin)
    plain = copy.deepcopy(model)
    prune_ratios_(plain, best.ratios)
    assert evaluate(plain) != best.metric
    with pytest.raises(ValueError, match=r"^example_inputs: this search pruned with calibration"):
        result.apply_(model, best)
    assert_same_state(model, before)
    result.apply_(model, best, example_inputs=x)
    assert_same_state(model, snapshot(twin))
    undo_(model)
    assert_same_state(model, before)
