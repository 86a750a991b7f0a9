"""One search: ask the sampler, prune on a restored model, measure, tell; memoised."""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from nbcompress.engine.core.history import trial as temporary
from nbcompress.engine.prune.prune import prune_ratios_
from nbcompress.engine.search.result import SearchTrial
from nbcompress.engine.search.space import MAX_RATIO, MIN_KEEP, Space, project

__all__ = ["Runner", "quiet_threads"]


class _Failed(Exception):
    """``evaluate`` failed on one trial (the message is one line)."""


@contextlib.contextmanager
def quiet_threads(enabled: bool = True) -> Iterator[None]:
    """One BLAS/OpenMP thread around the sampler: GP otherwise oversubscribes the cores.

    Setting the limit costs about 0.7 ms (threadpoolctl looks up the loaded libraries), so
    it is only worth it around a sampler that does linear algebra (GP: 20-60 ms a trial).
    """
    if not enabled:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # threadpoolctl missing: samplers run with their default threads
        yield
        return
    with threadpool_limits(1):
        yield


class Runner:
    """Runs the trials of one study on one model; every trial on a restored model."""

    def __init__(
        self,
        model: nn.Module,
        evaluate: Callable[[nn.Module], float],
        space: Space,
        target: float | None,
        objectives: tuple[str, ...],
        prune_opts: dict[str, Any],
    ) -> None:
        self.model, self.evaluate, self.space = model, evaluate, space
        self.target, self.objectives, self.prune_opts = target, objectives, prune_opts
        self.memo: dict[tuple[float, ...], float] = {}
        self.first_error: str | None = None
        self.completed = self.failed = 0
        self.limit_threads = False

    def propose(self, trial: Any) -> list[float]:
        """The trial's ratios: projected scores with a target, direct ratios without."""
        if self.target is None:
            return [trial.suggest_float(n, 0.0, MAX_RATIO) for n in self.space.names]
        scores = [trial.suggest_float(n, MIN_KEEP, 1.0) for n in self.space.names]
        return project(scores, self.space.counts, self.target)

    def remember(self, study: Any) -> None:
        """Fill the memo from a resumed study's completed trials."""
        for t in study.trials:
            if t.state.name == "COMPLETE" and "ratios" in t.user_attrs:
                self.memo[_key(t.user_attrs["ratios"])] = t.user_attrs["metric"]

    def measure(self, ratios: list[float]) -> tuple[float, bool]:
        """``evaluate`` on the model pruned to ``ratios``, then restored; (metric, memo hit)."""
        key = _key(ratios)
        if key in self.memo:
            return self.memo[key], True
        named = {n: r for n, r in zip(self.space.names, ratios) if r > 0}
        try:
            with temporary(self.model) as guard:
                # Everything, not only the pruned weights: evaluate may fine-tune or update
                # BatchNorm statistics, and nothing may leak into the next trial.
                guard.save(self.model, recurse=True)
                if named:
                    prune_ratios_(self.model, named, **self.prune_opts)
                value = self.evaluate(self.model)
        except Exception as err:  # noqa: BLE001 - a failing trial is recorded, not fatal
            raise _Failed(f"{type(err).__name__}: {err}".splitlines()[0]) from err
        metric = _as_metric(value)
        self.memo[key] = metric
        return metric, False

    def values(self, metric: float, sparsity: float) -> list[float]:
        """The objective values told to the study, in ``objectives`` order."""
        return [metric if o == "metric" else sparsity for o in self.objectives]

    def step(self, study: Any) -> SearchTrial:
        """Ask, measure and tell one trial; a Ctrl-C marks it failed and propagates."""
        optuna_trial = None
        try:
            with quiet_threads(self.limit_threads):
                optuna_trial = study.ask()
                ratios = self.propose(optuna_trial)
            sparsity = self.space.sparsity(ratios)
            optuna_trial.set_user_attr("ratios", ratios)
            optuna_trial.set_user_attr("sparsity", sparsity)
            try:
                metric, hit = self.measure(ratios)
            except _Failed as err:
                return self._fail(study, optuna_trial, ratios, sparsity, str(err))
            optuna_trial.set_user_attr("metric", metric)
            optuna_trial.set_user_attr("memo", hit)
            with quiet_threads(self.limit_threads):
                study.tell(optuna_trial, self.values(metric, sparsity))
        except KeyboardInterrupt:
            if optuna_trial is not None:
                _tell_failed(study, optuna_trial)
            raise
        self.completed += 1
        return self.record(optuna_trial.number, ratios, sparsity, metric)

    def record(self, number: int, ratios: list[float], sparsity: float, metric: float | None,
               error: str | None = None) -> SearchTrial:  # fmt: skip
        """One finished trial as the :class:`SearchTrial` the result will hold."""
        return SearchTrial(
            number=number,
            ratios=dict(zip(self.space.names, ratios)),
            metric=metric,
            sparsity=sparsity,
            state="complete" if error is None else "fail",
            error=error,
        )

    def _fail(self, study: Any, optuna_trial: Any, ratios: list[float], sparsity: float,
              error: str) -> SearchTrial:  # fmt: skip
        self.failed += 1
        self.first_error = self.first_error or error
        optuna_trial.set_user_attr("error", error)
        _tell_failed(study, optuna_trial)
        return self.record(optuna_trial.number, ratios, sparsity, None, error)


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
            )
        )
    return found
