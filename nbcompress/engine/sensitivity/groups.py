"""Sensitivity over coupled channel groups: each point physically removes one group's channels.

Removing the output channels of one layer alone would break the shapes of every layer
coupled to it (the next layer's inputs, BatchNorm, residual partners, concatenations), so a
sweep with ``remove=True`` measures *groups*: the coupled sets that
:func:`~nbcompress.engine.structural.graph.channel_groups` finds (built once, in a bounded
child process, and cached). One entry per group, named by its root layer. At each ratio the
group's lowest-score channels are removed with :func:`~nbcompress.engine.structural.remove.
remove_` (exactly as applying will remove them) inside a trial, the model is evaluated, and
the trial rolls the removal back bit-exactly (parameter identity included). Ratios are
rounded by the group's ``step`` (attention heads, channel groups) as ``remove_`` rounds
them; grid ratios that round to the same channel count are evaluated once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from nbcompress.engine.core.heads import remember_inputs
from nbcompress.engine.core.history import trial
from nbcompress.engine.core.validation import as_inputs, check_module
from nbcompress.engine.sensitivity.evaluate import (
    Proxy,
    call_evaluate,
    measuring,
    metric_name,
)
from nbcompress.engine.sensitivity.guard import Fingerprint, verified
from nbcompress.engine.sensitivity.progress import BASE, Progress, check_baseline, run_all
from nbcompress.engine.sensitivity.registry import remember
from nbcompress.engine.sensitivity.removal import remove_groups, whole_group_cost
from nbcompress.engine.sensitivity.result import SensitivityResult

__all__ = ["GROUP_RATIOS", "GroupSweep", "group_sensitivity"]

#: The default grid of a group sweep: tenths. Removing 95-99% of a group's channels leaves
#: a layer a few channels wide, which no budget a user would apply needs measured.
GROUP_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class GroupSweep:
    """Options of a group sweep (what :func:`~nbcompress.sensitivity` passes on).

    Attributes:
        example_inputs: The input the graph is traced on (and the proxy's input).
        layers: Glob pattern(s): only groups rooted at matching layers are swept.
        include_output: Also sweep the group of the final classifier's outputs.
        method: Channel importance (``"l1"``), as ``remove_(importance=)`` takes it.
        higher_is_better: ``False`` for losses.
        metric: Name of the metric.
        early_stop: Stop a group's sweep once its metric fell by more than this.
        progress: Print plain-text progress to stderr.
        callback: ``callback(result_so_far, root, ratio)`` after each point.
    """

    example_inputs: Any
    layers: str | Sequence[str] | None = None
    include_output: bool = False
    method: str = "l1"
    higher_is_better: bool = True
    metric: str | None = None
    early_stop: float | None = None
    progress: bool = True
    callback: Callable[[SensitivityResult, str, float], None] | None = None
    trained: set[str] = field(default_factory=set)


def _groups(model: nn.Module, options: GroupSweep) -> tuple[list[Any], list[str]]:
    """The removable groups to sweep, and a note for each one that cannot be removed."""
    from nbcompress.engine.structural.graph import channel_groups

    found = channel_groups(
        model,
        options.example_inputs,
        layers=options.layers,
        include_output=options.include_output,
        importance=options.method,
    )
    usable = [g for g in found if g.reason is None and g.width > g.step]
    notes = [f"{g.root}: not swept ({g.reason})." for g in found if g.reason is not None]
    if not usable:
        raise ValueError(
            "layers: no coupled channel group can be removed here"
            + (f" ({notes[0]})" if notes else "")
            + "; widen --layers, or sweep without remove=True."
        )
    return usable, notes


def group_sensitivity(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float] | None,
    ratios: list[float],
    options: GroupSweep,
) -> SensitivityResult:
    """Sweep coupled channel groups by physical removal; the model is unchanged afterwards.

    Args:
        model: The model to analyse (not changed: every point is rolled back, and a
            checksum of every tensor confirms it before the result is returned).
        evaluate: ``evaluate(model) -> float``; ``None``: the data-free proxy on the input.
        ratios: Fractions of each group's channels to remove, ascending.
        options: The sweep's options (see :class:`GroupSweep`).

    Returns:
        The result (``remove=True``, one entry per group named by its root layer),
        remembered as the model's latest.

    Raises:
        ValueError: No example input, or no group can be removed (one line each).
        EvaluationError: ``evaluate`` raised; the partial result is on ``err.result``.
    """
    check_module(model)
    if options.example_inputs is None:
        raise ValueError(
            "example_inputs: remove=True traces the model on an example input to find its "
            "coupled channel groups; pass example_inputs=x (--input x)."
        )
    inputs = as_inputs(options.example_inputs)
    remember_inputs(model, inputs)
    groups, notes = _groups(model, options)
    fingerprint = Fingerprint.of(model)
    with verified(model, fingerprint, "sensitivity") as check, measuring(model):
        proxy = Proxy(model, inputs) if evaluate is None else None
        measure = proxy or evaluate
        baseline = proxy(model) if proxy else call_evaluate(evaluate, model, BASE, options.trained)
        check_baseline(baseline, evaluate)
        result = SensitivityResult(
            layers=[g.root for g in groups], ratios=ratios, baseline=baseline,
            curves={g.root: [None] * len(ratios) for g in groups},
            sizes=dict.fromkeys((g.root for g in groups), 0),
            macs=dict.fromkeys(g.root for g in groups),
            metric=options.metric or (proxy.name if proxy else metric_name(evaluate)),
            higher_is_better=bool(options.higher_is_better), proxy=proxy is not None,
            granularity="channel", evaluations=1, seconds=0.0, complete=False,
            notes=[*notes, _GRID_NOTE], method=options.method, remove=True,
        )  # fmt: skip
        if proxy is not None and proxy.note:
            result.notes.append(proxy.note)
        remember(model, result, evaluate=evaluate, example_inputs=options.example_inputs)
        check.result = result
        run = _GroupRun(model, result, measure, options, {g.root: g for g in groups}, inputs)
        interrupted = run.sweep(Progress(options.progress, len(groups) * len(ratios)))
    if interrupted:  # checked by checksum on leaving the block above
        result.notes[interrupted - 1] += " The model is restored (verified by checksum)."
    return result


_GRID_NOTE = (
    "Group sweep: each point physically removed that group's lowest-score channels (and every "
    "dimension coupled to them) and was rolled back; ratios are rounded to the group's step as "
    "remove_ rounds them; params and MACs per entry are what removing the whole group "
    "would take (est.): every tensor dimension the first point shrank, extrapolated to the "
    "whole group, so a layer with inputs and outputs in the group counts quadratically."
)


@dataclass
class _GroupRun:
    """State of one group sweep."""

    model: nn.Module
    result: SensitivityResult
    measure: Callable[[nn.Module], float]
    options: GroupSweep
    groups: dict[str, Any]
    inputs: tuple
    start: float = field(default_factory=time.perf_counter)

    def sweep(self, progress: Progress) -> int:
        """Every group × ratio; on Ctrl-C or an evaluate error keep what was measured.

        Returns:
            1 + the index of the interruption's note, or 0.
        """
        each = lambda root: self._group(root, progress)  # noqa: E731
        return run_all(self.result, self.result.layers, each, self.start)

    def _group(self, root: str, progress: Progress) -> None:
        # Imported here: the plan module belongs to the structural engine (Torch-Pruning).
        from nbcompress.engine.structural.plan import plan_channels

        res, group = self.result, self.groups[root]
        sign = 1.0 if res.higher_is_better else -1.0
        seen: dict[int, float] = {0: res.baseline}
        for i, ratio in enumerate(res.ratios):
            count = len(plan_channels(group, ratio))
            evaluated = count not in seen
            if evaluated:
                seen[count] = self._point(group, ratio, count)
                res.evaluations += 1
            value = res.curves[root][i] = seen[count]
            res.seconds = time.perf_counter() - self.start
            drop = sign * (res.baseline - value)
            stop = self.options.early_stop is not None and drop > self.options.early_stop
            last = stop or i == len(res.ratios) - 1
            progress.step(res, root, last, evaluated)
            if self.options.callback is not None:
                self.options.callback(res, root, ratio)
            if stop:
                res.notes.append(f"{root}: early stop after ratio {ratio:g}.")
                break

    def _point(self, group: Any, ratio: float, count: int) -> float:
        """The metric with ``count`` channels of ``group`` removed (rolled back on exit)."""
        res = self.result
        first = res.macs.get(group.root) is None  # the group's size is not known yet
        x = self.options.example_inputs
        with trial(self.model):
            if first:
                res.sizes[group.root], res.macs[group.root] = whole_group_cost(
                    self.model, self.inputs,
                    lambda: remove_groups(self.model, {group.root: ratio}, x, res.method),
                    group.width, count,
                )  # fmt: skip
            else:
                remove_groups(self.model, {group.root: ratio}, x, res.method)
            where = f"with {count} of {group.width} channels of group {group.root} removed"
            if isinstance(self.measure, Proxy):
                return self.measure(self.model)
            return call_evaluate(self.measure, self.model, where, self.options.trained)
