"""``search``: per-layer pruning ratios chosen by measuring whole allocations (optuna)."""

from __future__ import annotations

import contextlib
import json
import numbers
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from torch import nn

from nbcompress.engine.core.distribute import Dispatch, check_workers, resolve_executor
from nbcompress.engine.core.validation import check_module, positive_int
from nbcompress.engine.prune.masks import GRANULARITIES
from nbcompress.engine.search.objectives import DIRECTIONS
from nbcompress.engine.search.result import SearchResult, SearchTrial
from nbcompress.engine.search.run import Runner, collect
from nbcompress.engine.search.samplers import (
    SAMPLERS,
    load_optuna,
    make_sampler,
    open_study,
    population,
)
from nbcompress.engine.search.space import MAX_RATIO, PARAMETERISATION, Space, front_seeds
from nbcompress.engine.search.warm import warm_allocations
from nbcompress.progress import Progress

__all__ = ["OBJECTIVES", "search"]

#: The default objectives: ``evaluate``'s metric and the sparsity of the allocation (the
#: others, ``size`` and ``latency``, are measured on each pruned model: see ``objectives``).
OBJECTIVES = ("metric", "sparsity")
_METHODS = ("l1", "random", "wanda")


def _check_target(target: Any) -> float | None:
    if target is None:
        return None
    if isinstance(target, bool) or not isinstance(target, numbers.Real):
        raise TypeError(f"target_sparsity: expected a number such as 0.9, got {target!r}.")
    if not 0.0 < target <= MAX_RATIO:
        raise ValueError(
            f"target_sparsity: {target!r} is outside (0, {MAX_RATIO}] (every layer keeps at "
            "least 1% of its weights); pass a fraction such as 0.9."
        )
    return float(target)


def _check_objectives(objectives: Any, target: float | None, inputs: Any) -> tuple[str, ...]:
    given = (objectives,) if isinstance(objectives, str) else tuple(objectives)
    unknown = [o for o in given if o not in DIRECTIONS]
    if unknown or not given or len(set(given)) != len(given):
        raise ValueError(
            f"objectives: {objectives!r} is not a list of distinct names from "
            f"{tuple(DIRECTIONS)}; pass e.g. ('metric', 'sparsity')."
        )
    if "latency" in given and inputs is None:
        raise ValueError(
            "example_inputs: the latency objective times the pruned model on a batch; pass "
            "example_inputs=x shaped like real input."
        )
    if target is not None:
        if "metric" not in given:
            raise ValueError(
                "objectives: with target_sparsity every trial has the same sparsity; include "
                "'metric'."
            )
        return tuple(o for o in given if o != "sparsity")  # fixed by the budget
    return given


def _check_reachable(space: Space, target: float | None, granularity: str) -> None:
    """Refuse a budget the granularity cannot reach (every layer keeps a channel/block)."""
    if target is None:
        return
    reach = space.reachable(granularity)
    if target > reach + 1e-9:
        raise ValueError(
            f"target_sparsity: {target:g} cannot be reached with granularity={granularity!r}: "
            f"every searched layer keeps at least one {granularity}, so at most {reach:.3f} "
            "of the weights can go; pass a lower target or granularity='element'."
        )


def _check_calibration(method: Any, reconstruct: Any, example_inputs: Any) -> None:
    if (method == "wanda" or reconstruct) and example_inputs is None:
        raise ValueError(
            "example_inputs: method='wanda' and reconstruct=True prune with calibration inputs; "
            "pass example_inputs=x (a few training batches), as the sensitivity default does."
        )


def _check_options(evaluate: Any, sampler: Any, n_trials: Any, method: Any, granularity: Any,
                   seed: Any, storage: Any) -> None:  # fmt: skip
    if not callable(evaluate):
        raise TypeError(
            f"evaluate: expected a function model -> float (higher is better), got "
            f"{type(evaluate).__name__}."
        )
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: {sampler!r} is unknown; choose one of {SAMPLERS}.")
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"n_trials: expected a whole number of trials >= 1, got {n_trials!r}.")
    if method not in _METHODS:
        raise ValueError(f"method: {method!r} is unknown; choose one of {_METHODS}.")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity: {granularity!r} is unknown; choose one of {GRANULARITIES}.")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed: expected an integer or None, got {seed!r}.")
    if storage is not None and not isinstance(storage, str | Path):
        raise TypeError(
            f"storage: expected a SQLite file name such as 'search.db', got {storage!r}."
        )


@contextlib.contextmanager
def _optuna_quiet() -> Iterator[None]:
    """Keep optuna from logging every trial; the progress bar and the result say what matters."""
    logging = load_optuna().logging
    before = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        logging.set_verbosity(before)


def search(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    *,
    target_sparsity: float | None = None,
    objectives: Sequence[str] = OBJECTIVES,
    sampler: str = "tpe",
    n_trials: int = 60,
    layers: str | Sequence[str] | None = None,
    granularity: str = "element",
    method: str = "l1",
    storage: str | Path | None = None,
    seed: int | None = None,
    warm_start: Any = True,
    progress: bool = True,
    example_inputs: Any = None,
    reconstruct: bool = False,
    callback: Callable[[SearchTrial, int, int], None] | None = None,
    executor: Executor | str | None = None,
    workers: int | None = None,
    batch: int | None = None,
) -> SearchResult:
    """Search per-layer pruning ratios by measuring whole allocations.

    Each trial prunes the model to one allocation with :func:`prune_ratios_`, calls
    ``evaluate(model)`` and restores the model bit-exactly, so nothing leaks between
    trials and the model is as it was afterwards. Apply a chosen allocation with
    :meth:`SearchResult.apply_`.

    With ``target_sparsity``, the sampler proposes one score per layer and the scores are
    projected onto the budget (``keep_i = clip(c * s_i, 0.01, 1)``, ``c`` by bisection), so
    every trial has exactly that sparsity (weighted by weight count over the searched
    layers) and the metric is the one objective; the first two trials are the uniform
    allocation, one global magnitude threshold and the sensitivity suggestion of the
    model's latest sweep (``warm_start``), enqueued as scores. Without it, the share each
    layer keeps is proposed on a log scale over [0.01, 1], the first population being
    global-L1 and uniform allocations spread over sparsities 30-97%, and ``objectives``
    are optimised (the Pareto front).

    Args:
        model: The model; left as it was.
        evaluate: ``evaluate(model) -> float``, higher is better (e.g. validation accuracy).
            A trial where it raises or returns a non-finite value is marked failed. It runs
            in the mode the model is in; everything it changes (fine-tuning, BatchNorm
            statistics) is restored after the trial.
        target_sparsity: Overall sparsity of the searched layers, in (0, 0.99].
        objectives: Names from ``"metric"`` and ``"sparsity"`` (maximised), ``"size"``
            (stored bytes, CSR where smaller; minimised) and ``"latency"`` (measured
            seconds per call on ``example_inputs`` after the decision ``sparsify_`` would
            make; minimised): without a target e.g. ``("metric", "sparsity")`` (the front)
            or ``("metric", "latency")``; with one, ``"metric"`` and optionally
            ``"size"``/``"latency"`` (``"sparsity"`` is fixed by the budget and dropped).
        sampler: ``"tpe"`` (multivariate), ``"gp"`` (Bayesian optimisation), ``"nsga2"``
            (genetic algorithm, population ``max(10, min(20, n_trials // 6))``),
            ``"random"`` or ``"cmaes"`` (one objective; needs ``cmaes``).
        n_trials: Trials to run in this call (the warm-start trials included).
        layers: Glob pattern(s) of the layers to search, as in ``prune_``; the output layer
            is left alone.
        granularity: ``"element"``, ``"block"`` or ``"channel"``.
        method: ``"l1"`` or ``"random"``.
        storage: A SQLite file (or an optuna RDB URL): trials are stored as they finish and
            a later call with the same model and settings resumes the study (other
            settings start another study in the same file; another model is refused).
        seed: Seed of the sampler; the same seed gives the same trials.
        warm_start: Enqueue known allocations first: with a target uniform, global L1 and
            the suggestion of the model's latest sensitivity sweep (or of the
            ``SensitivityResult`` passed here); without one a population spread over
            sparsities. ``False``: the sampler alone.
        progress: Show progress (:class:`~nbcompress.progress.Progress`: a live bar in a
            notebook, lines on stdout elsewhere) with the best metric so far.
        example_inputs: Calibration inputs for ``method="wanda"`` and ``reconstruct``
            (training batches, never the evaluation data), as in :func:`prune_`; the batch
            the ``latency`` objective is timed on.
        reconstruct: Re-fit each trial's kept weights by least squares on
            ``example_inputs`` (what the sensitivity default path applies).
        callback: Called in this process after every finished trial (completed or
            failed) as ``callback(trial, done, total)`` with this call's count of finished
            trials and ``n_trials`` — a live view draws from it. What it raises stops the
            search (the finished trials are kept in the storage; the model is restored).
        executor: Where trials are measured: a ``concurrent.futures.Executor`` (e.g. a
            dask ``Client(...).get_executor()`` or a ``ProcessPoolExecutor``) or a dask
            scheduler address (``"tcp://host:8786"``). The model, ``evaluate`` and the
            calibration inputs are pickled once (cloudpickle: notebook functions travel) and
            sent once per worker; each worker prunes its own copy, so the model here is
            never touched. The sampler stays in this process.
        workers: Start a local dask cluster of this many processes on 127.0.0.1 for the
            call and close it after (a process pool if dask is not installed); 1 or
            ``None`` measures here.
        batch: Trials asked before any is told, measured at once on the workers (default:
            the number of workers; 1 without executor). The same seed and ``batch`` give
            the same trials with or without an executor.

    Returns:
        The trials; ``.interrupted`` is set if Ctrl-C stopped the search (finished trials
        are kept, the model is restored).

    Raises:
        ImportError: optuna is not installed (the ``search`` extra).
        TypeError, ValueError: Bad input (one line naming the argument); the model is
            untouched. ValueError also when every trial failed (naming ``evaluate``), or
            when no dask scheduler answers at ``executor``.
        RuntimeError: A worker died twice while measuring the same trial.
    """
    check_module(model)
    _check_options(evaluate, sampler, n_trials, method, granularity, seed, storage)
    _check_calibration(method, reconstruct, example_inputs)
    _check_scale_out(callback, workers, batch)
    target = _check_target(target_sparsity)
    objs = _check_objectives(objectives, target, example_inputs)
    sweep = _warm_sweep(model, warm_start)
    space = Space.of(model, layers, granularity)
    _check_reachable(space, target, granularity)
    config = [target, objs, method, granularity, bool(reconstruct), PARAMETERISATION]
    notes: list[str] = []
    with _optuna_quiet():
        study = open_study(
            storage,
            space.signature(),
            _short_hash(json.dumps(config)),
            sampler=make_sampler(sampler, n_trials, seed, len(objs)),
            directions=[DIRECTIONS[o] for o in objs],
        )
        opts = dict(method=method, granularity=granularity, example_inputs=example_inputs,
                    reconstruct=bool(reconstruct))  # fmt: skip
        runner = Runner(model, evaluate, space, target, objs, opts)
        runner.remember(study)
        if warm_start is not False and not study.trials:
            notes += _enqueue_warm_start(study, model, space, target, n_trials, sweep)
        with resolve_executor(executor, workers) as where, Dispatch(where, runner.bench) as on:
            runner.dispatch = on
            size = on.workers if batch is None else batch
            interrupted = _run(runner, study, n_trials, size, progress, callback)
    if not interrupted and runner.failed and not runner.completed:
        raise ValueError(
            f"evaluate: failed on every trial ({runner.failed}); the first error was "
            f"{runner.first_error}. Fix evaluate (try evaluate(model) on its own)."
        )
    return SearchResult(
        trials=collect(study, space),
        target_sparsity=target,
        sampler=sampler,
        method=method,
        granularity=granularity,
        reconstruct=bool(reconstruct),
        interrupted=interrupted,
        study_name=study.study_name,
        notes=notes,
    )


def _warm_sweep(model: nn.Module, warm_start: Any) -> Any:
    """The sensitivity result whose suggestion starts the search, or None."""
    from nbcompress.engine.sensitivity.registry import latest
    from nbcompress.engine.sensitivity.result import SensitivityResult

    if isinstance(warm_start, SensitivityResult):
        return warm_start
    if not isinstance(warm_start, bool):
        raise TypeError(
            f"warm_start: expected True, False or a SensitivityResult of this model, got "
            f"{type(warm_start).__name__}."
        )
    return latest(model) if warm_start else None


def _check_scale_out(callback: Any, workers: Any, batch: Any) -> None:
    if callback is not None and not callable(callback):
        raise TypeError(
            f"callback: expected a function (trial, done, total) -> None, got "
            f"{type(callback).__name__}."
        )
    check_workers(workers)
    if batch is not None:
        positive_int(batch, "batch", "batch=2 (trials measured at once)")


def _short_hash(text: str) -> str:
    import hashlib

    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _enqueue_warm_start(study: Any, model: nn.Module, space: Space, target: float | None,
                        n_trials: int, sweep: Any) -> list[str]:  # fmt: skip
    """Enqueue the first trials; the note saying which.

    With a target: uniform, global L1 and the sensitivity suggestion (of ``sweep``), as
    scores whose projection is themselves. Without: one population of global-L1 and
    uniform allocations spread over sparsities 0.3-0.97 (:func:`front_seeds`), which lifted
    NSGA-II's 60-trial front from 0.93 to 0.99 of a 300-trial one on LeNet.
    """
    if target is None:
        seeds = front_seeds(model, space, min(population(n_trials), n_trials))
        for params in seeds:
            study.enqueue_trial(params, skip_if_exists=True)
        return [f"First trials: {len(seeds)} global-L1 and uniform allocations at sparsities "
                "30%-97%."]  # fmt: skip
    found = warm_allocations(model, space, target, sweep)
    for _, params in found:
        study.enqueue_trial(params, skip_if_exists=True)
    labels = [label for label, _ in found]
    if sweep is not None and "sensitivity suggestion" not in labels:
        labels.append(
            "no sensitivity suggestion (the sweep covers none of the searched layers "
            "or cannot reach the target)"
        )
    return ["First trials: " + ", ".join(labels) + "."]


def _run(runner: Runner, study: Any, n_trials: int, batch: int, progress: bool,
         callback: Callable[[SearchTrial, int, int], None] | None = None) -> bool:  # fmt: skip
    """Run ``n_trials`` trials, ``batch`` at a time; True if Ctrl-C stopped them."""
    bar = Progress(n_trials, "search", "trial", enabled=progress)
    done = 0
    try:
        while done < n_trials:
            with contextlib.closing(runner.batch(study, min(batch, n_trials - done))) as told:
                for finished in told:
                    done += 1
                    if callback is not None:
                        callback(finished, done, n_trials)
                    best = runner.best_metric()
                    bar.update(note="" if best is None else f"best metric {best:.4g}")
    except KeyboardInterrupt:
        return True
    finally:
        bar.close()
    return False
