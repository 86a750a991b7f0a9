"""Before/after comparison of a model around one change (what ``%prune`` shows).

:func:`compare_change` runs an in-place change and returns the :class:`Comparison`;
:func:`compare` lines up two summaries taken by hand; :func:`measure_pair` times two
versions of a model side by side.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nbcompress.engine.core.history import history, undo_
from nbcompress.engine.core.interrupts import deferred_interrupts
from nbcompress.engine.core.report import Table, TableReport, fmt_bytes, fmt_count, fmt_pct
from nbcompress.engine.core.snapshot import nbytes, tensors_in
from nbcompress.engine.core.summary import Summary, summary
from nbcompress.engine.core.validation import as_inputs, call_model, eval_mode
from nbcompress.timing import Timing, format_seconds, measure_interleaved

__all__ = ["Comparison", "compare", "compare_change", "measure_pair"]

# Models up to this size are copied so that before and after are timed interleaved.
COPY_LIMIT_BYTES = 1 << 30

_COLUMNS = {
    "layer": None,
    "sparsity before": fmt_pct,
    "sparsity after": fmt_pct,
    "nonzeros after": fmt_count,
    "CSR before (est.)": fmt_bytes,
    "CSR after (est.)": fmt_bytes,
    "latency before": lambda t: "—" if t is None else format_seconds(t),
    "latency after": lambda t: "—" if t is None else format_seconds(t),
}


@dataclass(repr=False)
class Comparison(TableReport):
    """A model before and after one operation, layer by layer.

    Attributes:
        title: What was done.
        before: Summary before the operation.
        after: Summary after it.
        rows: One plain dict per layer plus a ``total`` row.
        notes: Explanations shown under the table (honest caveats included).
        result: What the change returned (e.g. the ``ApplyReport`` of
            ``apply_suggestion_``), for :func:`compare_change`; ``None`` otherwise.
    """

    title: str
    before: Summary
    after: Summary
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    result: Any = field(default=None, compare=False)

    @property
    def speed_ratio(self) -> float | None:
        """Measured model latency before / after (>1 means faster), if both were measured."""
        if self.before.latency and self.after.latency:
            return self.before.latency.median / self.after.latency.median
        return None

    def _table(self) -> Table:
        # The last row is the model total: bold in HTML.
        return Table(self.rows, _COLUMNS, self.title, self.notes, [len(self.rows) - 1])


def measure_pair(
    before: nn.Module, after: nn.Module, example_inputs: Any, *, repeats: int = 15
) -> tuple[Timing, Timing]:
    """Time two versions of a model side by side (interleaved), in eval mode.

    Timing the model before and after an edit one after the other lets the machine's drift
    pass for a speed change; interleaving the two cancels it.

    Args:
        before: A copy of the model as it was.
        after: The model as it is now.
        example_inputs: A tensor, tuple of tensors or dict of tensors.
        repeats: Timed samples of each (after warm-up).

    Returns:
        ``(before, after)`` timings.
    """
    inputs = as_inputs(example_inputs)
    with eval_mode(before), eval_mode(after), torch.no_grad():
        t = measure_interleaved(
            {
                "before": lambda: call_model(before, inputs),
                "after": lambda: call_model(after, inputs),
            },
            repeats=repeats,
        )
    return t["before"], t["after"]


def _row(b: dict[str, Any], a: dict[str, Any]) -> dict[str, Any]:
    return {
        "layer": b["layer"],
        "sparsity before": b["sparsity"],
        "sparsity after": a["sparsity"],
        "nonzeros after": a["nonzeros"],
        "CSR before (est.)": b["CSR (est.)"],
        "CSR after (est.)": a["CSR (est.)"],
        "latency before": b["latency"],
        "latency after": a["latency"],
    }


def compare(
    before: Summary, after: Summary, title: str, notes: list[str] | None = None
) -> Comparison:
    """Line up two summaries of the same model layer by layer.

    Args:
        before: Summary taken before the operation.
        after: Summary taken after it.
        title: What was done (first line of the report).
        notes: Extra notes shown under the table.

    Returns:
        The comparison; model-level latencies and their ratio appear in the notes.
    """
    after_rows = {r["layer"]: r for r in after.rows}
    rows = [_row(b, after_rows[b["layer"]]) for b in before.rows if b["layer"] in after_rows]
    rows.append(_row(before.totals, after.totals))
    all_notes = list(notes or [])
    if before.latency and after.latency:
        ratio = before.latency.median / after.latency.median
        all_notes.append(
            f"Model latency (measured, before/after interleaved): before {before.latency}, "
            f"after {after.latency} → {ratio:.2f}× speed."
        )
    else:
        all_notes.append("Latency not measured: pass an example input (--input x).")
    all_notes.append(before.notes[0])
    return Comparison(title, before, after, rows, all_notes)


def compare_change(
    model: nn.Module,
    change: Callable[[nn.Module], Any],
    example_inputs: Any = None,
    *,
    title: str = "{name}: {detail}",
    notes: list[str] | None = None,
    before: Summary | None = None,
    repeats: int = 15,
) -> Comparison:
    """Apply ``change`` to ``model`` in place and compare the model before and after.

    Both versions are summarised layer by layer; with ``example_inputs`` the whole model is
    also timed before and after *interleaved* (on a copy kept of the model as it was, if it
    holds at most 1 GiB; a larger one is timed before and after in turn), so that the
    machine's drift cannot pass for a speed change.

    Args:
        model: The model to change.
        change: ``change(model)``, an all-or-nothing in-place edit such as
            ``lambda m: prune_(m, 0.5)`` (every nbcompress verb is one: if it raises, the
            model is as it was, and the error propagates from here unchanged). If anything
            after the change fails or is interrupted (measuring "after", Ctrl-C), the steps
            the change recorded are undone before the error propagates: all or nothing.
        example_inputs: A tensor, tuple of tensors or dict of tensors to time the model on;
            ``None``: no latencies.
        title: First line of the report; ``{name}`` and ``{detail}`` stand for the steps the
            change recorded in ``history(model)`` (joined by `` + `` and ``; ``;
            ``unchanged`` and ``nothing changed`` if it recorded none).
        notes: Extra notes shown under the table.
        before: A summary of ``model`` taken already (saves summarising it twice).
        repeats: Timed samples of each version for the paired timing.

    Returns:
        The comparison; what ``change`` returned is in its ``result``.
    """
    measure = example_inputs is not None
    # torch.ao layers hold tuples of packed tensors in their state_dict: count those too.
    size = sum(nbytes(t) for t in tensors_in(model.state_dict().values()))
    reference = frozen_copy(model) if measure and size <= COPY_LIMIT_BYTES else None
    if before is None and reference is None:
        before = summary(model, example_inputs, measure_latency=measure)
    earlier = {id(s) for s in history(model)}
    try:
        result = change(model)
        if before is None:
            # Summarised from the copy, after the change: a change that refuses its
            # arguments does so at once, not after a timed summary (11 s on MiniLM).
            before = summary(reference, example_inputs, measure_latency=measure)
        after = summary(model, example_inputs, measure_latency=measure)
        if reference is not None:
            before.latency, after.latency = measure_pair(
                reference, model, example_inputs, repeats=repeats
            )
        steps = [s for s in history(model) if id(s) not in earlier]
        name = " + ".join(s.name for s in steps) or "unchanged"
        detail = "; ".join(s.detail for s in steps) or "nothing changed"
        title = title.replace("{name}", name).replace("{detail}", detail)
        comparison = compare(before, after, title, notes)
    except BaseException:
        _undo_new_steps(model, earlier)
        raise
    comparison.result = result
    return comparison


def _undo_new_steps(model: nn.Module, earlier: set[int]) -> None:
    """Undo every step recorded since ``earlier`` (ids of the steps there were), newest first.

    All-or-nothing for the whole comparison: a change that committed is taken back when
    measuring it afterwards fails or is interrupted. ``force``: measuring must not have
    changed the model, and if it did, the saved state is what the user had.
    """
    with deferred_interrupts():
        while (steps := history(model)) and id(steps[-1]) not in earlier:
            undo_(model, force=True)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` as it computes now, also where ``copy.deepcopy`` refuses.

    A weight computed from kept masks (``keep_masks=True`` or ``torch.nn.utils.prune``) is a
    non-leaf tensor after a training forward pass, and ``copy.deepcopy`` refuses those. The
    copy holds a detached clone of each such tensor instead: the value the next forward pass
    recomputes anyway.
    """
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)
