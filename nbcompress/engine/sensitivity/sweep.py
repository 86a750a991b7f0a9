"""L1 sensitivity sweep: how much the metric drops when one layer alone is pruned.

For each selected layer and ratio the layer is pruned inside a :func:`~nbcompress.trial`
(always rolled back), the model is evaluated, and the curve point is recorded. The model is
bit-exactly unchanged afterwards, also when ``evaluate`` raises or the user interrupts. The
result predicts the metric of per-layer ratios and suggests ratios for a budget
(:mod:`nbcompress.engine.sensitivity.result`); the latest result and suggestion of each
model are kept in :mod:`nbcompress.engine.sensitivity.registry` so that
``%prune model --suggested`` and the explorer find them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from nbcompress.engine.core.capture import captured_inputs
from nbcompress.engine.core.distribute import resolve_executor
from nbcompress.engine.core.heads import remember_inputs
from nbcompress.engine.core.layers import output_layers
from nbcompress.engine.core.validation import as_inputs, check_module
from nbcompress.engine.prune.calibrate import calibration_inputs
from nbcompress.engine.sensitivity.entries import check_pruning, trial_pruning
from nbcompress.engine.sensitivity.evaluate import (
    Proxy,
    call_evaluate,
    check_sweep_options,
    fmt_value,
    layer_size,
    layer_sparsity,
    measuring,
    metric_name,
    select_sweep_layers,
)
from nbcompress.engine.sensitivity.groups import GROUP_RATIOS, GroupSweep, group_sensitivity
from nbcompress.engine.sensitivity.guard import Fingerprint, shown, verified
from nbcompress.engine.sensitivity.measure import Measure
from nbcompress.engine.sensitivity.prefix import Prefix
from nbcompress.engine.sensitivity.progress import (
    BASE,
    Progress,
    check_baseline,
    check_ratios,
    layer_macs,
    run_all,
)
from nbcompress.engine.sensitivity.registry import remember
from nbcompress.engine.sensitivity.remote import refuse_remote, sweep_on_executor
from nbcompress.engine.sensitivity.result import SensitivityResult

__all__ = ["DEFAULT_RATIOS", "sensitivity"]

#: ``value_of(layer, i, ratio)``: the metric of one point of the sweep.
ValueOf = Callable[[str, int, float], float]

#: The default grid: tenths, then the high end a 90-99% target needs measured rather than
#: extrapolated (so a suggestion need not push every layer to the end of the grid).
DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


# --- the sweep -------------------------------------------------------------------------------


def sensitivity(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float] | None = None,
    *,
    ratios: Sequence[float] | None = None,
    layers: str | Sequence[str] | None = None,
    types: Iterable[str | type] | str | type | None = None,
    granularity: str = "element",
    example_inputs: Any = None,
    higher_is_better: bool = True,
    metric: str | None = None,
    max_layers: int | None = None,
    early_stop: float | None = None,
    progress: bool = True,
    callback: Callable[[SensitivityResult, str, float], None] | None = None,
    include_output: bool = False,
    method: str = "l1",
    reconstruct: bool = False,
    remove: bool = False,
    executor: Executor | str | None = None,
    workers: int | None = None,
) -> SensitivityResult:
    """Prune each layer alone by L1 at each ratio, evaluate, and restore it bit-exactly.

    The model is evaluated in eval mode (each module's flag is restored afterwards) and is
    bit-exactly unchanged when the sweep ends, fails or is interrupted (Ctrl-C returns the
    partial result with ``complete=False``); that is checked by checksum before the result
    says so. An ``evaluate`` may fine-tune briefly before it measures: parameters it changes
    through backward and optimizer steps are put back after every call; any other write
    to a parameter is refused.

    Args:
        model: The model to analyse (not changed).
        evaluate: ``evaluate(model) -> float``; higher is better unless
            ``higher_is_better=False``. ``None``: a data-free proxy on ``example_inputs``
            (agreement of the pruned with the dense output), labelled as a proxy.
        ratios: Fractions to prune, each in (0, 1); default 0.1, 0.2, …, 0.9, 0.95, 0.98,
            0.99 (:data:`DEFAULT_RATIOS`).
        layers: Glob pattern(s) of layers to analyse; default every layer ``prune_``
            prunes by default (Linear, Conv, ConvTranspose, MultiheadAttention's in/out
            projections, LSTM/GRU/RNN gate matrices). The result's notes state the share
            of parameters not analysed and why.
        types: Layer types to analyse (names or classes); embeddings are opt-in.
        granularity: ``"element"`` (unstructured), ``"block"`` (4×1 blocks, see
            :func:`~nbcompress.prune_`) or ``"channel"`` (whole output channels; attention
            and recurrent layers have none: left out with a note, refused if asked for
            by ``types``, as ``prune_`` does).
        example_inputs: Input for the proxy and for MAC estimates.
        higher_is_better: ``False`` for losses, perplexity, RMSE.
        metric: Name of the metric (default: the function's name).
        max_layers: Analyse only this many layers, the largest first.
        early_stop: Stop a layer's sweep once its metric fell by more than this.
        progress: Print plain-text progress to stderr.
        callback: ``callback(result_so_far, layer, ratio)`` after each evaluation.
        include_output: Analyse the output layer too. By default it is left alone, as
            ``prune_`` and ``%prune`` leave it (found from the forward pass, see
            :func:`~nbcompress.engine.core.layers.output_layers`), so that a suggestion
            prunes exactly the layers ``%prune`` would and its sparsity is over them.
        method: How each point prunes its layer: ``"l1"`` or ``"wanda"`` (input norms
            collected once on the dense model; see :func:`~nbcompress.prune_`).
        reconstruct: Re-fit the kept weights of each point's layer by least squares on
            the calibration inputs (slow: a solve per point).
        remove: Sweep coupled channel groups by physical removal instead of layers
            (``granularity="channel"`` and ``example_inputs`` required; default ratios
            0.1-0.9): see :mod:`~nbcompress.engine.sensitivity.groups`. Runs serially.
        executor: Evaluate the points on this :class:`concurrent.futures.Executor`'s
            workers (a dask ``Client(...).get_executor()``, a ``ProcessPoolExecutor``) or
            on the dask scheduler at this address (``"tcp://host:8786"``). The model,
            ``evaluate`` and the pruning settings are shipped once per worker; each worker
            prunes its own copy, the live model is never touched. The result is identical
            to the serial sweep's (same points, values, order and notes, plus one note
            saying where it ran): points come back in any order and are recorded in the
            serial order, so ``callback`` and progress lines follow that order as points
            complete, and with ``early_stop`` (or the proxy's collapse) a layer's later
            points evaluated ahead are dropped. ``evaluate`` must depend on the model only
            (seed any randomness inside it). The baseline and the calibration run here.
        workers: Start a local dask cluster of this many worker processes on 127.0.0.1
            for the call (a process pool without dask) and close it after; 1: serial.

    Calibration inputs of ``"wanda"`` and ``reconstruct`` are ``example_inputs``, else
    the batches ``evaluate`` feeds the model on the unpruned model (recorded, not copied;
    ``result.calibration`` keeps them for the suggestion's re-fitted candidates).

    Returns:
        The result, also remembered as the model's latest (see :func:`latest`).

    Raises:
        TypeError: ``evaluate`` is not callable or returns something other than a number.
        ValueError: Ratios outside (0, 1), an empty layer selection, or a bad option.
        EvaluationError: ``evaluate`` raised, or changed a parameter without a gradient
            step; the partial result is on ``err.result``.
        ModelNotRestored: The model differs from before the sweep (a write no hook could
            see, or a restore that could not finish); the message names the tensors.
    """
    check_module(model)
    if remove:
        refuse_remote(executor, workers, "remove=True (the sweep over channel groups)")
        # locals() here are exactly sensitivity()'s arguments by name (nothing else is bound yet).
        return _group_sweep(model, evaluate, ratios, locals())
    ratio_list = check_ratios(ratios, DEFAULT_RATIOS)
    check_sweep_options(evaluate, example_inputs, max_layers, early_stop, granularity)
    # With evaluate, calibration may come from its calls: checked once they are recorded.
    plain = not check_pruning(method, example_inputs if evaluate is None else (), reconstruct)
    inputs = None
    if example_inputs is not None:
        # A list is positional arguments to the proxy, but batches to calibrate on.
        inputs = as_inputs(example_inputs) if plain else calibration_inputs(example_inputs)[0]
        remember_inputs(model, inputs)

    def select() -> tuple[dict[str, nn.Module], list[str]]:
        return select_sweep_layers(
            model, layers, types, max_layers, granularity, include_output=include_output
        )

    selected, notes = select()
    guessed = not include_output and output_layers(model).guessed
    fingerprint = Fingerprint.of(model)  # "restored" is claimed only once checked against it
    trained: set[str] = set()
    with (
        resolve_executor(executor, workers) as pool,  # None: here; a cluster of ours closes
        verified(model, fingerprint, "sensitivity") as check,
        measuring(model),
    ):
        prefix, proxy = _proxy(model, inputs, selected, evaluate, pool)
        start = time.perf_counter()
        with captured_inputs(model) as seen:
            baseline = proxy(model) if proxy else call_evaluate(evaluate, model, BASE, trained)
        check_baseline(baseline, evaluate)
        given = example_inputs is not None and not plain
        calibration = example_inputs if given else _replayable([inputs] if inputs else seen)
        if inputs is None and seen:
            remember_inputs(model, seen[0])
            if guessed:  # the forward pass evaluate ran shows the real output layer now
                selected, notes = select()
        result = SensitivityResult(
            layers=list(selected), ratios=ratio_list, baseline=baseline,
            curves={n: [None] * len(ratio_list) for n in selected},
            sizes={n: layer_size(m) for n, m in selected.items()},
            macs=layer_macs(model, selected, inputs),
            metric=metric or (proxy.name if proxy else metric_name(evaluate)),
            higher_is_better=bool(higher_is_better), proxy=proxy is not None,
            granularity=granularity, evaluations=1, seconds=0.0, complete=False,
            notes=notes + ([proxy.note] if proxy is not None and proxy.note else []),
            start={n: layer_sparsity(m, granularity) for n, m in selected.items()},
            method=method, reconstruct=bool(reconstruct),
        )  # fmt: skip
        result.calibration = calibration
        remember(model, result, evaluate=evaluate, example_inputs=example_inputs)
        check.result = result
        run = _Run(model, selected, result, proxy or evaluate, early_stop, callback, start, trained)
        pruning = trial_pruning(model, selected, method, calibration, reconstruct)
        run.sweep_on(pool, prefix, pruning, progress)
    run.verified_notes()
    return result


def _proxy(
    model: nn.Module, inputs: Any, selected: dict[str, nn.Module], evaluate: Any, pool: Any
) -> tuple[Prefix | None, Proxy | None]:
    """The replay of forwards and the proxy metric (both ``None`` with an ``evaluate``).

    On an executor there is no replay: the workers run full forwards (the same values).
    """
    if evaluate is not None:
        return None, None
    prefix = Prefix(model, inputs, selected) if pool is None else None
    return prefix, Proxy(model, inputs, prefix.output if prefix else None)


def _group_sweep(model: nn.Module, evaluate: Any, ratios: Any, given: dict) -> SensitivityResult:
    """``sensitivity(remove=True)``: the options checked, then the sweep over groups."""
    if given["granularity"] != "channel" or given["types"] is not None:
        raise ValueError(
            "remove: removal takes whole coupled channel groups; pass granularity='channel' "
            "(--granularity channel) and no types."
        )
    if given["reconstruct"] or given["max_layers"] is not None:
        raise ValueError("remove: reconstruct and max_layers are per-layer options; drop them.")
    check_sweep_options(evaluate, given["example_inputs"], None, given["early_stop"], "channel")
    keys = "example_inputs layers include_output method higher_is_better metric early_stop"
    options = {k: given[k] for k in (*keys.split(), "progress", "callback")}
    return group_sensitivity(
        model, evaluate, check_ratios(ratios, GROUP_RATIOS), GroupSweep(**options)
    )


def _replayable(seen: list[tuple]) -> list[Any] | None:
    """Recorded one-argument calls as calibration batches (a tensor or a mapping each)."""
    batches = [b[0] for b in seen if len(b) == 1]
    return batches or None


@dataclass
class _Run:
    """State of one sweep: what to evaluate and where results go."""

    model: nn.Module
    selected: dict[str, nn.Module]
    result: SensitivityResult
    evaluate: Callable[[nn.Module], Any]
    early_stop: float | None
    callback: Callable[[SensitivityResult, str, float], None] | None
    start: float
    trained: set[str] = field(default_factory=set)
    interrupted: int = 0  # 1 + index of the note on an interruption, 0 if none
    prefix: Prefix | None = None
    measure: Measure | None = None  # how a point is pruned and evaluated
    last_notes: list[str] = field(default_factory=list)  # e.g. where the points ran

    def verified_notes(self) -> None:
        """Notes that need the model checked first (the sweep is over and it matched)."""
        res = self.result
        if self.trained:
            res.notes.append(
                f"evaluate trained {len(self.trained)} parameter tensor(s) "
                f"({shown(sorted(self.trained))}); they were put back after every call, so "
                "each point starts from the model as it was."
            )
        if self.interrupted:
            res.notes[self.interrupted - 1] += " The model is restored (verified by checksum)."
        res.notes.extend(self.last_notes)

    def sweep_on(
        self, executor: Executor | None, prefix: Prefix | None, pruning: dict, progress: bool
    ) -> None:
        """Sweep here (with ``prefix``'s replay) or on ``executor``'s workers.

        ``pruning``: how each point prunes (from ``trial_pruning``).
        """
        g, res, self.prefix = self.result.granularity, self.result, prefix
        self.measure = Measure(self.model, self.selected, g, self.evaluate, pruning, sorted_l1=True)
        lines = Progress(progress, len(res.layers) * len(res.ratios))
        if executor is None:
            self.sweep(lines)
        else:
            sweep_on_executor(self, executor, lines)

    def evaluate_at(self, name: str, ratio: float) -> float:
        """Metric with only ``name`` pruned at ``ratio``; the layer is restored on exit."""
        return self.measure({name: ratio}, self.trained)

    def sweep(self, progress: Progress, value_of: ValueOf | None = None) -> None:
        """Evaluate every layer × ratio; on error or Ctrl-C keep what was measured.

        ``value_of(layer, i, ratio)``: where values come from (default: evaluated here).
        """
        local = lambda name, i, ratio: self.evaluate_at(name, ratio)  # noqa: E731
        each = lambda name: self._layer(name, progress, value_of or local)  # noqa: E731
        self.interrupted = run_all(self.result, self.result.layers, each, self.start)

    def evaluated(self, name: str, ratio: float) -> bool:
        """Whether the point is evaluated (a layer already that sparse is not: no change)."""
        return ratio > self.result.start.get(name, 0.0) + 1e-9

    def _layer(self, name: str, progress: Progress, value_of: ValueOf) -> None:
        try:
            if self.prefix is None:
                self._ratios(name, progress, value_of)
                return
            with self.prefix.replaying(name):
                self._ratios(name, progress, value_of)
        finally:
            self.measure.forget()

    def _ratios(self, name: str, progress: Progress, value_of: ValueOf) -> None:
        res = self.result
        # The proxy's input-blind level: a layer down there has collapsed.
        floor = self.evaluate.floor_at(name) if isinstance(self.evaluate, Proxy) else None
        for i, ratio in enumerate(res.ratios):
            evaluated = self.evaluated(name, ratio)
            value = value_of(name, i, ratio) if evaluated else res.baseline
            if self._record(name, i, value, evaluated, floor, progress):
                break
        nan = [f"{r:g}" for r, v in zip(res.ratios, res.curves[name], strict=True) if v != v]
        if nan:
            res.notes.append(
                f"{name}: evaluate returned NaN at ratio {', '.join(nan)} (recorded as measured; "
                "suggestions treat the layer as collapsed there)."
            )

    def _record(
        self, name: str, i: int, value: float, evaluated: bool, floor: float | None, progress: Any
    ) -> bool:
        """Record point ``i`` of layer ``name``; whether it is the layer's last."""
        res, ratio = self.result, self.result.ratios[i]
        sign = 1.0 if res.higher_is_better else -1.0
        res.evaluations += evaluated
        res.curves[name][i] = value
        res.seconds = time.perf_counter() - self.start
        stop = self.early_stop is not None and sign * (res.baseline - value) > self.early_stop
        collapsed = evaluated and _collapsed(value, floor, res.baseline)
        last = stop or collapsed or i == len(res.ratios) - 1
        if collapsed and not stop and i < len(res.ratios) - 1:
            self._fill(name, i, value, floor)
            progress.total -= len(res.ratios) - 1 - i
        progress.step(res, name, last, evaluated)
        if self.callback is not None:
            self.callback(res, name, ratio)
        if stop:
            res.notes.append(
                f"{name}: early stop after ratio {ratio:g} (drop above {self.early_stop:g})."
            )
        return last

    def _fill(self, name: str, i: int, value: float, floor: float) -> None:
        """Fill the ratios above ``i`` with ``value``: the layer collapsed, more cannot help."""
        res = self.result
        rest = res.ratios[i + 1 :]
        for j in range(i + 1, len(res.ratios)):
            res.curves[name][j] = value
            res.filled.setdefault(name, []).append(j)
        res.notes.append(
            f"{name}: collapsed at ratio {res.ratios[i]:g} ({res.metric} {fmt_value(value)}, at "
            f"the level of an output that ignores the input, {fmt_value(floor)}); "
            + (
                f"ratio {rest[0]:g} is"
                if len(rest) == 1
                else f"ratios {rest[0]:g}–{rest[-1]:g} are"
            )
            + " filled with that value, not evaluated."
        )


def _collapsed(value: float, floor: float | None, baseline: float) -> bool:
    """Whether a proxy value is down at the level of an input-blind output (or NaN)."""
    if floor is None:
        return False
    if value != value:
        return True
    # Within 2% of the way from that level up to the dense model's: lower is noise.
    return value <= floor + 0.02 * (baseline - floor)
