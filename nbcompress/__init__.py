"""nbcompress: measured model compression inside Jupyter.

In a notebook: ``%load_ext nbcompress``, then ``%summary``, ``%prune``, ``%undo`` and friends.
In Python, the same verbs: :func:`summary`, :func:`prune_`, :func:`undo_`, :func:`history`.
Public names are imported on first use so that ``import nbcompress`` stays light and never
imports IPython.
"""

from __future__ import annotations

import importlib
from typing import Any

from nbcompress._version import __version__

# Public name → module that defines it (imported on first attribute access).
_EXPORTS = {
    "summary": "nbcompress.engine.profile",
    "Summary": "nbcompress.engine.profile",
    "prune_": "nbcompress.engine.prune",
    "quantize_": "nbcompress.engine.quantize",
    "quantize_report": "nbcompress.engine.quantize",
    "QuantizeReport": "nbcompress.engine.quantize",
    "Comparison": "nbcompress.engine.compare",
    "compare": "nbcompress.engine.compare",
    "remove_masks_": "nbcompress.engine.prune",
    "undo_": "nbcompress.engine.history",
    "history": "nbcompress.engine.history",
    "set_history_limit": "nbcompress.engine.history",
    "trial": "nbcompress.engine.history",
    "transaction": "nbcompress.engine.history",
    "sensitivity": "nbcompress.engine.sensitivity",
    "SensitivityResult": "nbcompress.engine.sensitivity",
    "Suggestion": "nbcompress.engine.sensitivity",
    "apply_suggestion_": "nbcompress.engine.sensitivity",
    "prune_to_": "nbcompress.engine.staged",
    "refine": "nbcompress.engine.refine",
    "Refinement": "nbcompress.engine.refine",
    "sparsify_": "nbcompress.engine.sparsify",
    "speedup": "nbcompress.engine.speedup",
    "SpeedupReport": "nbcompress.engine.speedup",
    "SparseLinear": "nbcompress.kernels.modules",
    "SparseConv2d": "nbcompress.kernels.modules",
    # The notebook layer: importing it pulls in ipywidgets, so only on first use.
    "SensitivityExplorer": "nbcompress.widgets",
}

__all__ = ["__version__", "load_ipython_extension", "unload_ipython_extension", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'nbcompress' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


def load_ipython_extension(ipython: Any) -> None:
    """Register the nbcompress magics (``%load_ext nbcompress``)."""
    from nbcompress.magics import register

    register(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """Nothing to tear down; present so that ``%unload_ext nbcompress`` works."""
