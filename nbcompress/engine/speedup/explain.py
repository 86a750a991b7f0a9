"""Why each layer runs on the path it runs on, in a few words a reader can check in the table.

The ``chosen`` cell of a speedup report names the path and the measured reason, e.g.
``sparse fp32: 1.31× vs dense``, ``dense: best sparse 0.90×`` or ``dense: sparse fp32
1.03× is within noise``. Faster paths the choice may not take (any int8 path without
``allow_int8``, or one outside its tolerance) are summarised once in the notes rather
than on every row. The verdict and the history step say what the chosen layers run on
(:func:`runs_on`: sparse kernels, a dense int8 twin, one ONNX Runtime graph per fused run).
"""

from __future__ import annotations

from typing import Any

from nbcompress.engine.speedup.analysis import Analysis, LayerResult, is_int8
from nbcompress.engine.speedup.candidates import TWINS
from nbcompress.engine.speedup.shapes import MIN_SPARSITY, SKIP_SPARSITY
from nbcompress.kernels.modules import FORMATS

__all__ = [
    "FUSED_TIMING",
    "PATHS",
    "choice",
    "label",
    "passed_over",
    "restate",
    "runs_on",
    "some_of",
]

_LABELS = {
    "dense": "dense fp32",
    "csr": "sparse fp32",
    "csr_int8": "sparse int8",
    "csr_int8_dynamic": "sparse int8, int8 inputs",
    "bsr": "block-sparse",
    "torch_int8": "torch int8",
    "ort_int8": "ONNX Runtime int8",
}


def label(path: str) -> str:
    """The table label of ``path``; a format registered later gets one from its name."""
    if path in _LABELS:
        return _LABELS[path]
    kind = "block-sparse" if path.startswith("bsr") else f"sparse {path.split('_')[0]}"
    return f"{kind} int8" if is_int8(path) else kind


#: Path key → the label of its table column (every registered format, then the twins).
PATHS = {path: label(path) for path in ("dense", *FORMATS, *TWINS)}


def _gain(res: LayerResult, path: str) -> float:
    return res.times["dense"].median / res.times[path].median


def choice(res: LayerResult, min_gain: float = 0.05) -> str:
    """The ``chosen`` cell: the path the layer runs on, and the measured reason in short.

    Args:
        res: The layer's measurements and decision.
        min_gain: The required relative speed-up the decision used.
    """
    if res.fused:  # installed after the race: its own gain was measured as a run
        return f"{PATHS[res.chosen]}, one graph with its neighbours (see notes)"
    if res.recorded is not None:
        return _recorded(res)
    if "dense" not in res.times:
        if res.key is None and len(res.reason) > 0 and res.sparsity < SKIP_SPARSITY:
            return f"dense: only {res.sparsity:.0%} zeros"  # far below break-even, not timed
        return "dense: not timed (see notes)"
    if res.chosen != "dense":
        return f"{PATHS[res.chosen]}: {_gain(res, res.chosen):.2f}× vs dense"
    if res.dropped:
        return "dense: model not faster end to end"
    ok = res.accurate
    if not ok:
        return "dense: sparse error > tolerance"
    if res.sparsity < MIN_SPARSITY:
        return f"dense: only {res.sparsity:.0%} zeros"
    best = min(ok, key=lambda p: res.times[p].median)
    gain = _gain(res, best)
    if gain < 1:
        return f"dense: best {'sparse' if best in FORMATS else PATHS[best]} {gain:.2f}×"
    if gain < 1 + min_gain:
        return f"dense: {PATHS[best]} {gain:.2f}×, within noise (±{min_gain:.0%})"
    # Faster by the median but not in 3 rounds of 4 (clear_win): a lucky stretch, not a win.
    return f"dense: {PATHS[best]} {gain:.2f}×, not in 3 of 4 rounds"


def _recorded(res: LayerResult) -> str:
    # Not timed in this run: the gain shown is the one measured when it was recorded.
    gain = 1 + res.recorded.margin  # type: ignore[union-attr]
    if res.chosen != "dense":
        return f"{PATHS[res.chosen]}: {gain:.2f}× vs dense (recorded)"
    if res.dropped:
        return "dense: model not faster end to end"
    if gain <= 0:
        return "dense: sparse error > tolerance (recorded)"
    return f"dense: best sparse {gain:.2f}× (recorded)"


def passed_over(layers: list[LayerResult]) -> list[str]:
    """Notes on faster int8 paths the choice did not take, each once for the whole report."""
    off: dict[str, list[str]] = {}  # path label → layers where it was faster but not allowed
    bad: list[str] = []
    for res in layers:
        if "dense" not in res.times:
            continue
        taken = res.times[res.chosen].median
        faster = [p for p, t in res.times.items() if is_int8(p) and t.median < taken]
        for path in faster:
            if not res.within(path):
                err, tol = res.errors[path], res.tolerances[path]
                bad.append(f"{res.name} {PATHS.get(path, path)} (error {err:.1e} > {tol:.1e})")
        # The fastest int8 path only: the note names what allowing int8 would choose.
        best = min(faster, key=lambda p: res.times[p].median, default=None)
        if best is not None and best not in res.allowed and res.within(best):
            off.setdefault(PATHS.get(best, best), []).append(f"{res.name} {_gain(res, best):.2f}×")
    notes = [
        f"{path} was fastest but not allowed on {some_of(names)}: it changes results by "
        "rounding; allow it with --int8 (allow_int8=True)"
        for path, names in off.items()
    ]
    if bad:
        notes.append(f"int8 rejected, output outside tolerance: {some_of(bad)}")
    return notes


def some_of(items: list[str], shown: int = 3) -> str:
    """The first ``shown`` items, then how many there are in all."""
    more = f", … ({len(items)} layers)" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


#: Said after the end-to-end gain once a run was fused at install: that race came before.
FUSED_TIMING = " (timed before the fusion at install, see notes)"


def _where(res: LayerResult, graphs: int) -> str:
    """Where a chosen layer runs, in the words of :func:`runs_on`."""
    if res.fused:
        return f"in {'one' if graphs == 1 else graphs} ONNX Runtime int8 graph{'s' * (graphs > 1)}"
    if res.chosen in FORMATS:
        return "on sparse kernels"
    return f"on {PATHS.get(res.chosen, res.chosen)}"


def runs_on(layers: list[LayerResult]) -> str:
    """What the chosen layers run on, sparse kernels first, in a few words.

    E.g. ``3 layers on sparse kernels, 1 on ONNX Runtime int8``, ``2 layers on sparse
    kernels, 4 in 2 ONNX Runtime int8 graphs`` or ``4 layers in one ONNX Runtime int8 graph``.

    Args:
        layers: The per-layer results; those keeping the dense layer are not counted.
    """
    chosen = [r for r in layers if r.replacement is not None]
    graphs = len({r.fused for r in chosen if r.fused})
    counts: dict[str, int] = {}
    for res in chosen:
        where = _where(res, graphs)
        counts[where] = counts.get(where, 0) + 1
    if not counts:
        return "no layer swapped"
    order = sorted(counts, key=lambda w: w != "on sparse kernels")  # stable otherwise
    (first, n), rest = (order[0], counts[order[0]]), order[1:]
    return ", ".join([f"{n} layer{'s' * (n != 1)} {first}", *(f"{counts[w]} {w}" for w in rest)])


def restate(analysis: Analysis, tx: Any = None) -> None:
    """Make the verdict (and history step ``tx``'s detail) say what the layers run on now.

    The verdict is written once the layers are chosen; at install a layer may leave ONNX
    Runtime int8 (not alone inside a run) and a run may become one graph
    (:mod:`.fused`). A verdict of a model left dense is kept as it is.

    Args:
        analysis: The decisions, as they are after install (or without one).
        tx: The history transaction of the install, if any (its step's one-line detail).
    """
    _, sep, tail = analysis.verdict.partition(": ")
    if not sep or not analysis.chosen or analysis.verdict.endswith("model left dense"):
        return
    if any(r.fused for r in analysis.layers) and not tail.endswith(FUSED_TIMING):
        tail += FUSED_TIMING
    head = runs_on(analysis.layers)
    analysis.verdict = f"{head}: {tail}"
    if tx is not None:
        tx.step.detail = f"{head} ({tail})"
