"""Dispatch and resolve_executor without dask: in this process and on process pools."""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from nbcompress.engine.core.distribute import Dispatch, process_pool, resolve_executor
from tests.engine.distribute import distribute_helpers as h
from tests.helpers import bits, mlp


@pytest.fixture(scope="module")
def pool():
    with process_pool(2) as started:
        yield started


def _user_pool(workers: int = 2) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"))


def _enter(executor, workers=None):
    with resolve_executor(executor, workers) as resolved:
        return resolved


def _results(dispatch: Dispatch, fn, items) -> list:
    return [r for _, r in sorted(dispatch.run(fn, items), key=lambda p: p[0])]


def test_without_executor_items_run_here_in_order_on_the_live_state() -> None:
    state: list[int] = []
    with Dispatch(None, state) as dispatch:
        assert dispatch.workers == 1
        assert list(dispatch.run(h.append_item, [7, 8, 9])) == [(0, 1), (1, 2), (2, 3)]
    assert state == [7, 8, 9]


def test_pool_results_are_bit_identical_to_serial(pool) -> None:
    model, x = mlp(), torch.randn(16, 16)
    serial = _results(Dispatch(None, (model, x)), h.forward, range(6))
    with Dispatch(pool, (model, x)) as dispatch:
        assert dispatch.workers == 2
        pooled = _results(dispatch, h.forward, range(6))
    with _user_pool(3) as user, Dispatch(user, (model, x)) as dispatch:
        assert dispatch.workers == 3
        theirs = _results(dispatch, h.forward, range(6))
    for a, b, c in zip(serial, pooled, theirs):
        assert torch.equal(bits(a), bits(b)) and torch.equal(bits(a), bits(c))


def test_the_state_is_unpickled_once_per_worker_process(pool) -> None:
    with Dispatch(pool, {"weights": torch.randn(1000)}) as dispatch:
        answers = _results(dispatch, h.where, range(10))
    loads: dict[int, list[int]] = {}
    for pid, count in answers:
        loads.setdefault(pid, []).append(count)
    assert 1 <= len(loads) <= 2
    # Every answer of one worker saw the same count: the state was unpickled there once.
    assert all(len(set(counts)) == 1 for counts in loads.values())


def test_a_locally_defined_class_and_closure_travel_by_value(pool) -> None:
    class Scaled(torch.nn.Module):  # as if defined in a notebook cell
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(3.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale

    Scaled.__module__, Scaled.__qualname__ = "__main__", "Scaled"
    net, offset = Scaled(), 0.5

    def evaluate(item: int) -> float:
        return float(net(torch.tensor(float(item)))) + offset

    with Dispatch(pool, evaluate) as dispatch:
        assert _results(dispatch, h.call_state, [1, 2]) == [3.5, 6.5]


def test_an_exception_raised_by_fn_comes_back_as_itself(pool) -> None:
    for executor in (None, pool):
        with Dispatch(executor, None) as dispatch:
            results = _results(dispatch, h.fail_on_two, range(4))
        assert results[:2] == [0, 1] and results[3] == 3
        assert type(results[2]) is ValueError and str(results[2]) == "bad item 2"


def test_a_dead_worker_is_reported_and_its_item_retried_once(tmp_path, capsys) -> None:
    for name, executor in (("ours", process_pool(2)), ("theirs", _user_pool())):
        folder = tmp_path / name
        folder.mkdir()
        with executor as ex, Dispatch(ex, str(folder)) as dispatch:
            assert _results(dispatch, h.die_once, range(6)) == [0, 10, 20, 30, 40, 50]
        assert (folder / "died").exists()
        assert "evaluate: a worker died during item 2; retrying it once" in capsys.readouterr().out


def test_a_second_death_of_the_same_item_is_an_error_naming_it(tmp_path) -> None:
    died_twice = r"^score: a worker died twice during item 1 "
    with process_pool(2) as ex, Dispatch(ex, str(tmp_path), what="score") as dispatch:
        pytest.raises(RuntimeError, list, dispatch.run(h.die_always, range(3))).match(died_twice)


def test_stopping_the_run_cancels_the_items_not_started(pool, tmp_path) -> None:
    dispatch = Dispatch(pool, str(tmp_path))
    results = dispatch.run(h.slow_mark, range(12))
    with pytest.raises(KeyboardInterrupt), contextlib.closing(results):
        for _ in results:
            raise KeyboardInterrupt  # Ctrl-C while the caller handles the first result
    dispatch.close()
    with Dispatch(pool, None) as flush:  # wait until the pool has finished what it started
        list(flush.run(h.fail_on_two, [0, 1]))
    ran = list(tmp_path.glob("ran-*"))
    assert 1 <= len(ran) <= 4  # the window of two (and one each finishing meanwhile)


def test_workers_one_or_none_means_this_process() -> None:
    for workers in (None, 1):
        with resolve_executor(None, workers) as executor:
            assert executor is None


@pytest.mark.parametrize("workers", [0, -1, 2.5, True, "2"])
def test_bad_workers_is_one_line_naming_it(workers) -> None:
    with pytest.raises(ValueError, match=r"^workers: .* e\.g\. workers=2") as err:
        _enter(None, workers)
    assert "\n" not in str(err.value)


def test_executor_and_workers_together_or_a_wrong_executor_are_refused(pool) -> None:
    with pytest.raises(ValueError, match="^workers: pass either"):
        _enter(pool, 2)
    with pytest.raises(TypeError, match="^executor: expected"):
        _enter(3)
    assert _enter(pool) is pool


def test_a_state_that_cannot_be_pickled_is_one_line(pool) -> None:
    with pytest.raises(TypeError, match=r"^evaluate: the model and data cannot be sent") as err:
        Dispatch(pool, threading.Lock())
    assert "\n" not in str(err.value)
