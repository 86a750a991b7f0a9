"""The steps recorded on a model *and its sub-modules*, as ``%undo model --list`` shows them.

History is kept per module object: ``%prune model.encoder 0.5`` records its step on
``model.encoder``. Listing the whole tree, each step with the path of the module it was
recorded on, shows the user what ``%undo model`` can revert and in which order.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from nbcompress.engine.core.history import History, Step, history
from nbcompress.engine.core.report import fmt_bytes, html_table

__all__ = ["ModelHistory", "recorded_steps"]


def recorded_steps(model: nn.Module) -> list[tuple[str, Step]]:
    """Every step recorded on ``model`` or a sub-module, oldest first, with the module's path.

    Args:
        model: The model (``""`` is its own path).

    Returns:
        ``(path, step)`` pairs, in the order the steps were made. A step listed by several
        histories (should ``history`` ever include sub-modules) is kept once, under the
        deepest path: the module it was really recorded on.
    """
    found: dict[int, tuple[int, str, Step]] = {}
    order = 0
    for path, module in model.named_modules():
        for step in history(module):
            seen = found.get(id(step))
            if seen is None or len(path) > len(seen[1]):
                found[id(step)] = (seen[0] if seen else order, path, step)
            order += 1
    ranked = sorted(found.values(), key=lambda t: (t[2].created, t[0]))
    return [(path, step) for _, path, step in ranked]


class ModelHistory(History):
    """A :class:`History` of a model's tree: each step with the sub-module it was made on.

    Attributes:
        paths: The module path of each step (``""``: the model itself).
    """

    def __init__(self, steps: list[tuple[str, Step]], name: str = "model") -> None:
        super().__init__(step for _, step in steps)
        self.paths = [path for path, _ in steps]
        self.name = name

    def where(self, index: int) -> str:
        """The module step ``index`` was recorded on, as the user names it (``model.encoder``)."""
        path = self.paths[index]
        return f"{self.name}.{path}" if path else self.name

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One plain dict per step; a ``module`` column when a step is on a sub-module."""
        rows = super().rows
        if any(self.paths):
            for i, row in enumerate(rows):
                row["module"] = self.where(i)
        return rows

    def _columns(self) -> dict[str, Any]:
        columns: dict[str, Any] = {"step": None, "operation": None}
        if any(self.paths):
            columns["module"] = None
        return {**columns, "detail": None, "undo_bytes": fmt_bytes}

    def __str__(self) -> str:
        if not self:
            return super().__str__()
        lines = [
            f"{r['step']:>3}. {r['operation']:<10} "
            + (f"[{r['module']}] " if "module" in r else "")
            + r["detail"]
            for r in self.rows
        ]
        lines.append(f"undo memory: {fmt_bytes(self.nbytes)}")
        return "\n".join(lines)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        # IPython's plain-text display of a list subclass would print Step reprs.
        printer.text(str(self))

    def _repr_html_(self) -> str:
        return html_table(
            self.rows, self._columns(), caption=f"History — undo memory {fmt_bytes(self.nbytes)}"
        )
