"""Refresh a display once the running notebook cell ends, however often the model changed.

A cell may edit a model many times (a loop of ``prune_`` calls); an explorer following the
model then redraws once, after the cell, instead of once per step inside the user's code.
Outside a running IPython cell (a widget button, a script, plain pytest) nothing is deferred:
:func:`after_cell` returns ``False`` and the caller refreshes at once.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["after_cell", "follow_cells"]

_STATE: dict[str, Any] = {"shell": None, "in_cell": False}
_PENDING: dict[int, weakref.WeakMethod] = {}


def _pre_run_cell(info: Any) -> None:
    _STATE["in_cell"] = True


def _post_run_cell(result: Any) -> None:
    _STATE["in_cell"] = False
    pending = list(_PENDING.values())
    _PENDING.clear()
    for ref in pending:
        refresh = ref()
        if refresh is None:
            continue
        try:
            refresh()
        except Exception as err:  # noqa: BLE001 - a display must not break the notebook
            warnings.warn(
                f"nbcompress: refreshing a widget after the cell failed "
                f"({type(err).__name__}: {err}).",
                RuntimeWarning,
                stacklevel=1,
            )


def follow_cells() -> None:
    """Start noting when an IPython cell runs (once per shell; nothing outside IPython)."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - ipywidgets depends on IPython
        return
    shell = get_ipython()
    if shell is None or _STATE["shell"] is shell:
        return
    shell.events.register("pre_run_cell", _pre_run_cell)
    shell.events.register("post_run_cell", _post_run_cell)
    _STATE["shell"] = shell


def after_cell(refresh: Callable[[], Any]) -> bool:
    """Call the bound method ``refresh`` once when the running cell ends.

    Several requests for the same method while one cell runs make one call. The method is
    held weakly, so a pending refresh never keeps its widget alive.

    Args:
        refresh: A bound method taking no argument.

    Returns:
        ``True`` if deferred; ``False`` if no cell is running (the caller refreshes now).
    """
    if not _STATE["in_cell"]:
        return False
    _PENDING[id(refresh.__self__)] = weakref.WeakMethod(refresh)  # type: ignore[attr-defined]
    return True
