"""How result tables render in a notebook and a terminal (issue 16, "a clean first run").

HTML is checked for the structure a browser needs (the caption outside the table, a
scrolling box, no wrap inside a number and its unit), rendered through a real IPython
InteractiveShell's display formatter where a magic is involved.
"""

import re

import pytest
import torch
from torch import nn

from nbcompress.engine.core.report import footnote_repeats, html_table, text_table


def html_of(shell, obj):
    """What a notebook frontend gets: the shell's HTML formatter (off in a terminal shell)."""
    formatter = shell.display_formatter.formatters["text/html"]
    enabled, formatter.enabled = formatter.enabled, True
    try:
        return formatter(obj)
    finally:
        formatter.enabled = enabled


def cells(page):
    return re.findall(r"<td[^>]*>.*?</td>", page)


def test_caption_sits_above_the_table_so_a_narrow_table_does_not_squeeze_it():
    page = html_table([{"layer": "fc1", "ratio": 0.5}], caption="A long caption " * 8)
    assert "<caption" not in page
    caption = page.index("nbcompress-caption")
    assert caption < page.index("<table>")
    # The caption is a block outside the table: its width is the output area's.
    assert page.index("</div>", caption) < page.index("<table>")


def test_wide_tables_scroll_inside_the_output_area():
    rows = [{f"column {i}": 123456.789 for i in range(30)}]
    page = html_table(rows, caption="wide")
    box = re.search(r"<div class='nbcompress-scroll' style='([^']*)'><table>", page)
    assert box is not None
    assert "overflow-x:auto" in box.group(1) and "max-width:100%" in box.group(1)


@pytest.mark.parametrize(
    "text", ["146.0 KiB", "78.2 µs", "3.6e-07", "sparse fp32", "— (kept float)"]
)
def test_a_number_and_its_unit_never_wrap_apart(text):
    (cell,) = cells(html_table([{"value": text}]))
    assert "white-space:nowrap" in cell and text in cell


def test_in_long_text_numbers_keep_their_units_and_exponents():
    note = "dense 78.2 µs against sparse 146.0 KiB at threshold 3.6e-07, so kept as it was"
    (cell,) = cells(html_table([{"note": note}]))
    assert 'style="text-align:left"' in cell  # long text may wrap between words…
    spans = re.findall(r'<span style="white-space:nowrap">([^<]*)</span>', cell)
    assert spans == ["78.2 µs", "146.0 KiB", "3.6e-07"]  # …never inside these


def test_caption_and_notes_use_theme_colours():
    page = html_table([{"a": 1}], caption="title", notes=["a note"])
    caption = re.search(r"nbcompress-caption' style='([^']*)'", page).group(1)
    note = re.search(r"nbcompress-note' style='([^']*)'", page).group(1)
    assert "var(--jp-content-font-color1" in caption
    assert "var(--jp-content-font-color2" in note and "#" not in note


def test_a_note_repeated_on_many_rows_is_shown_once_with_a_count():
    rows = [{"layer": f"conv{i}", "note": "no Conv kernel"} for i in range(20)]
    rows.append({"layer": "fc", "note": ""})
    shown, notes = footnote_repeats(rows, "note")
    assert notes == ["Note 1 (20 rows): no Conv kernel"]
    assert {r["note"] for r in shown} == {"see note 1", ""}
    assert rows[0]["note"] == "no Conv kernel"  # the caller's rows are not changed
    assert footnote_repeats(rows[:2], "note") == (rows[:2], [])
    shown, notes = footnote_repeats(rows, "note", notes=["Left in float: conv (no Conv kernel)."])
    assert notes == [] and shown[0]["note"] == "see the notes"  # said once already


def test_a_backend_warning_is_never_cut_mid_word():
    import warnings

    from nbcompress.engine.quantize.backends import quiet

    with quiet({}) as seen:
        warnings.warn("deprecated " + "word " * 60 + "end", UserWarning, stacklevel=1)
    (message,) = seen
    assert message.endswith("word …") and len(message) <= 160


def test_text_table_header_and_rule_do_not_run_past_a_long_last_column():
    text = text_table([{"step": 1, "detail": "x" * 200}])
    header, rule, _ = text.splitlines()
    assert header == "step  detail" and len(rule) < 60


class ThreeConvs(nn.Sequential):
    def __init__(self):
        super().__init__(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.Flatten(),
            nn.Linear(4 * 6 * 6, 10),
        )


def test_quantize_dynamic_shows_the_conv_note_once(shell):
    shell.user_ns.update(model=ThreeConvs().eval(), x=torch.rand(2, 1, 6, 6))
    report = shell.run_line_magic("quantize", "model int8 --input x --repeats 2")
    assert len(report.skipped) == 3  # the data keeps each layer's reason
    page = html_of(shell, report)
    # Once, in the "Left in float" note; the three rows point there.
    assert page.count("no Conv kernel") == 1 and page.count("see the notes") == 3
    assert str(report).count("no Conv kernel") == 1


def test_summary_in_a_notebook_scrolls_and_keeps_units(shell):
    shell.user_ns.update(model=ThreeConvs().eval(), x=torch.rand(2, 1, 6, 6))
    page = html_of(shell, shell.run_line_magic("summary", "model --input x"))
    assert "overflow-x:auto" in page
    sized = [c for c in cells(page) if re.search(r"\d (B|KiB|µs|ms)<", c)]
    assert sized and all("white-space:nowrap" in c for c in sized)


def test_empty_history_says_nothing_to_undo(shell):
    shell.user_ns.update(model=ThreeConvs())
    listed = shell.run_line_magic("undo", "model --list")
    page = html_of(shell, listed)
    assert "nothing to undo" in page and "<table" not in page
    assert "nothing to undo" in str(listed)


def test_history_header_is_in_words_and_the_terminal_listing_is_a_table(shell, capsys):
    shell.user_ns.update(model=ThreeConvs())
    shell.run_line_magic("prune", "model 0.5")
    capsys.readouterr()
    shell.run_cell("%undo model --list")  # as in a terminal: IPython's plain-text display
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("step"))
    assert lines[header].split()[:4] == ["step", "operation", "undo", "memory"]
    assert set(lines[header + 1]) <= {"-", " "}
    assert lines[header + 2].split()[:2] == ["1", "prune"]
    page = html_of(shell, shell.run_line_magic("undo", "model --list"))
    assert "<th>undo memory</th>" in page and "undo_bytes" not in page


def test_finetune_result_renders_as_the_shared_table():
    from IPython.lib.pretty import pretty

    from nbcompress.engine.schedule.finetune_result import FinetuneResult

    r = FinetuneResult(
        loss=[0.5], metric=[0.9], sparsity=[0.5], seconds=[1.2], steps=4, epochs=1,
        metric_name="accuracy",
    )  # fmt: skip
    page = r._repr_html_()
    assert "nbcompress-caption" in page and "overflow-x:auto" in page
    assert pretty(r) == str(r) and str(r).splitlines()[0] == "finetune: 1/1 epochs, 4 steps"
