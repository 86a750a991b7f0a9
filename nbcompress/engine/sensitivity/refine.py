"""Measured refinement of per-layer ratios: a budgeted local search on the real metric.

The sensitivity curves predict an allocation's metric by summing single-layer drops; layers
that look harmless alone compound when pruned together, so that prediction is optimistic and
the allocation it picks is only a good guess. Refinement closes the loop with evaluations:
it measures several candidate allocations at the same overall sparsity (e.g. a suggestion,
and the per-layer ratios uniform and global L1 would give), starts from the best measured,
then moves sparsity between pairs of layers in shrinking steps, keeping a move only if the
measured metric improves. The baselines are among the candidates, so on the metric it
optimises the result is never worse than them. Every evaluation runs inside a
:func:`~nbcompress.trial`: the model is bit-exactly unchanged afterwards, also when
``evaluate`` raises or the user interrupts.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from nbcompress.engine.core.report import Table, TableReport, fmt_pct
from nbcompress.engine.core.validation import check_amount, check_module
from nbcompress.engine.prune.masks import layer_units
from nbcompress.engine.prune.prune import prune_
from nbcompress.engine.sensitivity.entries import trial_pruning
from nbcompress.engine.sensitivity.evaluate import (
    check_sweep_options,
    layer_sparsity,
    measuring,
    metric_name,
    progress_line,
    select_sweep_layers,
    spent,
)
from nbcompress.engine.sensitivity.guard import Fingerprint, layer_trial, verified
from nbcompress.engine.sensitivity.measure import Measure
from nbcompress.engine.sensitivity.remote import Ahead, measured_ahead

__all__ = ["Refinement", "check_budget", "refine"]

#: Smallest move, as a fraction of the first one (four halvings).
_MIN_SHARE = 1 / 16


@dataclass(repr=False)
class Refinement(TableReport):
    """What :func:`refine` found: the best allocation measured, and how it got there.

    Attributes:
        ratios: Layer → fraction to prune: the best allocation measured.
        measured: Metric measured with ``ratios``.
        sparsity: Overall fraction of weights ``ratios`` remove over the layers.
        target: Overall sparsity asked for.
        start: Name of the candidate the search started from.
        steps: One dict per candidate and per kept move: step, sparsity, measured.
        metric: Name of the metric.
        higher_is_better: ``False`` for losses, perplexity, RMSE.
        evaluations: Evaluations run (candidates included).
        seconds: Wall-clock time of the search.
        predicted: Metric the sensitivity curves predict for ``ratios`` (if known).
        notes: Explanations shown with the report.
        candidates: Name → the allocation (layer → fraction) measured as that candidate.
    """

    ratios: dict[str, float]
    measured: float
    sparsity: float
    target: float
    start: str
    steps: list[dict[str, Any]]
    metric: str
    higher_is_better: bool
    evaluations: int
    seconds: float
    predicted: float | None = None
    notes: list[str] = field(default_factory=list)
    candidates: dict[str, dict[str, float]] = field(default_factory=dict, repr=False)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One plain dict per candidate and per kept move."""
        return [dict(s) for s in self.steps]

    def _title(self) -> str:
        predicted = "" if self.predicted is None else f"predicted {self.predicted:.4g}, "
        achieved = f"sparsity {fmt_pct(self.target)} (achieved {fmt_pct(self.sparsity)})"
        return (
            f"Refined allocation for {achieved}: {self.metric} {predicted}measured "
            f"{self.measured:.4g}; started from {self.start}; "
            + spent(self.evaluations, self.seconds)
        )

    def _columns(self) -> dict[str, Any]:
        return {
            "step": None,
            "sparsity": fmt_pct,
            "measured": lambda v: "infeasible" if v is None else f"{v:.4g}",
        }

    def _table(self) -> Table:
        return Table(self.rows, self._columns(), self._title(), self.notes)


def refine(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    target_sparsity: float,
    *,
    candidates: Mapping[str, Mapping[str, float]] | None = None,
    budget: int = 100,
    step: float = 0.2,
    layers: str | Sequence[str] | None = None,
    types: Iterable[str | type] | str | type | None = None,
    granularity: str = "element",
    higher_is_better: bool = True,
    metric: str | None = None,
    predict: Callable[[dict[str, float]], float] | None = None,
    progress: bool = False,
    method: str = "l1",
    example_inputs: Any = None,
    reconstruct: bool = False,
    executor: Executor | str | None = None,
    workers: int | None = None,
) -> Refinement:
    """Find per-layer ratios at an overall sparsity by measuring, without changing the model.

    Measures each candidate allocation (yours, plus what uniform and global L1 would give),
    starts from the best, then tries moving sparsity from one layer to another, keeping a
    move only if the measured metric improves. When no move improves, the step is halved;
    the search stops after ``budget`` moves or at a step of 1/16 of the first. The overall
    sparsity never falls below the target (up to rounding half a weight per layer).

    Args:
        model: The model (not changed: every evaluation is rolled back).
        evaluate: ``evaluate(model) -> float``; higher is better unless
            ``higher_is_better=False``. A continuous metric such as validation loss lets
            small moves show.
        target_sparsity: Overall fraction of the selected layers' weights to remove, in (0, 1).
        candidates: Name → allocation (layer → fraction) to start from; layers left out
            stay as they are. ``"uniform L1"`` and ``"global L1"`` are always added.
        budget: Evaluations the search may spend after measuring the candidates.
        step: First move, as a fraction of the weights kept at the target (0.2 moves a fifth).
        layers: Glob pattern(s) of layers to allocate over; default the layers
            :func:`~nbcompress.engine.sensitivity.sweep.sensitivity` analyses (attention
            projections and recurrent gates included), the output layer left alone
            (as the sweep and ``prune_`` leave it) unless named.
        types: Layer types (names or classes).
        granularity: ``"element"``, ``"block"`` or ``"channel"``.
        higher_is_better: ``False`` for losses, perplexity, RMSE.
        metric: Name of the metric.
        predict: Optional ``predict(ratios) -> float`` (e.g. ``SensitivityResult.predict``)
            to report the curves' prediction next to the measurement.
        progress: Print one line per kept move to stderr.
        method: How each measured allocation prunes a layer: ``"l1"`` or ``"wanda"``
            (statistics collected once on ``example_inputs``).
        example_inputs: Calibration inputs for ``"wanda"`` and ``reconstruct``.
        reconstruct: Re-fit kept weights by least squares in each measured allocation
            (see :func:`~nbcompress.prune_`; slower: every layer is re-measured).
        executor: Measure on this executor's workers (as ``sensitivity`` does): the
            candidates at once, then the next moves, as many at a time as there are
            workers. The search is sequential (each move starts from the best so far), so
            moves measured after one that improves are dropped: steps, values and result
            are the serial search's.
        workers: A local dask cluster of this many processes for the call (1: serial).

    Returns:
        The best allocation measured, with each candidate and kept move.

    Raises:
        TypeError: ``evaluate`` is not callable or returns something other than a number.
        ValueError: Bad target, budget, step or candidate, or no candidate reaches the target.
        EvaluationError: ``evaluate`` raised; the model is restored.
    """
    check_module(model)
    if evaluate is None:
        raise ValueError(
            "evaluate: refinement measures real allocations; pass evaluate=fn (--eval fn)."
        )
    check_sweep_options(evaluate, None, None, None, granularity)
    target = check_amount(target_sparsity, "target_sparsity", allow_zero=False)
    check_budget(budget, "budget")
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step <= 1:
        raise ValueError(f"step: expected a fraction of the kept weights in (0, 1], got {step!r}.")
    selected, _ = select_sweep_layers(model, layers, types, None, granularity)
    search = _Search(model, selected, evaluate, granularity, higher_is_better, target, progress)
    pruning = trial_pruning(model, selected, method, example_inputs, reconstruct)
    where = "while refining an allocation"
    search.measured = Measure(model, selected, granularity, evaluate, pruning, where=where)
    ahead = measured_ahead(executor, workers, search.measured, search.notes)
    with verified(model, Fingerprint.of(model), "refine"):
        named = {
            "uniform L1": dict.fromkeys(selected, target),
            **_global(model, selected, target, granularity, search.notes),
        }
        named.update(search.check_candidates(candidates))
        with measuring(model), ahead as search.ahead:
            best, value, start = search.candidates(named)
            search.run(best, value, step * (1 - target) * search.total, budget)
    ratios = search.ratios(search.best)
    return Refinement(
        ratios=ratios, measured=search.sign * search.value, target=target,
        sparsity=search.sparsity(search.best), start=start, steps=search.steps,
        metric=metric or metric_name(evaluate),
        higher_is_better=bool(higher_is_better), evaluations=search.evaluations,
        seconds=time.perf_counter() - search.t0,
        predicted=predict(ratios) if predict is not None else None, notes=search.notes,
        candidates={k: search.ratios(search.counts(a)) for k, a in named.items()},
    )  # fmt: skip


def check_budget(value: Any, arg: str) -> int:
    """Return ``value`` if it is a number of evaluations (an int >= 0), else raise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{arg}: expected a number of evaluations >= 0, e.g. 100; got {value!r}.")
    return value


def _global(
    model: nn.Module,
    selected: dict[str, nn.Module],
    target: float,
    granularity: str,
    notes: list[str],
) -> dict[str, dict[str, float]]:
    """The per-layer ratios one global L1 threshold gives (read off inside a trial).

    Empty, with a note, when global L1 cannot reach the target (every layer keeps
    ``prune_``'s default ``min_density`` of its weights, e.g. 5% caps it at 95%).
    """
    with layer_trial(model, selected), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the min-density note: reflected in the ratios
        try:
            prune_(
                model, target, layers=list(selected), types={type(m) for m in selected.values()},
                include_output=True, scope="global", granularity=granularity,
            )  # fmt: skip
        except ValueError as err:
            notes.append(f"No global L1 candidate: {err}")
            return {}
        ratios = {n: layer_sparsity(m, granularity) for n, m in selected.items()}
        return {"global L1": ratios}


class _Search:
    """Allocations as zero *units* (weights, blocks or channels) per layer; measured, cached."""

    def __init__(self, model, selected, evaluate, granularity, higher_is_better, target, progress):
        self.model, self.evaluate, self.granularity = model, evaluate, granularity
        self.sign = 1.0 if higher_is_better else -1.0
        self.names, self.layers = list(selected), selected
        counted = {n: layer_units(m, granularity) for n, m in selected.items()}
        self.units = {n: units for n, (_, units, _) in counted.items()}
        self.per_unit = {n: size / units for n, (_, units, size) in counted.items()}
        self.floor = {n: zero for n, (zero, _, _) in counted.items()}
        self.total = sum(size for _, _, size in counted.values())
        # Rounding each layer to whole units may fall short by half a unit per layer.
        self.need = target * self.total - 0.5 * sum(self.per_unit.values())
        self.progress, self.t0 = progress, time.perf_counter()
        self.cache: dict[tuple[int, ...], float] = {}
        self.steps: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.evaluations = 0
        self.best: tuple[int, ...] = ()
        self.value = -math.inf
        self.measured: Measure | None = None  # how one allocation is pruned and evaluated
        self.ahead: Ahead | None = None  # values measured ahead on an executor's workers

    def check_candidates(self, candidates: Any) -> dict[str, dict[str, float]]:
        if candidates is None:
            return {}
        if not isinstance(candidates, Mapping):
            raise TypeError(
                "candidates: expected a dict name → {layer: fraction}, got "
                f"{type(candidates).__name__}."
            )
        out = {}
        for name, alloc in candidates.items():
            if not isinstance(alloc, Mapping):
                raise TypeError(f"candidates[{name!r}]: expected a dict layer → fraction.")
            unknown = [n for n in alloc if n not in self.units]
            if unknown:
                raise ValueError(
                    f"candidates[{name!r}]: {', '.join(map(repr, unknown))} not among the "
                    f"selected layers ({', '.join(self.names)})."
                )
            out[name] = {
                n: check_amount(r, f"candidates[{name!r}][{n!r}]") for n, r in alloc.items()
            }
        return out

    def counts(self, alloc: Mapping[str, float]) -> tuple[int, ...]:
        return tuple(
            min(max(round(alloc.get(n, 0.0) * self.units[n]), self.floor[n]), self.units[n] - 1)
            for n in self.names
        )

    def ratios(self, counts: tuple[int, ...]) -> dict[str, float]:
        return {n: c / self.units[n] for n, c in zip(self.names, counts, strict=True)}

    def removed(self, counts: tuple[int, ...]) -> float:
        return sum(c * self.per_unit[n] for n, c in zip(self.names, counts, strict=True))

    def sparsity(self, counts: tuple[int, ...]) -> float:
        return self.removed(counts) / self.total

    def measure(self, counts: tuple[int, ...]) -> float:
        """Metric of an allocation, signed so that larger is better; measured once."""
        if counts not in self.cache:
            value = self.ahead.take(counts) if self.ahead is not None else None
            if value is None:
                value = self.measured(self.pruned(counts))
            self.evaluations += 1
            self.cache[counts] = -math.inf if math.isnan(value) else self.sign * value
        return self.cache[counts]

    def pruned(self, counts: tuple[int, ...]) -> dict[str, float]:
        """The layers an allocation prunes, and their fractions."""
        return {n: r for n, r in self.ratios(counts).items() if r > 0}

    def candidates(self, named: dict[str, dict[str, float]]) -> tuple[tuple[int, ...], float, str]:
        """Measure every feasible candidate; the best one (first on ties) and its name."""
        best = None
        if self.ahead is not None:
            counts = [self.counts(a) for a in named.values()]
            feasible = [c for c in counts if self.removed(c) >= self.need - 1e-9]
            self.ahead.fetch({c: self.pruned(c) for c in feasible if c not in self.cache})
        for name, alloc in named.items():
            counts = self.counts(alloc)
            ok = self.removed(counts) >= self.need - 1e-9
            value = self.measure(counts) if ok else None
            self.steps.append({
                "step": f"candidate: {name}", "sparsity": self.sparsity(counts),
                "measured": None if value is None else self.sign * value,
            })  # fmt: skip
            if not ok:
                self.notes.append(f"Candidate {name!r} is below the target sparsity: skipped.")
            elif best is None or value > best[1]:
                best = (counts, value, name)
        if best is None:
            raise ValueError("candidates: none reaches target_sparsity; nothing to start from.")
        return best

    def run(self, best: tuple[int, ...], value: float, move: float, budget: int) -> None:
        """First-improvement local search over ordered layer pairs, halving the move."""
        self.best, self.value, smallest = best, value, move * _MIN_SHARE
        n = len(self.names)
        pairs = [(a, b) for a in range(n) for b in range(n) if a != b]
        stop = self.evaluations + budget
        while move >= smallest and self.evaluations < stop:
            improved = False
            for i, (src, dst) in enumerate(pairs):
                if self.evaluations >= stop:
                    break
                moved = self.moved(self.best, src, dst, move)
                if moved is None or moved in self.cache:
                    continue  # measured before and not kept: it was no better
                if self.ahead is not None and moved not in self.ahead.values:
                    self.ahead.fetch_moves(self, pairs[i:], move, stop - self.evaluations)
                v = self.measure(moved)
                if v > self.value:
                    self.best, self.value, improved = moved, v, True
                    self._kept(src, dst, moved)
            if not improved:
                move /= 2

    def moved(self, counts: tuple[int, ...], src: int, dst: int, amount: float):
        """Un-prune about ``amount`` weights of layer ``src`` and prune as many in ``dst``."""
        a, b = self.names[src], self.names[dst]
        pa, pb = self.per_unit[a], self.per_unit[b]
        da = min(max(1, round(amount / pa)), counts[src] - self.floor[a])
        db = min(math.ceil(da * pa / pb), self.units[b] - 1 - counts[dst])
        da = min(da, math.floor(db * pb / pa))  # never un-prune more than is pruned instead
        if da <= 0 or db <= 0:
            return None
        out = list(counts)
        out[src] -= da
        out[dst] += db
        return tuple(out)

    def _kept(self, src: int, dst: int, counts: tuple[int, ...]) -> None:
        measured = self.sign * self.value
        self.steps.append({
            "step": f"move sparsity {self.names[src]} → {self.names[dst]}",
            "sparsity": self.sparsity(counts), "measured": measured,
        })  # fmt: skip
        if self.progress:
            progress_line(
                f"refine [{self.evaluations} evaluations, {time.perf_counter() - self.t0:.1f} s] "
                f"{self.names[src]} → {self.names[dst]}: {measured:.4g}"
            )
