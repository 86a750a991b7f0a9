"""Figures as notebook output; every drawing builds a fresh Figure, never pyplot state.

Every drawing function in :mod:`nbcompress.notebook.display` builds a fresh
:class:`matplotlib.figure.Figure` (never ``pyplot``), so figures can be made in threads, in
tests and in widgets without leaking open figures.
"""

from __future__ import annotations

import base64
import html
import io
import sys

from matplotlib.figure import Figure

__all__ = ["figure_html", "png_bytes", "show_figures_in_notebooks"]


def show_figures_in_notebooks() -> None:
    """Let a returned Figure display as an image even without ``%matplotlib inline``."""
    if "IPython" not in sys.modules:  # never import IPython from here
        return
    shell = sys.modules["IPython"].get_ipython()
    if shell is not None:
        png = shell.display_formatter.formatters["image/png"]
        png.for_type(Figure, lambda fig: png_bytes(fig))


def figure_html(fig: Figure, *, alt: str = "nbcompress figure", dpi: int = 90) -> str:
    """An ``<img>`` tag with the figure as an inline PNG (for ``_repr_html_``)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f"<img src='data:image/png;base64,{data}' alt='{html.escape(alt, quote=True)}'/>"


def png_bytes(fig: Figure, *, dpi: int = 90) -> bytes:
    """The figure as PNG bytes (for live display updates)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
