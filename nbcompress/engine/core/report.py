"""Plain-text and HTML tables shared by every result object (no pandas needed)."""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from nbcompress.timing import format_seconds

__all__ = [
    "Table",
    "TableReport",
    "footnote_repeats",
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
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
    # The last column's rule stays short: a long description there trails off to the right
    # instead of drawing a rule across the whole terminal.
    rules = [*widths[:-1], min(widths[-1], max(len(list(columns)[-1]), 40))] if widths else []
    lines.append("  ".join("-" * w for w in rules))
    for row, align in zip(cells, right):
        lines.append(
            "  ".join(
                v.rjust(w) if a else v.ljust(w) for v, w, a in zip(row, widths, align)
            ).rstrip()
        )
    lines.extend(notes)
    return "\n".join(lines)


# Theme-aware colours: JupyterLab's (light and dark) variables, then VS Code's, then the
# surrounding text colour, so captions and notes keep their contrast on a dark background.
_CAPTION_COLOR = "var(--jp-content-font-color1, var(--vscode-editor-foreground, inherit))"
_NOTE_COLOR = "var(--jp-content-font-color2, var(--vscode-descriptionForeground, inherit))"
# A number with its unit or exponent: never broken across lines ("146.0 KiB", "3.6e-07").
_NUMBER_WITH_UNIT = re.compile(
    r"(?<![\w.])[-+]?\d[\d.,]*(?:e[-+]?\d+)?(?:\s?(?:[%×]|(?:[KMG]iB|B|[nµm]?s|[kMG])\b))?"
)
#: Text cells up to this long are kept on one line ("sparse fp32", "— (kept float)").
SHORT_CELL = 24


def _html_cell(text: str, right: bool) -> str:
    """One ``<td>``: short cells never wrap; in longer text, numbers keep their units."""
    align = "right" if right else "left"
    if len(text) <= SHORT_CELL or _NUMBER_WITH_UNIT.fullmatch(text):
        return f'<td style="text-align:{align};white-space:nowrap">{html.escape(text)}</td>'
    parts, end = [], 0
    for m in _NUMBER_WITH_UNIT.finditer(text):
        parts.append(html.escape(text[end : m.start()]))
        parts.append(f'<span style="white-space:nowrap">{html.escape(m.group())}</span>')
        end = m.end()
    parts.append(html.escape(text[end:]))
    return f'<td style="text-align:{align}">{"".join(parts)}</td>'


def html_table(
    rows: Sequence[dict[str, Any]],
    columns: dict[str, Formatter | None] | None = None,
    *,
    caption: str = "",
    notes: Sequence[str] = (),
    emphasis: Sequence[int] = (),
) -> str:
    """Render dict rows as a compact HTML table; rows listed in ``emphasis`` are bold.

    The caption sits above the table, not inside it, so a narrow table never squeezes it
    to a word per line; a table wider than the output area scrolls sideways in its own
    box instead of being cut off; numbers never wrap away from their units.
    """
    columns = columns or {k: None for k in (rows[0] if rows else {})}
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for i, r in enumerate(rows):
        style = ' style="font-weight:bold"' if i in emphasis else ""
        tds = "".join(
            _html_cell(_cell(r.get(c), f), _numeric(r.get(c))) for c, f in columns.items()
        )
        body.append(f"<tr{style}>{tds}</tr>")
    cap = (
        f"<div class='nbcompress-caption' style='font-weight:bold;margin:0.3em 0;"
        f"color:{_CAPTION_COLOR}'>{html.escape(caption)}</div>"
        if caption
        else ""
    )
    foot = "".join(
        f"<div class='nbcompress-note' style='font-size:90%;color:{_NOTE_COLOR}'>"
        f"{html.escape(n)}</div>"
        for n in notes
    )
    return (
        f"<div class='nbcompress' style='max-width:100%'>{cap}"
        "<div class='nbcompress-scroll' style='overflow-x:auto;max-width:100%'>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
        f"</div>{foot}</div>"
    )


def footnote_repeats(
    rows: Sequence[dict[str, Any]], column: str, *, at_least: int = 3, notes: Sequence[str] = ()
) -> tuple[list[dict[str, Any]], list[str]]:
    """Show a text repeated on many rows once: the rows point to a numbered note.

    Args:
        rows: The table's rows (not changed).
        column: The text column whose repeats are folded (e.g. ``"note"``).
        at_least: A text is folded when this many rows carry it.
        notes: Notes already shown under the table: a repeated text one of them contains
            becomes ``"see the notes"``, without a numbered note saying it again.

    Returns:
        Copies of the rows, a repeated text replaced by ``"see note 1"``, and the notes
        (``"Note 1 (20 rows): …"``) to show under the table.
    """
    counts: dict[str, int] = {}
    for r in rows:
        text = r.get(column)
        if isinstance(text, str) and text:
            counts[text] = counts.get(text, 0) + 1
    repeated = [t for t, n in counts.items() if n >= at_least]
    said = {t: "see the notes" for t in repeated if any(t in note for note in notes)}
    new = [t for t in repeated if t not in said]
    marks = {**said, **{t: f"see note {i + 1}" for i, t in enumerate(new)}}
    out = [{**r, column: marks[r[column]]} if r.get(column) in marks else dict(r) for r in rows]
    return out, [f"Note {i + 1} ({counts[t]} rows): {t}" for i, t in enumerate(new)]


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
