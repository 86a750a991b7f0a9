"""NSGA-II's population for a budget and the kept one-thread limit around samplers."""

from __future__ import annotations

import sys
import types

import pytest

from nbcompress.engine.search import samplers
from nbcompress.engine.search.samplers import make_sampler, one_thread, population

threadpoolctl = pytest.importorskip("threadpoolctl")
pytest.importorskip("optuna")


@pytest.mark.parametrize(("n_trials", "size"), [(1, 10), (60, 10), (90, 15), (120, 20), (300, 20)])
def test_population_is_sized_for_the_budget(n_trials: int, size: int) -> None:
    assert population(n_trials) == size
    assert make_sampler("nsga2", n_trials, 0, 2)._population_size == size


def _blas_threads() -> list[int]:
    return [lib["num_threads"] for lib in threadpoolctl.threadpool_info()]


def test_one_thread_limits_the_libraries_inside_and_restores_them() -> None:
    with threadpoolctl.threadpool_limits(2):  # a known outside state, even on one core
        before = _blas_threads()
        assert before, "no BLAS/OpenMP library loaded: the test would prove nothing"
        with one_thread():
            assert set(_blas_threads()) == {1}
        assert _blas_threads() == before


def test_the_controller_is_kept_until_a_module_is_imported(monkeypatch) -> None:
    with one_thread():
        pass
    kept = samplers._Controller.controller
    with one_thread():
        pass
    assert samplers._Controller.controller is kept
    monkeypatch.setitem(sys.modules, "nbcompress_test_fresh_import", types.ModuleType("x"))
    with one_thread():
        pass
    assert samplers._Controller.controller is not kept


def test_without_threadpoolctl_nothing_is_limited(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # import fails
    with one_thread():
        entered = True
    assert entered
