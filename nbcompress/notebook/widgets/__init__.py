"""Notebook widgets of nbcompress (the only package that imports ipywidgets).

The engine never imports this package; ``%sensitivity`` and users do::

    from nbcompress.notebook.widgets import SensitivityExplorer
    SensitivityExplorer(result, model, evaluate)
"""

from __future__ import annotations

from nbcompress.notebook.widgets._explorer import SensitivityExplorer
from nbcompress.notebook.widgets._render import render

__all__ = ["SensitivityExplorer", "render"]
