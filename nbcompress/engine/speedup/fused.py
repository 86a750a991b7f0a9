"""Runs of Linears inside an ``nn.Sequential`` on one ONNX Runtime int8 graph, at install.

``sparsify_``/``speedup`` choose each layer's path on its own input, in isolation. Layer by
layer, ONNX Runtime's dense int8 pays for every return to torch between two layers (four
BERT-FFN Linears: 1,274 µs one by one, 751 µs as one graph here, see
:mod:`nbcompress.engine.quantize.ort_chain`), so a run chosen per layer (sparse or ORT) may
lose to the same run as one graph. After the per-layer choice is installed, every run of
≥ 2 Linears (activations between) whose ONNX Runtime twin was allowed (``allow_int8``)
and within its output tolerance is handed to ``%quantize``'s own
:func:`~nbcompress.engine.quantize.ort_chain.fuse_chains`: it races the run as installed
against the graph on the run's real input and fuses only where the graph is clearly faster
and no less accurate (``NBCOMPRESS_ORT_FUSE=0`` switches it off), inside the same history
transaction, so one ``undo_`` removes it with the rest.

Inside such a run ONNX Runtime int8 is taken as the whole graph or not at all
(:func:`settle_runs`, before installing): a layer that won its own race on ORT, between
neighbours on the sparse kernels, pays two torch ↔ ORT crossings its isolated race never
saw (BERT-FFN ×2 at 95%, batch 8: two ORT and two sparse int8 layers ran 2.85× torch
fp32, all four sparse 5.11×). Its fastest other path within tolerance (or dense) stands
in, and the graph then races the run as it is.

:func:`graph_wins` is ``sparsify_``'s rule for that race: the graph must be :data:`MARGIN`
faster in the median round and faster in three rounds out of four; a race clear neither
way is run again, :data:`LONGER` times as long. It decides once ``fuse_chains`` takes a
judge (a change to :mod:`~nbcompress.engine.quantize.ort_chain`, not made here); until
then ``%quantize``'s own rule decides, 15% faster (``choice.TIE``). On BERT-FFN ×2 with
4×1 blocks at 90%, 2 threads, batch 8, the graph took 0.81 of the run's time on sparse
int8 over 60 rounds; 9-round medians spread 0.76–0.86, and that rule left the run unfused
in 3 of 10 installs here (one such model 1.26× slower than the fused ones, same race).
At 1 thread the same graph is 1.2–1.5× slower than the run: never close to either rule.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from torch import nn

from nbcompress.engine.core.validation import as_inputs
from nbcompress.engine.speedup import bnfold
from nbcompress.engine.speedup.analysis import Analysis, LayerResult, rtol
from nbcompress.engine.speedup.candidates import build
from nbcompress.engine.speedup.explain import restate
from nbcompress.timing import Race, race

__all__ = [
    "GRAPH",
    "LONGER",
    "MARGIN",
    "PATH",
    "REPEATS",
    "fusable",
    "fuse_runs",
    "graph_wins",
    "settle_runs",
]

#: The per-layer path a fused run's layers take (its module is ``OrtInt8Linear``).
PATH = "ort_int8"
#: Timed rounds of the race of a run as installed against its graph.
REPEATS = 9
#: The challenger's name in that race (the run as installed, the incumbent, comes first).
GRAPH = "graph"
#: Required gain of the graph in the median round: ``sparsify_``'s default ``min_gain``.
MARGIN = 0.05
#: A race clear neither way is run again with this many times its rounds.
LONGER = 3
#: Each timed sample lasts at least this long (seconds), as in ``sparsify_``'s races.
_MIN_SAMPLE = 2e-4


def _clear(timed: Race) -> bool:
    """The graph won by :data:`MARGIN` in the median round and in 3 rounds of 4."""
    return timed.winner(MARGIN) == GRAPH and timed.speedup_quantile(GRAPH, 0.25) > 1


def graph_wins(
    fns: dict[str, Callable[[], object]], rounds: int, timer: Callable[..., Race] | None = None
) -> Race | None:
    """Race a run as installed (first) against its graph (:data:`GRAPH`); the race if it won.

    Won: :data:`MARGIN` faster in the median round and faster in three rounds out of four.
    Lost at once where the graph was no faster in the median round; anything between (a
    gain under the margin, or a median win without three rounds of four) races again,
    :data:`LONGER` × ``rounds``, and that race decides.

    Args:
        fns: ``{incumbent: the run as installed, GRAPH: the graph}``, zero-argument calls.
        rounds: Timed rounds of the first race.
        timer: Runs a race, with :func:`nbcompress.timing.race`'s arguments (``None``:
            that function).

    Returns:
        The deciding race if the graph won (its gain: ``1 / ratio(GRAPH)``), else ``None``.
    """
    timer = timer or race  # looked up now: a test's fake of this module's race applies
    first = timer(fns, rounds=rounds, warmup=1, min_sample=_MIN_SAMPLE)
    if _clear(first):
        return first
    if first.ratio(GRAPH) >= 1:
        return None
    longer = timer(fns, rounds=LONGER * rounds, warmup=0, min_sample=_MIN_SAMPLE)
    return longer if _clear(longer) else None


def fusable(res: LayerResult) -> bool:
    """Whether ``res``'s layer may join an ORT int8 graph: the twin allowed and accurate.

    Not a layer an activation (or anything else) was folded into (:mod:`.bnfold`): the
    graph would be built from its float Linear and the ``nn.Identity`` left in the
    activation's place, without the activation (outputs 0.3–0.7 off, and timed so).
    """
    rewrite = None if res.replacement is None else bnfold.planned(res.replacement)
    folded = rewrite is not None and bool(rewrite.removed)
    return type(res.module) is nn.Linear and PATH in res.accurate and not folded


def _job(model: nn.Module, found: dict[str, LayerResult], inputs: Any) -> Any:
    """``quantize_``'s job of ``ort_chain`` over the layers ``found`` as they are in ``model``."""
    from nbcompress.engine.quantize.config import DynamicInt8Config
    from nbcompress.engine.quantize.modes import Job

    return Job(
        model=model,
        config=DynamicInt8Config(tolerance=rtol(PATH)),
        family="onnxruntime",
        selected={n: r.module for n, r in found.items()},
        inputs=as_inputs(inputs),
        calibrate=None,
        only_faster=True,
        repeats=REPEATS,
        rows=[{"layer": n, "backend": "onnxruntime-int8"} for n in found],
        new={n: model.get_submodule(n) for n in found},
    )


def _found(analysis: Analysis, inputs: Any) -> dict[str, LayerResult]:
    """The layers that may join a graph; none if nothing can be fused in this run."""
    from nbcompress.engine.quantize.ort_chain import ENV_FUSE
    from nbcompress.engine.quantize.ort_int8 import ort_problem

    found = {r.name: r for r in analysis.layers if fusable(r)}
    if inputs is None or len(found) < 2 or os.environ.get(ENV_FUSE, "").strip() == "0":
        return {}
    # Only now: ort_problem imports onnx (~0.7 s of a 1 s sparsify_ reusing its record).
    return {} if ort_problem() is not None else found


def _neighbours(model: nn.Module, found: dict[str, LayerResult]) -> list[LayerResult]:
    """The found layers sharing an ``nn.Sequential`` parent with another found layer.

    Those ``fuse_chains`` may join in one graph (it also asks for nothing but activations
    between them: a layer here in no run keeps the path :func:`settle_runs` gives it).
    """
    from nbcompress.engine.quantize.ort_chain import linear_runs

    return [found[n] for run in linear_runs(model, found.__contains__) for n in run if n in found]


def settle_runs(model: nn.Module, analysis: Analysis, inputs: Any) -> None:
    """Before installing: no layer a graph may join keeps ONNX Runtime int8 on its own.

    Each such layer (:func:`_neighbours`; chosen ``ort_int8`` in its own race) takes its
    fastest other path within tolerance if that beat dense, else dense; :func:`fuse_runs`
    then races the whole graph against the run. A decision reused from the tuning record
    (nothing timed now to pick another path by) stays as it is.
    """
    for res in _neighbours(model, _found(analysis, inputs)):
        if res.chosen != PATH or "dense" not in res.times:
            continue
        others = [p for p in res.accurate if p != PATH]
        best = min(others, key=lambda p: res.times[p].median, default="dense")
        dense = res.times["dense"].median
        best = best if best != "dense" and res.times[best].median < dense else "dense"
        res.candidates = {} if best == "dense" else {best: build(best, res.module, {})}
        res.chosen = best
        res.reason += (
            f"; ONNX Runtime int8 only as one graph with its run (not between other "
            f"kernels): {best} instead ({dense / res.times[best].median:.2f}×)"
        )


def fuse_runs(model: nn.Module, tx: Any, analysis: Analysis, inputs: Any) -> list[str]:
    """Fuse the runs of fusable layers where the graph races faster; one note per run fused.

    Every fused layer's result in ``analysis`` then says ``ort_int8`` (its module the
    graph's step, installed in ``model``), with the run's measured gain in its reason.

    Args:
        model: The model, inside transaction ``tx`` with the per-layer choices installed.
        tx: The history transaction of the install.
        analysis: The per-layer results (which layers may take ONNX Runtime int8).
        inputs: The example inputs the analysis ran on; ``None``: nothing is fused.
    """
    found = _found(analysis, inputs)
    notes = _fuse(model, tx, found, inputs) if found else []
    restate(analysis, tx)  # the verdict and the history step say what runs now
    return notes


def _fuse(model: nn.Module, tx: Any, found: dict[str, LayerResult], inputs: Any) -> list[str]:
    """:func:`fuse_runs` over the layers ``found``; one note per run fused."""
    from nbcompress.engine.quantize.ort_chain import fuse_chains

    job = _job(model, found, inputs)
    fuse_chains(job, tx, judge=graph_wins)
    notes = []
    for row in job.rows:
        note = row.get("note")
        if note is None:
            continue
        res = found[row["layer"]]
        res.chosen, res.dropped = PATH, False
        res.candidates = {PATH: job.new[res.name]}
        res.reason, res.fused = f"{res.reason}; {note}", note
        if note not in notes:
            notes.append(note)
    return notes
