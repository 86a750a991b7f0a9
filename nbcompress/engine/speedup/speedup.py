"""``speedup``: measured dense vs sparse-kernel vs int8 time per layer and end to end."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from nbcompress.engine.core.report import Table, TableReport, fmt_pct, fmt_ratio, fmt_time
from nbcompress.engine.core.summary import removal_note
from nbcompress.engine.speedup.analysis import RTOL, Analysis, LayerResult, SparsifyOptions
from nbcompress.engine.speedup.candidates import ORT_SKIPPED
from nbcompress.engine.speedup.coverage import describe
from nbcompress.engine.speedup.explain import PATHS as _PATHS
from nbcompress.engine.speedup.explain import choice, passed_over, restate, some_of
from nbcompress.engine.speedup.sparsify import analyse, install_
from nbcompress.kernels.notices import COMPILE_NOTICE
from nbcompress.kernels.threads import get_threads
from nbcompress.progress import Progress
from nbcompress.timing import Timing

__all__ = ["SpeedupReport", "speedup"]

#: Backend warnings arrive cut to this many characters (first line only).
_WARNING_CUT = 160


def _sci(value: float | None) -> str:
    return "—" if value is None else f"{value:.1e}"


# Shown columns (rows keep every figure): the chosen cell already carries the gain over
# dense, and the output error sits with its tolerance, so the table stays narrow.
_COLUMNS = {
    "layer": None,
    "input": None,
    "sparsity": fmt_pct,
    **{label: fmt_time for label in _PATHS.values()},
    "chosen": None,
    "break-even (est.)": fmt_pct,
    "max |Δ| (tol.)": None,
}


@dataclass(repr=False)
class SpeedupReport(TableReport):
    """Measured per-layer and end-to-end timings of dense vs sparse execution.

    Attributes:
        rows: One plain dict per layer (times in seconds, ``None`` where not measured).
        dense: End-to-end time of the dense model.
        compressed: End-to-end time with the chosen sparse layers.
        max_abs_diff: Largest end-to-end output difference, compressed vs dense.
        tolerance: The stated tolerance that difference is checked against.
        verdict: One line: what was (or would be) converted, and the end-to-end gain.
        applied: Whether the choice was installed in the model.
        notes: Threads, tolerances, summarised backend warnings.
    """

    rows: list[dict[str, Any]]
    dense: Timing | None
    compressed: Timing | None
    max_abs_diff: float
    tolerance: float
    verdict: str
    applied: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def speedup(self) -> float | None:
        """End-to-end dense / compressed time."""
        if self.dense is None or self.compressed is None:
            return None
        return self.dense.median / self.compressed.median

    @property
    def paths(self) -> list[str]:
        """Labels of the execution paths timed for some layer (table columns, in order)."""
        return [p for p in _PATHS.values() if any(r.get(p) for r in self.rows)]

    @property
    def outputs_match(self) -> bool:
        """True if the compressed model's output is within the stated tolerance."""
        return self.max_abs_diff <= self.tolerance

    def _summary(self) -> list[str]:
        check = "within" if self.outputs_match else "OUTSIDE"
        timed = (
            f"end to end: dense {self.dense}  →  compressed {self.compressed}  "
            f"({fmt_ratio(self.speedup)})"
            if self.speedup is not None
            else "end to end: not timed in this run (the verdict was measured earlier, below)"
        )
        lines = [
            timed,
            f"output check: max |Δ| {self.max_abs_diff:.2e} {check} tolerance {self.tolerance:.2e}",
            self.outcome,
        ]
        return lines + self.notes

    @property
    def outcome(self) -> str:
        """One sentence: what was installed, or what ``apply=True`` would install."""
        if self.applied:
            return f"Applied: {self.verdict}."
        if any(r["path"] != "dense fp32" for r in self.rows):
            return f"Not applied (--apply / apply=True installs it): {self.verdict}."
        return self.verdict[:1].upper() + self.verdict[1:] + "."

    def _table(self) -> Table:
        chosen = [i for i, r in enumerate(self.rows) if r["path"] != "dense fp32"]  # bold
        title = "Speedup (measured on this machine)"
        timed = set(self.paths)  # a path timed on no layer gets no column of dashes
        columns = {k: f for k, f in _COLUMNS.items() if k not in _PATHS.values() or k in timed}
        return Table(self.rows, columns, title, self._summary(), chosen)

    def plot(self, ax: Any = None) -> Any:
        """Bar chart of per-layer time for each path (log scale); returns the figure.

        Args:
            ax: A matplotlib ``Axes`` to draw into; ``None`` draws a new figure.
        """
        from nbcompress.notebook.display.speedup import speedup_figure

        return speedup_figure(self, ax=ax)


def _row(result: LayerResult, min_gain: float) -> dict[str, Any]:
    times = result.times
    chosen = result.chosen
    row: dict[str, Any] = {
        "layer": result.name,
        "type": type(result.module).__name__,
        "input": "×".join(str(s) for s in result.input_shape) or "—",
        "sparsity": result.sparsity,
    }
    for key, label in _PATHS.items():
        row[label] = times[key].median if key in times else None
    dense = times.get("dense")
    best = times.get(chosen)
    row["path"] = _PATHS.get(chosen, chosen)
    row["chosen"] = choice(result, min_gain)
    row["speedup"] = dense.median / best.median if dense and best else None
    row["break-even (est.)"] = result.break_even
    shown = chosen if chosen != "dense" else "csr"
    row["max |Δ|"] = result.errors.get(shown)
    row["tolerance"] = result.tolerances.get(shown)
    row["max |Δ| (tol.)"] = (
        "—" if row["max |Δ|"] is None else f"{_sci(row['max |Δ|'])} ({_sci(row['tolerance'])})"
    )
    row["why"] = result.reason
    row["recorded"] = result.recorded is not None  # not timed now: figures from the record
    return row


def _whole(message: str) -> str:
    """A backend warning as a note: whole, or cut at a word boundary with an ellipsis."""
    if len(message) < _WARNING_CUT:
        return message
    return message.rsplit(" ", 1)[0].rstrip(",;:") + " …"


def _report(analysis: Analysis, applied: bool, min_gain: float) -> SpeedupReport:
    notes = [
        f"threads: {get_threads()}; times are medians of interleaved samples; break-even "
        "is estimated from the measured time assuming cost linear in nonzeros",
        "tolerance = rtol × max|dense output| + 1e-5 with rtol "
        + ", ".join(f"{_PATHS[k]} {v:g}" for k, v in RTOL.items()),
    ]
    unmeasured: dict[str, list[str]] = {}
    reused = [r.name for r in analysis.layers if r.recorded is not None]
    if reused:
        notes.append(
            f"{some_of(reused)}: decision reused from the tuning record (measured earlier on "
            "this CPU, same weight pattern, input bucket and threads; not timed in this run, "
            "outputs checked now); remeasure=True times them again"
        )
    for r in analysis.layers:
        if "dense" not in r.times and r.recorded is None:
            unmeasured.setdefault(r.reason, []).append(r.name)
    for why, names in unmeasured.items():
        shown = ", ".join(names[:4]) + (f", … ({len(names)} layers)" if len(names) > 4 else "")
        notes.append(f"not timed, kept dense: {shown}: {why.removesuffix('; kept dense')}")
    missing = describe(analysis.uncovered, analysis.total_params)
    if missing:
        notes.append(missing)
    notes += passed_over(analysis.layers)
    notes += [f"fused at install (after the end-to-end timing above): {n}" for n in analysis.fused]
    for message, count in analysis.warnings.items():
        if message.startswith(ORT_SKIPPED):  # ours, whole: once, whatever the layer count
            notes.append(message)
            continue
        times = f" {count} times (shown once)" if count > 1 else ""
        notes.append(f"torch int8 backend warned{times}: {_whole(message)}")
    return SpeedupReport(
        rows=[_row(r, min_gain) for r in analysis.layers],
        dense=analysis.dense,
        compressed=analysis.compressed,
        max_abs_diff=analysis.max_abs_diff,
        tolerance=analysis.tolerance,
        verdict=analysis.verdict,
        applied=applied,
        notes=notes,
    )


@COMPILE_NOTICE  # one line about kernel compilation for the whole call
def speedup(
    model: nn.Module,
    example_inputs: Any,
    *,
    apply: bool = False,
    progress: bool | Callable[[int, int, str], None] | None = None,
    other_inputs: Any = None,
    **options: Any,
) -> SpeedupReport:
    """Measure dense fp32, the sparse formats and the dense int8 twins per layer, and end to end.

    The paths: dense fp32, every sparse format (fp32 and int8, e.g. CSR, block-sparse),
    and a Linear's dense int8 twins, torch's and ONNX Runtime's dynamic int8 (where
    ``onnxruntime`` is installed; the module ``%quantize int8`` installs). With
    ``allow_int8`` the choice takes the fastest path within its output tolerance, int8
    ones included; without it no int8 path is chosen (their times are shown). With
    ``apply=True``, runs of Linears in an ``nn.Sequential`` that may take ONNX Runtime
    int8 become one ORT graph where that races faster than the run as chosen per layer.

    Args:
        model: The (pruned) model; not modified unless ``apply=True`` (it is measured in
            eval mode; training flags, parameters and buffers are left as they were).
        example_inputs: A tensor or tuple of tensors shaped like a real batch.
        apply: Install the choice in the model, as ``sparsify_`` does (undoable).
        progress: Layers timed so far, elapsed and ETA (:class:`~nbcompress.progress.Progress`:
            a live bar in a notebook, stdout lines elsewhere). ``None`` (default) shows it
            once the run has taken 2 s, ``True`` from the start, ``False`` never; a
            callable gets ``(done, total, layer)`` after each layer instead.
        other_inputs: Further example inputs of the other shapes the model will run: a
            layer stays dense if it is slower than dense on any of them (as in ``sparsify_``).
        **options: Fields of :class:`~nbcompress.engine.speedup.analysis.SparsifyOptions`:
            ``layers`` (glob pattern(s) on layer names; default every Linear/Conv layer),
            ``types``, ``allow_int8`` (let the choice use int8 paths, sparse or dense,
            which change results by rounding), ``allow_bsr``, ``repeats`` (timed rounds
            per candidate) and ``min_gain`` (required relative speed-up for a layer to be switched);
            ``remeasure`` is on: this report times every layer even where the tuning record
            holds a decision, and records what it measured in its place, so that a later
            ``sparsify_`` follows the figures shown here (``remeasure=False`` reuses them).

    Returns:
        The report (``print`` it, or display it in a notebook; ``.plot()`` draws bars).
    """
    # The measuring verb: its figures are timed now (a near tie cannot differ from what a
    # record says), and they replace the record's, so sparsify_ follows what was shown.
    options.setdefault("remeasure", True)
    with _reporter(progress) as step:
        analysis = analyse(
            model,
            example_inputs,
            progress=step,
            time_whole=False,
            other_inputs=other_inputs,
            **options,
        )
    if apply:
        install_(model, analysis, example_inputs)
    restate(analysis)  # what the chosen layers run on: sparse kernels, int8 twins, graphs
    min_gain = options.get("min_gain", SparsifyOptions.min_gain)
    report = _report(analysis, apply and bool(analysis.chosen), min_gain)
    removed = removal_note(model)
    if removed:
        # Removed channels are gone, not zeros: no sparse kernel claims them.
        report.notes.insert(0, f"{removed} {_REMOVED_TIMES}")
    return report


@contextlib.contextmanager
def _reporter(
    progress: bool | Callable[[int, int, str], None] | None,
) -> Iterator[Callable[[int, int, str], None] | None]:
    """The per-layer callback of ``analyse``: the caller's own, or a :class:`Progress`."""
    if callable(progress) or progress is False:
        yield progress or None
        return
    with Progress(None, "speedup", "layer", delay=0 if progress else 2.0) as bar:

        def step(done: int, total: int, name: str) -> None:
            bar.total = total
            bar.update(done - bar.done, note=name if done == total else f"timed {name}")

        yield step


_REMOVED_TIMES = (
    "The dense times above are of the smaller model as it is now; sparse kernels can only "
    "speed up zeros left inside it. The dense speed-up of the removal itself was measured "
    "before → after by %prune --remove (Comparison.speed_ratio)."
)
