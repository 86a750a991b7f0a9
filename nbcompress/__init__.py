"""nbcompress: measured model compression inside Jupyter.

In a notebook: ``%load_ext nbcompress``, then ``%summary``, ``%prune``, ``%undo`` and friends.
In Python, the same verbs: :func:`summary`, :func:`prune_`, :func:`undo_`, :func:`history`.
Public names are imported on first use so that ``import nbcompress`` stays light and never
imports IPython.
"""

from __future__ import annotations

import importlib
import os
import threading
from typing import Any

from nbcompress._version import __version__

# Public name → module that defines it (imported on first attribute access).
_EXPORTS = {
    "summary": "nbcompress.engine.core.summary",
    "on_change": "nbcompress.engine.core.history",
    "history_token": "nbcompress.engine.core.history",
    "output_layers": "nbcompress.engine.core.layers",
    "Summary": "nbcompress.engine.core.summary",
    "prune_": "nbcompress.engine.prune.prune",
    "quantize_": "nbcompress.engine.quantize.quantize",
    "quantize_report": "nbcompress.engine.quantize.quantize",
    "QuantizeReport": "nbcompress.engine.quantize.quantize",
    "Comparison": "nbcompress.engine.core.compare",
    "compare": "nbcompress.engine.core.compare",
    "compare_change": "nbcompress.engine.core.compare",
    "remove_masks_": "nbcompress.engine.prune.prune",
    "prune_ratios_": "nbcompress.engine.prune.prune",
    "prune_embeddings_": "nbcompress.engine.prune.embedding_rows",
    "undo_": "nbcompress.engine.core.history",
    "history": "nbcompress.engine.core.history",
    "set_history_limit": "nbcompress.engine.core.history",
    "trial": "nbcompress.engine.core.history",
    "transaction": "nbcompress.engine.core.history",
    "sensitivity": "nbcompress.engine.sensitivity.sweep",
    "SensitivityResult": "nbcompress.engine.sensitivity.result",
    "Suggestion": "nbcompress.engine.sensitivity.suggestion",
    "apply_suggestion_": "nbcompress.engine.sensitivity.suggestion",
    "prune_to_": "nbcompress.engine.sensitivity.staged",
    "refine": "nbcompress.engine.sensitivity.refine",
    "Refinement": "nbcompress.engine.sensitivity.refine",
    "ModelNotRestored": "nbcompress.engine.sensitivity.guard",
    "sparsify_": "nbcompress.engine.speedup.sparsify",
    "remove_": "nbcompress.engine.structural.remove",
    "channel_groups": "nbcompress.engine.structural.graph",
    "save": "nbcompress.engine.structural.persist",
    "load": "nbcompress.engine.structural.persist",
    "PrunedMultiheadAttention": "nbcompress.engine.structural.mha",
    "PolynomialDecay": "nbcompress.engine.schedule.schedules",
    "ConstantSparsity": "nbcompress.engine.schedule.schedules",
    "GradualPruner": "nbcompress.engine.schedule.gradual",
    "finetune": "nbcompress.engine.schedule.finetune",
    "FinetuneResult": "nbcompress.engine.schedule.finetune_result",
    "l1_penalty": "nbcompress.engine.schedule.regularize",
    "L1Penalty": "nbcompress.engine.schedule.regularize",
    "factorize_": "nbcompress.engine.schedule.factorize",
    "factorize_report": "nbcompress.engine.schedule.lowrank_report",
    "FactorizeReport": "nbcompress.engine.schedule.factorize",
    "LowRankLinear": "nbcompress.engine.schedule.factorize",
    "LowRankConv2d": "nbcompress.engine.schedule.factorize",
    "search": "nbcompress.engine.search.search",
    "SearchResult": "nbcompress.engine.search.result",
    "SearchTrial": "nbcompress.engine.search.result",
    "speedup": "nbcompress.engine.speedup.speedup",
    "SpeedupReport": "nbcompress.engine.speedup.speedup",
    "SparseLinear": "nbcompress.kernels.modules",
    "SparseConv2d": "nbcompress.kernels.modules",
    # The notebook layer: importing it pulls in ipywidgets, so only on first use.
    "SensitivityExplorer": "nbcompress.notebook.widgets",
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
    from nbcompress.notebook.magics import register

    register(ipython)
    start_background_warmup()


def start_background_warmup() -> bool:
    """Start loading (or compiling) the sparse kernels in a daemon thread; say whether it started.

    From numba's disk cache that takes ~2 s, a first compile much longer; started at
    ``%load_ext`` it is done before most notebooks reach their first sparse call. The import
    itself runs in the thread, since importing numba alone takes seconds.
    ``NBCOMPRESS_WARMUP=0`` (or ``off``) turns it off.
    """
    if os.environ.get("NBCOMPRESS_WARMUP", "1").strip().lower() in ("0", "off", "false", "no"):
        return False
    thread = threading.Thread(
        target=lambda: importlib.import_module("nbcompress.kernels").warmup(background=True),
        name="nbcompress-warmup-start",
        daemon=True,
    )
    thread.start()
    return True


def unload_ipython_extension(ipython: Any) -> None:
    """Nothing to tear down; present so that ``%unload_ext nbcompress`` works."""
