"""search(executor=, workers=, batch=): the same trials as in this process, model untouched."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from nbcompress.engine.core.history import history_token
from nbcompress.engine.search.search import search
from tests.engine.search.search_helpers import Fidelity
from tests.helpers import assert_same_state, mlp, snapshot

pytest.importorskip("optuna")


@pytest.fixture(scope="module")
def pool():
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(2, mp_context=context) as started:
        yield started


def _mlp() -> tuple[torch.nn.Module, Fidelity]:
    torch.manual_seed(0)
    model = mlp()
    return model, Fidelity(model, (16,))


def _same(a, b) -> None:
    assert [(t.number, t.state, t.ratios, t.metric, t.error) for t in a.trials] == [
        (t.number, t.state, t.ratios, t.metric, t.error) for t in b.trials
    ]


def _fails_when_first_layer_is_sparse(model: torch.nn.Module) -> float:
    # Decided by the pruned model, not by a call count: the same on every worker.
    if float((model[0].weight == 0).float().mean()) > 0.6:
        raise RuntimeError("too sparse\nsecond line")
    with torch.no_grad():
        return float(model(torch.ones(4, 16)).sum())


def test_serial_pool_and_dask_give_bit_identical_trials_and_leave_the_model() -> None:
    if os.environ.get("REQUIRE_DASK") != "1":  # CI sets it: there a missing dask fails
        pytest.importorskip("distributed")
    model, evaluate = _mlp()
    saved, token = snapshot(model), history_token(model)
    kw = dict(target_sparsity=0.7, n_trials=8, seed=0, progress=False, batch=2)
    serial = search(model, evaluate, **kw)
    assert evaluate.calls == 8
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(2, mp_context=context) as executor:
        pooled = search(model, evaluate, executor=executor, **kw)
    clustered = search(model, evaluate, workers=2, **kw)  # a real LocalCluster, closed after
    assert evaluate.calls == 8  # the workers measured their own copies
    _same(serial, pooled)
    _same(serial, clustered)
    assert len(serial.completed()) == 8
    assert_same_state(model, saved)
    assert history_token(model) == token


def test_batches_of_one_are_the_serial_search(pool) -> None:
    model, evaluate = _mlp()
    kw = dict(target_sparsity=0.5, n_trials=5, seed=3, progress=False)
    _same(search(model, evaluate, **kw), search(model, evaluate, executor=pool, batch=1, **kw))


def test_failing_trials_fail_on_workers_as_here(pool) -> None:
    model, _ = _mlp()
    saved = snapshot(model)
    kw = dict(n_trials=8, seed=0, progress=False, batch=2, sampler="random")
    here = search(model, _fails_when_first_layer_is_sparse, **kw)
    there = search(model, _fails_when_first_layer_is_sparse, executor=pool, **kw)
    _same(here, there)
    failed = [t for t in there.trials if t.state == "fail"]
    assert failed and failed[0].error == "RuntimeError: too sparse"
    assert there.completed()
    assert_same_state(model, saved)


def test_every_trial_failing_on_workers_is_the_same_one_line_error(pool) -> None:
    model, _ = _mlp()

    def broken(m: torch.nn.Module) -> float:
        raise KeyError("labels")

    with pytest.raises(ValueError, match=r"^evaluate: failed on every trial \(4\).*KeyError"):
        search(model, broken, target_sparsity=0.5, n_trials=4, progress=False, executor=pool)


def test_a_duplicate_in_a_batch_is_measured_once(pool, tmp_path) -> None:
    model, fidelity = _mlp()

    def counted(m: torch.nn.Module) -> float:
        (tmp_path / f"call-{len(list(tmp_path.iterdir()))}").touch()
        return fidelity(m)

    # One searched layer: every projected trial is the same allocation.
    kw = dict(target_sparsity=0.5, layers="0", n_trials=6, seed=0, progress=False)
    result = search(model, counted, executor=pool, batch=3, **kw)
    assert len(list(tmp_path.iterdir())) == 1
    assert len(result.completed()) == 6
    assert len({t.metric for t in result.trials}) == 1


def test_ctrl_c_during_a_batch_keeps_the_finished_trials(pool) -> None:
    model, evaluate = _mlp()
    saved = snapshot(model)
    seen = []

    def stop_after_three(trial, done, total) -> None:
        seen.append(trial)
        if done == 3:
            raise KeyboardInterrupt

    result = search(model, evaluate, target_sparsity=0.5, n_trials=10, seed=0, progress=False,
                    executor=pool, batch=2, callback=stop_after_three)  # fmt: skip
    assert result.interrupted
    assert len(result.completed()) >= 3
    assert [t.number for t in result.completed()][:3] == [t.number for t in seen]
    assert len(result.trials) == 4  # nothing asked after the batch that was stopped
    assert_same_state(model, saved)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch=0), r"^batch: 0 is not a whole number >= 1"),
        (dict(batch=2.5), r"^batch: "),
        (dict(workers=0), r"^workers: 0 is not a whole number >= 1"),
        (dict(workers=True), r"^workers: "),
        (dict(workers=-1), r"^workers: "),
        (dict(workers=2.5), r"^workers: "),
    ],
)
def test_bad_scale_out_options_are_one_line(kwargs, match) -> None:
    model, evaluate = _mlp()
    saved = snapshot(model)
    with pytest.raises(ValueError, match=match) as err:
        search(model, evaluate, target_sparsity=0.5, n_trials=2, progress=False, **kwargs)
    assert "\n" not in str(err.value)
    assert_same_state(model, saved)
    assert evaluate.calls == 0


def test_workers_one_runs_here_on_the_live_model() -> None:
    model, evaluate = _mlp()
    result = search(model, evaluate, target_sparsity=0.5, n_trials=3, seed=0, progress=False,
                    workers=1)  # fmt: skip
    assert evaluate.calls == 3 and len(result.completed()) == 3


def test_a_worker_that_dies_is_named_by_its_trial_and_retried_once(tmp_path, capsys) -> None:
    from nbcompress.engine.core.distribute import process_pool

    model, fidelity = _mlp()
    marker = tmp_path / "died"

    def dies_once(m: torch.nn.Module) -> float:
        if not marker.exists():
            marker.touch()
            os._exit(1)  # the worker process dies in the middle of trial 0 (or 1)
        return fidelity(m)

    kw = dict(target_sparsity=0.5, n_trials=4, seed=0, progress=False, batch=2)
    with process_pool(2) as executor:
        result = search(model, dies_once, executor=executor, **kw)
    _same(result, search(model, fidelity, **kw))
    assert marker.exists()
    assert "evaluate: a worker died during trial " in capsys.readouterr().out
