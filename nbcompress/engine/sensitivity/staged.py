"""Staged sensitivity pruning: sweep → suggest → apply, repeated on the pruned model.

A single sweep measures each layer with only that layer pruned, and its suggestion sums
those drops. Layers that look harmless alone can compound when pruned together, so at high
sparsity the one-sweep prediction is optimistic. Pruning in stages re-measures the curves on
the already pruned model before each step, which captures those interactions (at the cost
of one sweep per stage). Every stage runs inside one history transaction: one ``undo_``
restores the model bit-exactly, and an error or Ctrl-C in any stage rolls everything back.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from nbcompress.engine.core.distribute import resolve_executor
from nbcompress.engine.core.history import transaction, trial
from nbcompress.engine.core.report import fmt_pct
from nbcompress.engine.core.validation import as_inputs, check_amount, check_module
from nbcompress.engine.prune.prune import prune_ratios_
from nbcompress.engine.sensitivity.entries import check_pruning
from nbcompress.engine.sensitivity.evaluate import (
    Proxy,
    call_evaluate,
    fmt_value,
    layer_sparsity,
)
from nbcompress.engine.sensitivity.refine import Refinement, check_budget
from nbcompress.engine.sensitivity.refine import refine as refine_allocation
from nbcompress.engine.sensitivity.registry import keep_latest
from nbcompress.engine.sensitivity.result import SensitivityResult
from nbcompress.engine.sensitivity.stagereport import StagedReport
from nbcompress.engine.sensitivity.suggestion import Suggestion, apply_suggestion_
from nbcompress.engine.sensitivity.sweep import sensitivity
from nbcompress.progress import Progress

__all__ = ["DEFAULT_RATIOS", "StagedReport", "prune_to_", "stage_targets"]

#: Sweep ratios of each stage: fine steps at the top, where high targets are decided.
DEFAULT_RATIOS = (
    0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99,
)  # fmt: skip


#: Sparsity of the first stage of a schedule given as a number of stages.
_FIRST = 0.5


def stage_targets(target_sparsity: float, stages: int | Sequence[float]) -> list[float]:
    """Overall sparsity after each stage, ending at ``target_sparsity``.

    Args:
        target_sparsity: Final overall sparsity, in (0, 1).
        stages: Number of stages, or the intermediate targets (ascending, below the
            target; the target is appended). With a number ``n``, the first stage goes to
            half the weights (or straight to a target below that): there the curves are
            flat and pruning layers together costs about what the sum predicts, so more
            stages would only spend sweeps. Each later stage removes the same share of the
            weights still left (densities fall geometrically), so the steps shrink where
            layers start to interact.

    Returns:
        Ascending targets, the last one ``target_sparsity``.
    """
    t = check_amount(target_sparsity, "target_sparsity", allow_zero=False)
    if isinstance(stages, bool):
        raise TypeError(f"stages: expected a number of stages or a list, got {stages!r}.")
    if isinstance(stages, numbers.Integral):
        if stages < 1:
            raise ValueError(f"stages: expected at least 1 stage, got {stages}.")
        n, first = int(stages), min(_FIRST, t)
        if n == 1 or first >= t:
            return [round(1 - (1 - t) ** (k / n), 6) for k in range(1, n)] + [t]
        shrink = ((1 - t) / (1 - first)) ** (1 / (n - 1))
        return [round(1 - (1 - first) * shrink**k, 6) for k in range(n - 1)] + [t]
    if isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence):
        raise TypeError(f"stages: expected a number of stages or a list, got {stages!r}.")
    steps = [check_amount(s, f"stages[{i}]", allow_zero=False) for i, s in enumerate(stages)]
    if steps and math.isclose(steps[-1], t):
        steps = steps[:-1]
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)) or any(s >= t for s in steps):
        raise ValueError(
            f"stages: {list(stages)!r} must ascend and stay below target_sparsity={t:g}, "
            "e.g. [0.5, 0.7, 0.8]."
        )
    return [*steps, t]


def _evaluation(
    model: nn.Module, evaluate: Any, example_inputs: Any, metric: str | None
) -> tuple[Callable[[nn.Module], float], str | None, list[str]]:
    """The stages' metric; without ``evaluate``, the proxy against the model as it is now.

    A sweep's own proxy compares with the model at that sweep, so stage after stage it
    would drift; one fixed reference keeps every stage measured against the unpruned model.
    """
    if evaluate is not None or example_inputs is None:
        return evaluate, metric, []
    proxy = Proxy(model, as_inputs(example_inputs))
    note = f"Proxy metric ({proxy.name}) against the model before the first stage."
    return proxy, metric or f"proxy {proxy.name}", [note]


def prune_to_(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float] | None,
    target_sparsity: float,
    *,
    stages: int | Sequence[float] = 5,
    ratios: Sequence[float] | None = DEFAULT_RATIOS,
    objective: str = "params",
    granularity: str = "element",
    layers: str | Sequence[str] | None = None,
    types: Iterable[str | type] | str | type | None = None,
    example_inputs: Any = None,
    higher_is_better: bool = True,
    metric: str | None = None,
    refine: int | None = None,
    progress: bool = True,
    method: str = "l1",
    reconstruct: bool = False,
    executor: Executor | str | None = None,
    workers: int | None = None,
) -> StagedReport:
    """Prune ``model`` in place to an overall sparsity in stages guided by sensitivity.

    Each stage sweeps the (already pruned) model with :func:`sensitivity`, asks the result
    for the stage's target (``SensitivityResult.suggest``) and applies it
    (:func:`apply_suggestion_`), measuring the metric. All stages form one step of the
    history: ``undo_(model)`` restores the model bit-exactly, and if any stage fails or is
    interrupted (Ctrl-C) the model is restored and the error propagates.

    Prefer a continuous metric such as validation loss (``higher_is_better=False``):
    accuracy on a few hundred examples is flat over most ratios, so it cannot tell a
    harmless layer from a slightly harmful one (see benchmarks/RESULTS.md, issue 3).

    With ``refine=N`` the stages only propose: they run inside a trial, and the per-layer
    ratios they reach are measured next to the first sweep's one-shot suggestion and the
    ratios uniform and global L1 would give; a local search
    (:func:`nbcompress.engine.sensitivity.refine.refine`, up to ``N`` more evaluations) then moves
    sparsity between layers while the measured metric improves, and the best allocation
    measured is applied. On ``evaluate`` it is never worse than any of those candidates.

    Args:
        model: The model to prune.
        evaluate: ``evaluate(model) -> float``, higher is better unless
            ``higher_is_better=False``; ``None`` with ``example_inputs``: the data-free
            proxy against the model as it is before the first stage.
        target_sparsity: Overall fraction of the analysed weights (MACs with
            ``objective="macs"``) to remove, in (0, 1).
        stages: Number of stages, or the intermediate targets (see :func:`stage_targets`).
        ratios: Sweep ratios of each stage (ratios at or below a layer's sparsity are not
            evaluated); they must reach high enough for the target.
        objective: ``"params"`` or ``"macs"``.
        granularity: ``"element"``, ``"block"`` or ``"channel"``.
        layers: Glob pattern(s) of layers to prune; default the layers ``sensitivity``
            analyses (attention projections and recurrent gates included), the output
            layer included.
        types: Layer types to prune (names or classes).
        example_inputs: Input for the proxy and for MAC estimates.
        higher_is_better: ``False`` for losses, perplexity, RMSE.
        metric: Name of the metric.
        refine: Evaluations for a measured refinement after the stages (e.g. 100);
            ``None``: apply the last stage's suggestion as it is.
        progress: Show where the run stands after each stage (stages done, elapsed, ETA,
            the stage's sparsity and metric): a live bar in a notebook, a line on stdout
            elsewhere (:class:`~nbcompress.progress.Progress`).
        method: ``"l1"`` or ``"wanda"``: how the sweeps score and the stages prune (Wanda
            needs ``example_inputs`` as calibration inputs, see :func:`~nbcompress.prune_`).
        reconstruct: Re-fit the kept weights by least squares whenever a stage prunes.
        executor: Evaluate each stage's sweep and the refinement on this executor's
            workers (see :func:`sensitivity` and :func:`~.refine.refine`; same results as
            serially). The stages themselves run one after another: each sweeps the model
            the previous one pruned.
        workers: A local dask cluster of this many processes for the whole call (1: serial).

    Returns:
        The report: per stage the target, achieved sparsity, predicted and measured metric.

    Raises:
        ValueError: Bad target, stages, refine or option, or a stage target the sweep
            cannot reach.
        EvaluationError: ``evaluate`` raised; nothing is kept.
        KeyboardInterrupt: Interrupted; nothing is kept.
    """
    check_module(model)
    targets = stage_targets(target_sparsity, stages)
    if refine is not None:
        check_budget(refine, "refine")
    pruning = {}
    if check_pruning(method, example_inputs, reconstruct):
        pruning = dict(method=method, example_inputs=example_inputs, reconstruct=reconstruct)
    measure, metric, notes = _evaluation(model, evaluate, example_inputs, metric)
    sweep_options = dict(
        ratios=ratios, layers=layers, types=types, granularity=granularity,
        example_inputs=example_inputs, higher_is_better=higher_is_better, metric=metric,
        progress=False,
        # Passed only when asked for: the sweep forwards them to each layer's trial.
        **{k: v for k, v in pruning.items() if k != "example_inputs"},
    )  # fmt: skip
    total = len(targets) + (refine is not None)
    bar = Progress(total, "prune_to_", "stage", enabled=bool(progress), every=0)
    run = _Staged(model, measure, sweep_options, objective, bar, time.perf_counter())
    run.pruning = pruning
    detail = f"staged sensitivity pruning to sparsity {fmt_pct(targets[-1])}"
    with (
        resolve_executor(executor, workers) as sweep_options["executor"],  # one for all stages
        keep_latest(model),
        transaction(model, "prune", detail) as tx,
        bar,
    ):
        if refine is None:
            run.stages(targets)
        else:
            selection = dict(layers=layers, types=types, granularity=granularity)
            run.refined(targets, refine, selection)
        tx.step.detail = detail + f" in {len(targets)} stage(s)" + (" + refined" if refine else "")
        notes.append("Undo all stages at once with nbcompress.undo_(model) or %undo model.")
        report = run.report(targets[-1], notes)
        # Kept with the step: `%sensitivity --stages --apply` returns the sweep result and
        # the report stays reachable as history(model)[-1].info["report"].
        tx.info.update(
            suggestion=f"staged to sparsity {targets[-1]:.0%}", measured=run.last, report=report
        )
    return report


@dataclass
class _Staged:
    """State of one staged run: the stages so far and what they cost."""

    model: nn.Module
    evaluate: Any
    options: dict[str, Any]
    objective: str
    progress: Progress
    start: float
    # The first sweep (its baseline and one-shot suggestion), then the latest stage.
    baseline: float | None = None
    first: SensitivityResult | None = None
    evaluations: int = 0
    result: SensitivityResult | None = None
    suggestion: Suggestion | None = None
    last: float | None = None
    refinement: Refinement | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    # method / example_inputs / reconstruct when not plain L1 (else empty).
    pruning: dict[str, Any] = field(default_factory=dict)

    def stages(self, targets: list[float]) -> None:
        """Run every stage on the model."""
        for k, t in enumerate(targets, 1):
            self.stage(k, len(targets), t)

    def refined(self, targets: list[float], budget: int, selection: dict[str, Any]) -> None:
        """Stages as a proposal (rolled back), then a measured search; apply the best."""
        with trial(self.model):
            self.stages(targets)
            names = self.result.layers
            g = selection["granularity"]
            staged = {n: layer_sparsity(self.model.get_submodule(n), g) for n in names}
        candidates = {"staged": staged}
        with contextlib.suppress(ValueError):  # the one-shot target may be out of its reach
            one_shot = self.first.suggest(targets[-1], objective=self.objective, check=False)
            candidates["one sweep"] = one_shot.ratios
        found = refine_allocation(
            self.model, self.evaluate, targets[-1], candidates=candidates, budget=budget,
            higher_is_better=self.result.higher_is_better, metric=self.result.metric,
            predict=self.first.predict, executor=self.options["executor"], **selection,
            **self.pruning,
        )  # fmt: skip
        self.evaluations += found.evaluations
        prune_ratios_(
            self.model, found.ratios, granularity=selection["granularity"], **self.pruning
        )
        self.refinement, self.last = found, found.measured
        self.rows.append({
            "stage": f"refined (from {found.start})", "target": targets[-1],
            "sparsity": found.sparsity, "predicted": found.predicted, "measured": found.measured,
        })  # fmt: skip
        self.progress.update(
            note=f"refined from {found.start}: {found.evaluations} evaluations, measured "
            + fmt_value(found.measured)
        )

    def stage(self, k: int, n: int, target: float) -> None:
        """Sweep the model as it is, suggest for ``target`` and apply; skip if already there."""
        res = sensitivity(self.model, self.evaluate, **self.options)
        self.evaluations += res.evaluations
        if not res.complete:
            # The sweep keeps a partial result on Ctrl-C; here the whole run must stop.
            raise KeyboardInterrupt(f"staged pruning interrupted in stage {k}; nothing kept")
        if self.baseline is None:
            self.baseline, self.first = res.baseline, res
        self.result = res
        if res.sparsity_of({}) >= target - 1e-9:
            self.progress.update(note=f"stage {k}/{n}: already at sparsity {target:.1%}")
            return  # already that sparse (e.g. pruned before): nothing to do in this stage
        try:
            suggestion = res.suggest(target, objective=self.objective, check=False)
        except ValueError as err:
            raise ValueError(f"stage {k} of {n}: {err}") from None
        measured = self._apply(suggestion)
        self.evaluations += measured is not None
        self.suggestion, self.last = suggestion, measured
        self.rows.append({
            "stage": k, "target": target, "sparsity": suggestion.sparsity,
            "predicted": suggestion.predicted, "measured": measured,
        })  # fmt: skip
        self.progress.update(
            note=f"stage {k}/{n}: sparsity {suggestion.sparsity:.1%}, predicted "
            f"{suggestion.predicted:.4g}, measured " + fmt_value(measured)
        )

    def _apply(self, suggestion: Suggestion) -> float | None:
        """Apply a stage's suggestion (L1 as suggested, or with this run's method); measure."""
        if not self.pruning:
            return apply_suggestion_(self.model, suggestion, evaluate=self.evaluate).measured
        ratios = {n: r for n, r in suggestion.ratios.items() if r > 0}
        g = self.options["granularity"]
        prune_ratios_(self.model, ratios, granularity=g, **self.pruning)
        if self.evaluate is None:
            return None
        return call_evaluate(self.evaluate, self.model, "after a stage")

    def report(self, target: float, notes: list[str]) -> StagedReport:
        """The report of the finished run."""
        res = self.result
        return StagedReport(
            target=target, stages=self.rows, baseline=float(self.baseline),
            metric=res.metric, higher_is_better=res.higher_is_better,
            evaluations=self.evaluations, seconds=time.perf_counter() - self.start,
            suggestion=self.suggestion, result=res, notes=notes, refinement=self.refinement,
        )  # fmt: skip
