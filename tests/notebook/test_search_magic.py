import sys

import pytest
import torch
from IPython.core.error import UsageError

from nbcompress import history
from nbcompress.engine.search.result import SearchResult
from tests.engine.search.search_helpers import Fidelity
from tests.helpers import assert_refused, assert_same_state, mlp, snapshot


@pytest.fixture
def ns(shell):
    torch.manual_seed(0)
    model = mlp()
    shell.user_ns.update(model=model, evaluate=Fidelity(model, (16,)), torch=torch)
    return shell


def magic(shell, line):
    return shell.run_line_magic("search", line)


def test_search_meets_the_target_in_every_trial_and_leaves_the_model_as_it_was(ns, capsys):
    model = ns.user_ns["model"]
    before = snapshot(model)
    result = magic(ns, "model --eval evaluate --target-sparsity 0.8 --trials 6 --seed 0")
    assert isinstance(result, SearchResult) and len(result.trials) == 6
    assert all(t.sparsity == pytest.approx(0.8, abs=1e-6) for t in result.trials)
    assert_same_state(model, before)
    assert len(history(model)) == 0
    assert "0.8" in capsys.readouterr().out  # the table is printed


def test_options_reach_the_engine_and_the_same_seed_gives_the_same_trials(ns):
    line = "model --eval evaluate --target-sparsity 0.7 --trials 5 --sampler random --seed 3"
    a, b = magic(ns, line), magic(ns, line)
    assert [t.ratios for t in a.trials] == [t.ratios for t in b.trials]
    c = magic(ns, line + " --layers 0 --no-warm-start")
    assert all(set(t.ratios) == {"0"} for t in c.trials)


def test_best_allocation_is_applied_and_undone(ns):
    model = ns.user_ns["model"]
    before = snapshot(model)
    result = magic(ns, "model --eval evaluate --target-sparsity 0.6 --trials 4 --seed 0")
    result.apply_(model, result.best())
    assert float((model[0].weight == 0).float().mean()) > 0
    ns.run_line_magic("undo", "model")
    assert_same_state(model, before)


@pytest.mark.parametrize(
    "line, match",
    [
        ("model", r"^--eval: missing"),
        ("model --eval nope", r"^--eval: 'nope' is not defined"),
        ("model --eval evaluate --sampler anneal", r"^--sampler: 'anneal'"),
        ("model --eval evaluate --target-sparsity 1.5", r"^--target-sparsity: "),
        ("model --eval evaluate --trials 0", r"--trials 60"),
        ("model --eval evaluate --layers nope", r"^--layers: pattern 'nope'"),
        ("model --eval evaluate --reconstruct", r"^--input: method='wanda' and reconstruct"),
        ("model --eval evaluate --method wanda", r"^--input: method='wanda' and reconstruct"),
        ("torch --eval evaluate", r"^model: 'torch' is a module, not a torch\.nn\.Module"),
    ],
)
def test_bad_options_are_one_usage_error_line_and_the_model_is_untouched(ns, line, match):
    assert_refused(ns, "search", line, match)


def test_an_evaluate_that_always_raises_is_named(ns):
    def broken(model):
        raise RuntimeError("no data")

    ns.user_ns["broken"] = broken
    before = snapshot(ns.user_ns["model"])
    with pytest.raises(UsageError, match=r"^--eval: .*no data"):
        magic(ns, "model --eval broken --target-sparsity 0.5 --trials 3")
    assert_same_state(ns.user_ns["model"], before)


def test_without_optuna_the_magic_says_which_extra_to_install(ns, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(UsageError, match=r'^%search: .*pip install "nbcompress\[search\]"'):
        magic(ns, "model --eval evaluate --target-sparsity 0.5 --trials 2")


def test_reconstruct_with_calibration_inputs_reaches_every_trial(ns):
    from nbcompress.engine.prune.prune import prune_ratios_

    model = ns.user_ns["model"]
    ns.user_ns["xcal"] = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    before = snapshot(model)
    result = magic(ns, "model --eval evaluate --target-sparsity 0.8 --trials 3 --seed 0 "
                   "--reconstruct --input xcal")  # fmt: skip
    assert result.reconstruct and len(result.trials) == 3
    assert_same_state(model, before)
    prune_ratios_(model, result.best().ratios, example_inputs=ns.user_ns["xcal"], reconstruct=True)
    assert result.best().metric == ns.user_ns["evaluate"](model)


def test_executor_names_a_pool_in_the_namespace_and_the_model_is_left(ns):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    model, evaluate = ns.user_ns["model"], ns.user_ns["evaluate"]
    before = snapshot(model)
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("forkserver")) as pool:
        ns.user_ns["pool"] = pool
        result = magic(ns, "model --eval evaluate --target-sparsity 0.7 --trials 4 --seed 0 "
                       "--executor pool")  # fmt: skip
    assert len(result.completed()) == 4
    assert evaluate.calls == 0  # measured on the workers' copies
    assert_same_state(model, before)


def test_workers_starts_a_cluster_for_the_call_and_says_so(ns, monkeypatch, capsys):
    from nbcompress.engine.core import cluster

    monkeypatch.setattr(cluster, "_dask", lambda: None)  # the no-dask fallback: a process pool
    model = ns.user_ns["model"]
    before = snapshot(model)
    result = magic(ns, "model --eval evaluate --target-sparsity 0.7 --trials 4 --workers 2")
    assert len(result.completed()) == 4 and ns.user_ns["evaluate"].calls == 0
    assert "using a pool of 2 processes" in capsys.readouterr().out
    assert_same_state(model, before)


def _free_address() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize(
    "option, match",
    [
        ("--workers 0", r"--workers 2"),
        ("--workers two", r"--workers: invalid int value"),
        ("--executor nope", r"^--executor: 'nope' is not defined"),
        ("--executor evaluate", r"^--executor: expected a concurrent\.futures\.Executor"),
        ("--executor pool --workers 2", r"^--workers: pass either"),
    ],
)
def test_bad_scale_out_options_are_one_usage_error_line(ns, option, match):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        ns.user_ns["pool"] = pool
        assert_refused(ns, "search", f"model --eval evaluate --target-sparsity 0.5 {option}", match)


def test_an_executor_address_that_does_not_answer_is_one_usage_error_line(ns):
    pytest.importorskip("distributed")
    address = _free_address()
    line = f"model --eval evaluate --target-sparsity 0.5 --executor {address}"
    assert_refused(ns, "search", line, f"^--executor: no dask scheduler answers at {address}")
