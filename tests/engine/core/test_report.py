"""Result tables: one source for plain text, IPython's display and HTML."""

from __future__ import annotations

import importlib

from IPython.lib.pretty import pretty

import nbcompress as nc
from nbcompress.engine.core.report import Table, TableReport, fmt_pct
from tests.helpers import mlp


class _Report(TableReport):
    def _table(self) -> Table:
        rows = [{"layer": "fc1", "ratio": 0.5}, {"layer": "total", "ratio": 0.25}]
        return Table(rows, {"layer": None, "ratio": fmt_pct}, "Title <b>", ["a note"], [1])


def test_text_pretty_and_html_render_the_same_table():
    report = _Report()
    text = str(report)
    assert text.splitlines()[0] == "Title <b>"
    assert "50.0%" in text and text.endswith("a note")
    assert pretty(report) == text
    html = report._repr_html_()
    assert "Title &lt;b&gt;" in html and "a note" in html
    rows = html.split("<tr")
    assert "font-weight:bold" in rows[-1] and "total" in rows[-1]  # emphasis: the total row
    assert "font-weight:bold" not in rows[-2]


def test_summary_shows_its_table_in_ipython_not_the_dataclass_repr():
    model = mlp()
    result = nc.summary(model)
    assert pretty(result) == str(result)
    assert "Model summary" in pretty(result) and "Summary(rows=" not in pretty(result)


def test_no_report_class_shadows_the_table_display_with_its_own_repr():
    for name in (
        "core.compare",
        "core.summary",
        "quantize.report",
        "sensitivity.refine",
        "speedup.speedup",
        "sensitivity.staged",
        "sensitivity.allocate",
    ):
        importlib.import_module(f"nbcompress.engine.{name}")  # defines its report class
    classes = TableReport.__subclasses__()
    assert len(classes) >= 8
    for cls in classes:
        # A dataclass without repr=False would win over _repr_pretty_ in IPython.
        assert "__repr__" not in vars(cls), cls
