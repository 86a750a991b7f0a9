"""Measure each layer dense vs on the sparse kernels, and swap in what is really faster.

The analysis runs the model once with forward hooks to capture every eligible layer's real
input; then, one layer at a time, it packs the sparse candidates from the weights (the
model is untouched until the decision is made), checks their outputs against the dense
layer, races dense and sparse side by side (:func:`nbcompress.timing.race`, dense the
incumbent) and keeps only the chosen candidate, so one layer's candidates are alive at a
time. :func:`clear_win` is the decision policy on top of the race. :func:`sparsify_` then
installs the winners inside one history transaction, so ``undo_`` restores the dense
modules bit-exactly. Decisions are kept in the tuning record (:mod:`.recorded`): a later
run with the same weight pattern, input bucket and threads builds only the recorded
choice and checks its output, without racing. The kernels are tuned during the analysis
at the shapes it is shown (``other_inputs`` too, :mod:`.shapes`), so that the forward
calls after it predict from those; layers far below break-even are not timed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from nbcompress.engine.core.history import transaction
from nbcompress.engine.core.layers import PRUNABLE_TYPES, select_layers
from nbcompress.engine.core.memory import release_freed_memory, twin
from nbcompress.engine.core.outputs import compare_outputs
from nbcompress.engine.core.runs import join_runs
from nbcompress.engine.core.summary import capture_calls
from nbcompress.engine.core.validation import as_inputs, call_model, check_module, run_forward
from nbcompress.engine.speedup import bnfold, racing, recorded, relayout, shapes, variants
from nbcompress.engine.speedup.analysis import Analysis, LayerResult, SparsifyOptions, tolerance
from nbcompress.engine.speedup.candidates import break_even, build, paths_of
from nbcompress.engine.speedup.coverage import dense_reason, uncovered
from nbcompress.engine.speedup.explain import runs_on
from nbcompress.engine.speedup.fused import fuse_runs, settle_runs
from nbcompress.engine.speedup.guard import unchanged
from nbcompress.kernels import tuning
from nbcompress.kernels.notices import COMPILE_NOTICE
from nbcompress.timing import Race, measure, race

__all__ = ["analyse", "clear_win", "install_", "sparsify_", "unchanged"]

MIN_SPARSITY = shapes.MIN_SPARSITY  # below it CSR moves more bytes than dense


def clear_win(race: Race, name: str, min_gain: float) -> bool:
    """Whether ``name`` clearly beat the incumbent (dense) in ``race``: the sparsify policy.

    Robust to a noisy machine: the median per-round speed-up must reach ``1 + min_gain``,
    and ``name`` must have been faster in at least three rounds out of four (the 25th
    percentile of its per-round speed-up above 1), so a lucky stretch of samples cannot
    flip a decision. Kernel choices use :meth:`Race.winner` instead: there a wrong pick
    costs a few percent, here it swaps the user's layer.
    """
    return 1 / race.ratio(name) >= 1 + min_gain and race.speedup_quantile(name, 0.25) > 1


def _race(candidates: dict[str, Callable[[], object]], repeats: int) -> Race:
    """Race ``candidates`` (``dense`` first, the incumbent) in ``repeats`` interleaved rounds.

    A sparse candidate makes its own kernel choice on its first call per input shape (a
    race nested in this one): the output check or this race's warm-up calls make it before
    any timing, so a kernel choice is never timed as part of a candidate. Every sample
    starts warm, as layers run inside a model call (:mod:`.racing`).
    """
    return racing.layer_race(candidates, repeats, race)


def _measure_layer(
    name: str,
    module: nn.Module,
    calls: list[tuple],
    opts: SparsifyOptions,
    seen: dict[str, int],
) -> LayerResult:
    (args, kwargs, output), others = calls[0], calls[1:]
    x = args[0]
    key = (*recorded.layer_key(module, x.shape, opts), *relayout.tag(x))
    if others:  # the decision also rests on the other inputs' shape buckets
        key = (*key, "also", *(tuple(shapes.shape_bucket(("in", *c[0][0].shape))) for c in others))
    res = LayerResult(name, module, tuple(x.shape), shapes.zeros(module), key=key)
    # A decision that could only be "dense" is not timed; speedup (remeasure) shows figures.
    skip = None if opts.remeasure else shapes.too_dense(res.sparsity)
    if skip is not None:  # neither built nor timed (nor recorded)
        res.reason, res.key = skip, None
        return res
    entry = recorded.lookup(recorded.LAYER, key, opts)

    def check(paths: list[str]) -> dict[str, Callable[[], object]] | None:
        return _candidates(res, module, x, output, paths, seen)

    if entry is not None and recorded.reuse(res, entry, check):
        return res  # measured in an earlier run on this CPU; its output checked just now
    fns = check(paths_of(module, opts, res.sparsity))
    if fns is None:
        res.key = None  # cannot be packed: nothing to record
        return res
    fns = {"dense": lambda: module(*args, **kwargs), **fns}
    res.race = _race(fns, opts.repeats)
    res.times = res.race.times
    res.sure = {k: res.race.speedup_quantile(k, 0.25) for k in fns}
    _decide(res, opts)
    shapes.confirm(res, others, opts, _race)
    if entry is not None:  # reached only when the recorded choice was refused
        res.reason += f"; recorded {entry.choice} refused (build or output check): re-measured"
    # A refused record entry (or remeasure) is replaced; a fresh one may lose to a racer's.
    replace = entry is not None or opts.remeasure
    recorded.remember(recorded.LAYER, key, res.chosen, recorded.measured_gain(res), replace)
    # Only the chosen candidate can be installed; the others are freed now, so that at
    # most one layer's candidates are alive at a time (not every layer's, every format).
    res.candidates = {f: c for f, c in res.candidates.items() if f == res.chosen}
    del fns
    res.break_even = break_even(module, x, res, measure)
    return res


def _candidates(
    res: LayerResult,
    module: nn.Module,
    x: torch.Tensor,
    output: Any,
    paths: list[str],
    seen: dict[str, int],
) -> dict[str, Callable[[], object]] | None:
    """Build and check ``paths`` of ``module`` into ``res``; their timed calls.

    ``None``: the first path cannot pack the layer (reason given); later ones are left out.
    """
    fns: dict[str, Callable[[], object]] = {}
    for fmt in paths:
        try:
            cand = build(fmt, module, seen)
        except ValueError as err:
            if fmt != paths[0]:
                continue
            res.reason = str(err).removeprefix("module: ")
            res.candidates.clear()
            return None
        if cand is None:
            continue
        with torch.no_grad():
            diff = compare_outputs(output, cand(x), arg=f"layers[{res.name!r}]")
        res.errors[fmt] = diff.max_abs
        res.tolerances[fmt] = tolerance(fmt, diff.peak)
        res.candidates[fmt] = cand
        fns[fmt] = lambda cand=cand: cand(x)
    return fns


def _decide(res: LayerResult, opts: SparsifyOptions) -> None:
    res.allowed = tuple(f for f in res.candidates if opts.allows(f))
    if not res.accurate:
        res.reason = "sparse output outside tolerance; kept dense"
        return
    # Shown gains are ratios of the medians the report shows; clear_win decides.
    best = min(res.accurate, key=lambda f: res.times[f].median)
    gain = res.times["dense"].median / res.times[best].median
    if res.sparsity < MIN_SPARSITY:  # int8 twins too: dense models are %quantize's
        res.reason = f"only {res.sparsity:.0%} sparse: CSR moves more bytes than dense; kept dense"
    elif not clear_win(res.race, best, opts.min_gain):
        res.reason = f"dense is as fast or faster here (best sparse {best}: {gain:.2f}×)"
    else:
        res.chosen = best
        res.reason = f"{best} measured {gain:.2f}× faster than dense"


def _end_to_end(
    model: nn.Module, inputs: tuple, result: Analysis, opts: SparsifyOptions, time_whole: bool,
    graph: bnfold.ConvGraph,
) -> None:  # fmt: skip
    chosen = result.chosen
    if not chosen and not time_whole and not opts.remeasure:
        return  # sparsify_ with nothing chosen: the model stays as it is, nothing to time
    with torch.no_grad():
        ref = call_model(model, inputs)
        # Shares every dense tensor with ``model``; BatchNorms folded etc. where faster.
        double = twin(model, variants.choose(model, inputs, ref, result, opts, graph, _race))
        join_runs(double)  # sparse runs: timed as they will be installed (core/runs.py)
        out = call_model(double, inputs)
    # Every floating tensor of any output structure (dicts, tuples, dataclasses) is compared;
    # an output holding none is refused rather than passing a check of nothing.
    diff = compare_outputs(ref, out)
    result.max_abs_diff = diff.max_abs
    fmts = {r.chosen for r in chosen.values()} or {"csr"}
    result.tolerance = max(tolerance(f, diff.peak) for f in fmts)
    key = recorded.model_key(result)
    if not time_whole and recorded.all_recorded(result):  # outputs checked above; time reused
        result.recorded = recorded.lookup(recorded.MODEL, key, opts)
        if result.recorded is not None:
            return
    result.race = _race(
        {
            "dense": lambda: call_model(model, inputs),
            "compressed": lambda: call_model(double, inputs),
        },
        opts.repeats,
    )
    result.dense, result.compressed = result.race.times["dense"], result.race.times["compressed"]
    result.sure = result.race.speedup_quantile("compressed", 0.25)
    faster = clear_win(result.race, "compressed", opts.min_gain)
    gain = result.dense.median / result.compressed.median
    replace = opts.remeasure or not recorded.all_recorded(result)
    recorded.remember(recorded.MODEL, key, "faster" if faster else "not faster", gain, replace)


def analyse(
    model: nn.Module,
    example_inputs: Any,
    options: SparsifyOptions | None = None,
    *,
    progress: Callable[[int, int, str], None] | None = None,
    time_whole: bool = True,
    other_inputs: Any = None,
    **overrides: Any,
) -> Analysis:
    """Measure every eligible layer dense vs sparse and decide; the model is not changed.

    The model runs in eval mode; its training flags, parameters and buffers (BatchNorm
    statistics included) are as before when this returns or fails.

    Args:
        model: The (pruned) model.
        example_inputs: A tensor or tuple of tensors shaped like a real batch.
        options: What to consider and how to decide (default :class:`SparsifyOptions`).
        progress: Called as ``progress(done, total, name)`` after each of the ``total``
            selected layers is measured, then once more (``done == total``) as the
            end-to-end race of the whole model starts.
        time_whole: Time the whole model even when every layer's decision and the
            end-to-end verdict are in the tuning record (for callers that need the figure,
            e.g. a latency objective); ``False`` reuses the verdict, checking outputs only,
            and (unless ``remeasure``) times nothing end to end when no layer was chosen.
        other_inputs: Further example inputs of other shapes the model will run (a text
            model's short and long batches): a layer chosen on ``example_inputs`` stays
            dense if it is slower than dense on any of them (:mod:`.shapes`).
        **overrides: Fields of :class:`SparsifyOptions` to change, e.g. ``repeats=5``.

    Returns:
        Per-layer results and the end-to-end comparison.
    """
    check_module(model)
    opts = SparsifyOptions.of(options, **overrides)
    inputs = as_inputs(example_inputs)
    others = shapes.check_others(other_inputs)
    graph = bnfold.conv_graph(model)  # before eval_mode: in the user's own training flags
    # Kernel choices are made now, at the shapes shown (forward calls predict them).
    with unchanged(model), tuning.eager():
        ref = run_forward(model, inputs)
        compare_outputs(ref, ref)  # refuse at once an output holding nothing to check
        selected, _ = select_layers(
            model, opts.layers, opts.types or PRUNABLE_TYPES, include_output=True
        )
        reasons = {n: dense_reason(model, n, m) for n, m in selected.items()}
        if all(r is not None for r in reasons.values()):
            raise ValueError(
                "types: sparse kernels exist for nn.Linear and nn.Conv2d only (and not for "
                "layers a fused fast path reads); "
                + "; ".join(f"{n}: {r}" for n, r in list(reasons.items())[:3])
                + "."
            )
        step = progress or (lambda done, total, name: None)
        analysis = _measure(model, (inputs, others), selected, reasons, opts, step)
        if not others:  # (the other shapes' inputs are not captured again)
            relayout.remeasure(model, inputs, analysis, _measure_layer, opts)
        step(len(selected), len(selected), "timing the whole model")
        _end_to_end(model, inputs, analysis, opts, time_whole, graph)
    _final_verdict(analysis, opts.min_gain)
    return analysis


def _measure(
    model: nn.Module,
    inputs: tuple[tuple, list[tuple]],
    selected: dict[str, nn.Module],
    reasons: dict[str, str | None],
    opts: SparsifyOptions,
    step: Callable[[int, int, str], None],
) -> Analysis:
    """Each selected layer measured on its real input (or listed with why it stays dense)."""
    eligible = {n: m for n, m in selected.items() if reasons[n] is None}
    calls = capture_calls(model, eligible, inputs[0])
    more = shapes.other_calls(model, eligible, inputs[1], calls) if inputs[1] else {}
    seen: dict[str, int] = {}
    results = []
    for name, module in selected.items():
        call = calls.get(name)
        called = call is not None and call[0] and isinstance(call[0][0], torch.Tensor)
        if reasons[name] is not None or not called:
            why = reasons[name] or "not called in the example run"
            results.append(LayerResult(name, module, sparsity=shapes.zeros(module), reason=why))
        else:
            results.append(_measure_layer(name, module, [call, *more.get(name, [])], opts, seen))
            release_freed_memory()  # this layer's freed candidates: not the next one's peak
        step(len(results), len(selected), name)
    groups, total = uncovered(model, selected)
    return Analysis(results, warnings=seen, uncovered=groups, total_params=total)


def _final_verdict(analysis: Analysis, min_gain: float) -> None:
    if not analysis.chosen:
        analysis.verdict = "no layer measured faster on the sparse kernels; model left dense"
        return
    entry = analysis.recorded
    if entry is None:
        gain = analysis.dense.median / analysis.compressed.median
        faster = clear_win(analysis.race, "compressed", min_gain)
    else:
        gain, faster = 1 + entry.margin, entry.choice == "faster"
    when = "" if entry is None else f", {recorded.WHERE}"
    if not faster or analysis.max_abs_diff > analysis.tolerance:
        why = "outputs differ beyond tolerance" if faster else f"{gain:.2f}×{when}"
        for r in analysis.layers:
            if r.chosen != "dense":
                r.reason += f"; dropped: whole model {why if faster else 'not faster'} end to end"
                r.chosen, r.dropped = "dense", True
        analysis.verdict = f"not faster end to end ({why}); model left dense"
        return
    analysis.verdict = f"{runs_on(analysis.layers)}: {gain:.2f}× faster end to end{when}"


def install_(model: nn.Module, analysis: Analysis, inputs: Any = None) -> nn.Module:
    """Install the modules ``analysis`` chose, in one undoable history step.

    Args:
        model: The model :func:`analyse` measured.
        analysis: Its result; with nothing chosen the model is left alone (with a warning).
        inputs: Its example inputs: runs allowed ONNX Runtime int8 may fuse (:mod:`.fused`).

    Returns:
        The model (modified in place; a failure part-way rolls every layer back).
    """
    settle_runs(model, analysis, inputs)  # ORT int8 inside a run: as one graph only
    chosen = analysis.chosen
    if not chosen:
        # Points at the user's line: install_ ← sparsify_/speedup ← their notice decorator.
        warnings.warn(f"sparsify_: {analysis.verdict}.", stacklevel=4)
        return model
    detail = f"{runs_on(analysis.layers)} ({analysis.verdict.split(': ')[-1]})"
    with transaction(model, "sparsify", detail) as tx:
        for name, res in chosen.items():
            # The replacement takes the dense layer's mode (an eval model stays all eval).
            res.replacement.train(res.module.training)
            bnfold.install(tx, name, res.replacement)  # its BatchNorm folded in, if any
        join_runs(model, tx.save)  # before an ORT graph races them; what it leaves, after
        analysis.fused = fuse_runs(model, tx, analysis, inputs)
        join_runs(model, tx.save)
        tx.info["chosen"] = {n: r.chosen for n, r in analysis.chosen.items()}
        tx.info["reasons"] = {r.name: r.reason for r in analysis.layers}
        tx.info["end_to_end"] = {"dense": analysis.dense, "compressed": analysis.compressed}
    return model


@COMPILE_NOTICE  # one line about kernel compilation for the whole call
def sparsify_(
    model: nn.Module, example_inputs: Any, *, other_inputs: Any = None, **options: Any
) -> nn.Module:
    """Run each eligible layer on the sparse kernels where that measured faster, in place.

    Every ``nn.Linear``/``nn.Conv2d`` (or those matching ``layers``/``types``) is timed
    dense and sparse on its real input from ``example_inputs``; a layer is replaced only
    if a sparse module clearly won the race (:func:`clear_win`: at least ``min_gain``
    faster) and its output matched within the stated tolerance, and only if the whole
    model is then faster end to end (every floating tensor of the output compared). The
    model is measured in eval mode and only the swapped layers change (training flags and
    BatchNorm statistics stay as they were). The change is one history step (``undo_``
    restores the dense layers bit-exactly); a failure part-way leaves the model as it was.
    An eval BatchNorm reading only a swapped conv is folded into it where faster (``variants``).

    Args:
        model: The (pruned) model.
        example_inputs: A tensor or tuple of tensors shaped like a real batch.
        other_inputs: A list of further example inputs with the other shapes the model
            will run (e.g. a text model's short and long batches): a layer is swapped only
            if it is not slower than dense on any of them either, and the kernels are
            tuned for those shapes now rather than on first use.
        **options: Fields of :class:`SparsifyOptions`: ``layers`` (glob pattern(s) on
            qualified layer names), ``types`` (default every Linear / Conv type; those
            without a sparse kernel are listed with the reason), ``allow_int8``
            (off: int8 values change results by rounding), ``allow_bsr`` (block-sparse
            when weights come in 4-row blocks; on), ``repeats`` (timed rounds, 15) and
            ``min_gain`` (required relative speed-up, 0.05 = 5% faster than dense);
            ``remeasure`` (race every layer even where the tuning record holds its
            decision, and record the new one; off: a recorded decision is reused, its
            output still checked).

    Returns:
        The model (modified in place).
    """
    analysis = analyse(
        model, example_inputs, time_whole=False, other_inputs=other_inputs, **options
    )
    return install_(model, analysis, example_inputs)
