"""One search: ask the sampler, prune on a restored model, measure, tell; memoised.

Trials are asked in batches and measured here or on an executor's workers
(:class:`~nbcompress.engine.core.distribute.Dispatch`); the same batches give the same study.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nbcompress.engine.core.distribute import Dispatch
from nbcompress.engine.core.history import trial as temporary
from nbcompress.engine.prune.prune import prune_ratios_
from nbcompress.engine.search.objectives import MEASURED, measure_extras
from nbcompress.engine.search.result import SearchTrial
from nbcompress.engine.search.samplers import one_thread
from nbcompress.engine.search.space import Space, suggest_ratios

__all__ = ["Bench", "Runner", "measure", "quiet_threads"]


class _Failed(Exception):
    """``evaluate`` failed on one trial (the message is one line)."""


@contextlib.contextmanager
def quiet_threads(enabled: bool = True) -> Iterator[None]:
    """One BLAS/OpenMP thread around the sampler: GP otherwise oversubscribes the cores.

    A kept threadpoolctl controller (:func:`~nbcompress.engine.search.samplers.one_thread`)
    costs about 0.01 ms, so every sampler runs under it (``threadpool_limits`` looked the
    libraries up on every use: 0.7-3 ms, as much as a TPE trial).
    """
    if not enabled:
        yield
        return
    with one_thread():
        yield


@dataclass
class Bench:
    """What every trial needs besides its ratios; shipped once to each worker."""

    model: nn.Module
    evaluate: Callable[[nn.Module], float]
    names: tuple[str, ...]
    prune_opts: dict[str, Any]
    #: Objectives measured on the pruned model besides the metric (``size``, ``latency``).
    extras: tuple[str, ...] = ()
    #: A batch shaped like real input, for the ``latency`` objective.
    inputs: Any = None


def measure(bench: Bench, ratios: list[float]) -> dict[str, float]:
    """``evaluate`` on the model pruned to ``ratios``, then restored bit-exactly.

    The one measuring step of a search, run here or on a worker (on its copy of the
    model). The ``size``/``latency`` objectives are measured on the pruned model before
    ``evaluate`` runs (it may fine-tune). A failure of ``evaluate`` (or a non-finite
    metric) raises ``_Failed`` with one line.

    Returns:
        ``{"metric": …}`` and each of ``bench.extras``.
    """
    named = {n: r for n, r in zip(bench.names, ratios) if r > 0}
    try:
        with temporary(bench.model) as guard:
            # Everything, not only the pruned weights: evaluate may fine-tune or update
            # BatchNorm statistics, and nothing may leak into the next trial.
            guard.save(bench.model, recurse=True)
            if named:
                prune_ratios_(bench.model, named, **bench.prune_opts)
            found = measure_extras(bench.model, bench.extras, bench.names, bench.inputs)
            value = bench.evaluate(bench.model)
    except Exception as err:  # noqa: BLE001 - a failing trial is recorded, not fatal
        raise _Failed(f"{type(err).__name__}: {err}".splitlines()[0]) from err
    return {"metric": _as_metric(value), **found}


@dataclass
class _Asked:
    """A trial asked in a batch, until it is told."""

    trial: Any
    ratios: list[float]
    sparsity: float
    key: tuple[float, ...]
    hit: bool = True  # measured earlier (memo or the same batch), not for this trial


class Runner:
    """Runs the trials of one study on one model; every trial on a restored model.

    Trials are asked in batches, measured through ``dispatch`` (in this process on the
    live model, or on workers' copies) and told in trial order, so a batch gives the same
    study whether it is measured here or on an executor.
    """

    def __init__(
        self,
        model: nn.Module,
        evaluate: Callable[[nn.Module], float],
        space: Space,
        target: float | None,
        objectives: tuple[str, ...],
        prune_opts: dict[str, Any],
    ) -> None:
        self.space, self.target, self.objectives = space, target, objectives
        extras = tuple(o for o in objectives if o in MEASURED)
        inputs = prune_opts.get("example_inputs")
        self.bench = Bench(model, evaluate, space.names, prune_opts, extras, inputs)
        self.dispatch = Dispatch(None, self.bench)
        self.memo: dict[tuple[float, ...], dict[str, float]] = {}
        self.first_error: str | None = None
        self.completed = self.failed = 0
        self.limit_threads = True  # cheap with a kept controller; GP needs it

    def propose(self, trial: Any) -> list[float]:
        """The trial's ratios (:func:`~nbcompress.engine.search.space.suggest_ratios`)."""
        return suggest_ratios(trial, self.space, self.target)

    def remember(self, study: Any) -> None:
        """Fill the memo from a resumed study's completed trials."""
        for t in study.trials:
            attrs = t.user_attrs
            if t.state.name == "COMPLETE" and "ratios" in attrs:
                keys = ("metric", *self.bench.extras)
                self.memo[_key(attrs["ratios"])] = {k: attrs[k] for k in keys if k in attrs}

    def best_metric(self) -> float | None:
        """The highest metric measured so far (for the progress bar)."""
        return max((v["metric"] for v in self.memo.values()), default=None)

    def values(self, outcome: dict[str, float], sparsity: float) -> list[float]:
        """The objective values told to the study, in ``objectives`` order."""
        return [sparsity if o == "sparsity" else outcome[o] for o in self.objectives]

    def ask(self, study: Any, count: int) -> list[_Asked]:
        """Ask ``count`` trials and propose their ratios (nothing is told in between)."""
        trials: list[Any] = []
        proposals: list[list[float]] = []
        try:
            with quiet_threads(self.limit_threads):
                for _ in range(count):
                    trials.append(study.ask())
                    proposals.append(self.propose(trials[-1]))
        except BaseException:
            for trial in trials:
                _tell_failed(study, trial)
            raise
        asked = []
        for trial, ratios in zip(trials, proposals):
            asked.append(_Asked(trial, ratios, self.space.sparsity(ratios), _key(ratios)))
            trial.set_user_attr("ratios", ratios)
            trial.set_user_attr("sparsity", asked[-1].sparsity)
        return asked

    def batch(self, study: Any, count: int) -> Iterator[SearchTrial]:
        """Ask ``count`` trials, measure the new allocations, tell each trial in order.

        Yields each finished trial as soon as it and every trial before it are measured.
        A Ctrl-C (or closing the iterator) tells the measured trials and fails the others.
        """
        asked = self.ask(study, count)
        found: dict[tuple[float, ...], Any] = {}
        todo: dict[tuple[float, ...], _Asked] = {}
        for a in asked:
            if a.key in self.memo:
                found[a.key] = self.memo[a.key]
            elif a.key not in todo:  # a duplicate in the batch is measured once
                todo[a.key], a.hit = a, False
        keys, told = list(todo), 0
        try:
            ratios = [a.ratios for a in todo.values()]
            labels = [f"trial {a.trial.number}" for a in todo.values()]
            with contextlib.closing(self.dispatch.run(measure, ratios, labels=labels)) as runs:
                # A last pass with no result tells trials that need none (memo hits).
                for index, outcome in itertools.chain(runs, [(None, None)]):
                    if index is not None:
                        found[keys[index]] = outcome
                    while told < len(asked) and asked[told].key in found:
                        finished = self.tell(study, asked[told], found[asked[told].key])
                        told += 1
                        yield finished
        except BaseException:
            for a in asked[told:]:
                with contextlib.suppress(Exception):  # already told (Ctrl-C inside tell)
                    if a.key in found:
                        self.tell(study, a, found[a.key])
                    else:
                        _tell_failed(study, a.trial)
            raise

    def tell(self, study: Any, asked: _Asked, outcome: Any) -> SearchTrial:
        """Tell one trial its metric (or its failure) and record it."""
        trial, ratios, sparsity = asked.trial, asked.ratios, asked.sparsity
        if isinstance(outcome, BaseException):
            error = str(outcome) if isinstance(outcome, _Failed) else _one_line(outcome)
            self.failed += 1
            self.first_error = self.first_error or error
            trial.set_user_attr("error", error)
            _tell_failed(study, trial)
            return self.record(trial.number, ratios, sparsity, None, error)
        self.memo[asked.key] = outcome
        for name, value in outcome.items():
            trial.set_user_attr(name, value)
        trial.set_user_attr("memo", asked.hit)
        with quiet_threads(self.limit_threads):
            study.tell(trial, self.values(outcome, sparsity))
        self.completed += 1
        return self.record(trial.number, ratios, sparsity, outcome)

    def record(
        self,
        number: int,
        ratios: list[float],
        sparsity: float,
        outcome: dict[str, float] | None,
        error: str | None = None,
    ) -> SearchTrial:
        """One finished trial as the :class:`SearchTrial` the result will hold."""
        got = outcome or {}
        return SearchTrial(
            number=number,
            ratios=dict(zip(self.space.names, ratios)),
            metric=got.get("metric"),
            sparsity=sparsity,
            state="complete" if error is None else "fail",
            error=error,
            **{k: got.get(k) for k in MEASURED},
        )


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0]


def _as_metric(value: Any) -> float:
    """A number (Python, NumPy or a one-element tensor) as a finite float, else a failure."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if real and math.isfinite(value):
        return float(value)
    raise _Failed(f"evaluate returned {value!r}; return a finite float")


def _tell_failed(study: Any, optuna_trial: Any) -> None:
    from optuna.trial import TrialState

    with contextlib.suppress(Exception):  # already told (e.g. Ctrl-C inside tell)
        study.tell(optuna_trial, state=TrialState.FAIL)


def _key(ratios: list[float]) -> tuple[float, ...]:
    # Rounded: proposals equal to 1e-6 prune the same weights (and NSGA-II repeats exactly).
    return tuple(round(r, 6) for r in ratios)


def collect(study: Any, space: Space) -> list[SearchTrial]:
    """The study's trials as :class:`SearchTrial` records, in order."""
    found = []
    for t in study.trials:
        attrs = t.user_attrs
        if "ratios" not in attrs:
            continue
        found.append(
            SearchTrial(
                number=t.number,
                ratios=dict(zip(space.names, attrs["ratios"])),
                metric=attrs.get("metric") if t.state.name == "COMPLETE" else None,
                sparsity=attrs["sparsity"],
                state=t.state.name.lower(),
                error=attrs.get("error"),
                **{k: attrs.get(k) for k in MEASURED},
            )
        )
    return found
