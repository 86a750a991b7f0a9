"""Plain-text and HTML tables shared by every result object (no pandas needed)."""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from nbcompress.timing import format_seconds

__all__ = [
    "Table",
    "TableReport",
    "fmt_bytes",
    "fmt_count",
    "fmt_pct",
    "fmt_ratio",
    "fmt_time",
    "html_table",
    "text_table",
]


def fmt_bytes(n: float | None) -> str:
    """Format a byte count with a binary unit (``1.5 MiB``)."""
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def fmt_count(n: float | None) -> str:
    """Format a large count compactly (``1.2M``)."""
    if n is None:
        return "—"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def fmt_pct(x: float | None) -> str:
    """Format a fraction as a percentage (``0.5`` → ``50.0%``)."""
    return "—" if x is None else f"{100 * x:.1f}%"


def fmt_ratio(x: float | None) -> str:
    """Format a ratio such as a speed-up (``2.5`` → ``2.50×``)."""
    return "—" if x is None else f"{x:.2f}×"


def fmt_time(seconds: float | None) -> str:
    """Format a duration in seconds with a readable unit (``0.0012`` → ``1.2 ms``)."""
    return "—" if seconds is None else format_seconds(seconds)


Formatter = Callable[[Any], str]


def _numeric(value: Any) -> bool:
    # Numbers (and missing figures) align right; names and descriptions align left.
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _cell(value: Any, fmt: Formatter | None) -> str:
    if fmt is not None:
        return fmt(value)
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def text_table(
    rows: Sequence[dict[str, Any]],
    columns: dict[str, Formatter | None] | None = None,
    *,
    title: str = "",
    notes: Sequence[str] = (),
) -> str:
    """Render dict rows as an aligned monospace table."""
    columns = columns or {k: None for k in (rows[0] if rows else {})}
    cells = [[_cell(r.get(c), f) for c, f in columns.items()] for r in rows]
    right = [[_numeric(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = [title] if title else []
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    lines.append("  ".join("-" * w for w in widths))
    for row, align in zip(cells, right):
        lines.append(
            "  ".join(
                v.rjust(w) if a else v.ljust(w) for v, w, a in zip(row, widths, align)
            ).rstrip()
        )
    lines.extend(notes)
    return "\n".join(lines)


def html_table(
    rows: Sequence[dict[str, Any]],
    columns: dict[str, Formatter | None] | None = None,
    *,
    caption: str = "",
    notes: Sequence[str] = (),
    emphasis: Sequence[int] = (),
) -> str:
    """Render dict rows as a compact HTML table; rows listed in ``emphasis`` are bold."""
    columns = columns or {k: None for k in (rows[0] if rows else {})}
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for i, r in enumerate(rows):
        style = ' style="font-weight:bold"' if i in emphasis else ""
        tds = "".join(
            f'<td style="text-align:{"right" if _numeric(r.get(c)) else "left"}">'
            f"{html.escape(_cell(r.get(c), f))}</td>"
            for c, f in columns.items()
        )
        body.append(f"<tr{style}>{tds}</tr>")
    cap = (
        f"<caption style='text-align:left'><b>{html.escape(caption)}</b></caption>"
        if caption
        else ""
    )
    foot = "".join(f"<div style='font-size:90%'>{html.escape(n)}</div>" for n in notes)
    return (
        f"<div class='nbcompress'><table>{cap}<thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table>{foot}</div>"
    )


class Table(NamedTuple):
    """What a result object shows: rows, column formatters, heading, notes, bold rows."""

    rows: Sequence[dict[str, Any]]
    columns: dict[str, Formatter | None] | None
    title: str
    notes: Sequence[str] = ()
    emphasis: Sequence[int] = ()


class TableReport:
    """Mixin: a result shown as one table in a terminal, in IPython and in a notebook.

    Subclasses define :meth:`_table`; ``str()``, ``repr()``, IPython's plain-text display
    and the notebook's HTML are all rendered from it, so they can never disagree.
    Dataclass subclasses need ``@dataclass(repr=False)``: IPython prefers a ``__repr__``
    defined on the class itself over an inherited ``_repr_pretty_``.
    """

    def _table(self) -> Table:
        raise NotImplementedError

    def __str__(self) -> str:
        t = self._table()
        return text_table(t.rows, t.columns, title=t.title, notes=t.notes)

    def __repr__(self) -> str:
        return str(self)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        # IPython's plain-text display (terminals, text/plain): the table, not the repr.
        printer.text(str(self))

    def _repr_html_(self) -> str:
        t = self._table()
        return html_table(t.rows, t.columns, caption=t.title, notes=t.notes, emphasis=t.emphasis)
