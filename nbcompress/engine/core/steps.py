"""A recorded step of a model's history, and the history itself (a list of steps)."""

from __future__ import annotations

import html
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from nbcompress.engine.core.report import fmt_bytes, html_table, text_table
from nbcompress.engine.core.snapshot import ModuleState, SavedTensor, restore_all

__all__ = ["History", "Step"]

#: What an empty history says, in a terminal and in a notebook.
EMPTY = (
    "History: nothing to undo (no compression step is recorded; the model is as nbcompress "
    "found it)."
)

_ORDER = itertools.count()  # orders steps across the histories of a model's sub-modules


@dataclass
class Step:
    """One recorded, undoable operation.

    Attributes:
        name: The verb, e.g. ``"prune"``.
        detail: One line describing what was done.
        info: Free-form details (per-layer amounts, chosen kernels, ...).
        nbytes: Memory the step holds to make undo possible.
        created: Wall-clock time of the step.
    """

    name: str
    detail: str
    info: dict[str, Any] = field(default_factory=dict)
    nbytes: int = 0
    created: float = field(default_factory=time.time)
    _modules: list[ModuleState] = field(default_factory=list, repr=False)
    _tensors: list[SavedTensor] = field(default_factory=list, repr=False)
    _order: int = field(default_factory=lambda: next(_ORDER), repr=False)

    def _rollback(self) -> BaseException | None:
        """Restore everything saved; the interrupt it survived (if any) is returned."""
        return restore_all([*reversed(self._modules), *reversed(self._tensors)])

    def _change_since(self, model: nn.Module) -> str | None:
        """Why undoing this step would not be exact (a saved tensor changed since), if so."""
        for saved in self._tensors:
            reason = saved.change_since()
            if reason:
                names = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}
                name = names.get(id(saved.tensor))
                return (
                    f"{name!r}: {reason}" if name else f"a weight no longer in the model: {reason}"
                )
        return None


class History(list):
    """The steps recorded for one model, oldest first (a plain list of :class:`Step`).

    Attributes:
        where: ``id(step)`` → qualified name of the sub-module the step was recorded on,
            for steps recorded on a sub-module of the model asked about.
    """

    def __init__(self, steps: Any = (), where: dict[int, str] | None = None) -> None:
        super().__init__(steps)
        self.where = dict(where or {})

    @property
    def nbytes(self) -> int:
        """Memory held by all steps, in bytes."""
        return sum(s.nbytes for s in self)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One plain dict per step (``"undo memory"``: bytes held to undo it)."""
        return [
            {
                "step": i + 1,
                "module": self.where.get(id(s), ""),
                "operation": s.name,
                "undo memory": s.nbytes,
                "detail": s.detail,
            }
            for i, s in enumerate(self)
        ]

    def _columns(self) -> dict[str, Any]:
        module = {"module": None} if self.where else {}
        # The detail last: a long line then trails the table instead of widening every row.
        return {"step": None, **module, "operation": None, "undo memory": fmt_bytes, "detail": None}

    def _caption(self) -> str:
        return f"History: {len(self)} step(s), undo memory {fmt_bytes(self.nbytes)}"

    def __str__(self) -> str:
        if not self:
            return EMPTY
        return text_table(self.rows, self._columns(), title=self._caption())

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        # IPython's plain-text display (a terminal, %undo --list): the table, not the
        # list of Step dataclasses.
        printer.text(str(self))

    def _repr_html_(self) -> str:
        if not self:
            return f"<div class='nbcompress'>{html.escape(EMPTY)}</div>"
        return html_table(self.rows, self._columns(), caption=self._caption())
