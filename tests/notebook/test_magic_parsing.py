"""Issue 16, item 3: every magic's line, help and mistakes through one shared parser.

``%magic?`` reads as plain text (no reST), a Python expression with spaces inside brackets
is one value (``--input torch.randn(2, 3, 28, 28)``), argparse's complaints become one line
that names the fix, and a magic that changed the model says so even mid-cell.
"""

import re

import pytest
import torch
from IPython.core.error import UsageError

import nbcompress as nc
from nbcompress.engine.core.summary import Summary
from nbcompress.notebook.magics._parsing import WIDTH, split_line
from tests.helpers import assert_same_state, cnn, mlp, snapshot, zero_fraction

NAMES = ["summary", "prune", "undo", "sensitivity", "quantize", "speedup", "factorize"]
NAMES += ["finetune", "search"]


@pytest.fixture
def ns(shell):
    shell.user_ns.update(model=mlp(), conv=cnn(), x=torch.randn(4, 16), torch=torch)
    return shell


def magic(shell, line):
    name, _, rest = line.partition(" ")
    return shell.run_line_magic(name, rest)


# ----------------------------------------------------------------------- help
@pytest.mark.parametrize("name", NAMES)
def test_help_is_plain_text_without_rest_markup(ns, name):
    # What the notebook pager and a terminal show for `%name?`.
    text = ns.object_inspect_mime(f"%{name}")["text/plain"]
    doc = ns.find_line_magic(name).__doc__
    assert doc in re.sub(r"\x1b\[[0-9;]*m", "", text)
    for markup in ("::", "``", ":class:", ":func:", "usage: %"):
        assert markup not in doc, (name, markup)
    assert f"\n\nUsage: %{name} model" in doc
    # The summary line first: %quickref and IPython's one-line listings show it.
    assert not doc.startswith(("::", "usage", "%"))
    assert "Options:\n" in doc
    # Wrapped at the help's width, not argparse's 80-column table; long words excepted.
    assert all(len(line) <= WIDTH or " " not in line.strip() for line in doc.splitlines())


def test_prune_help_lists_examples_one_a_line_with_their_comment_indented(ns):
    doc = ns.find_line_magic("prune").__doc__
    assert "\nExamples:\n  %prune model 0.5\n  %prune model 0.8 --scope global\n" in doc
    assert "\n  %prune model 0.3 --remove --input x --round-to 8\n      physically removes" in doc
    # Each option on its line, its help indented under it; metavars named after the option.
    assert "\n  --eval EVAL\n      With --suggested: metric function to measure.\n" in doc
    assert "\n  -i, --input INPUT\n" in doc
    assert "Always returns a Comparison of the model" in " ".join(doc.split())


def test_a_magic_without_an_example_list_keeps_its_prose(ns):
    doc = ns.find_line_magic("speedup").__doc__
    assert "Example: %speedup model --input x times every layer" in doc


# ----------------------------------------------------------------------- splitting
@pytest.mark.parametrize(
    "line, words",
    [
        (
            "model --input torch.randn(2, 3, 28, 28)",
            ["model", "--input", "torch.randn(2, 3, 28, 28)"],
        ),
        ("m {'a': 0.5, 'b': [1, 2]} --seed 0", ["m", "{'a': 0.5, 'b': [1, 2]}", "--seed", "0"]),
        ('m --layers "a(, b" --input f( x )', ["m", "--layers", '"a(, b"', "--input", "f( x )"]),
        ("m --input=t(1, 2)", ["m", "--input=t(1, 2)"]),
        ("m --input f(1,", ["m", "--input", "f(1,"]),
        ("m 0.5", ["m", "0.5"]),
    ],
)
def test_split_line_keeps_bracketed_expressions_whole(line, words):
    assert split_line(line) == words


def test_input_with_spaces_inside_brackets_works(ns):
    s = magic(ns, "summary conv --input torch.randn(2, 1, 8, 8) --repeats 1")
    assert isinstance(s, Summary) and s.layer("0")["output"] == (2, 8, 6, 6)


def test_per_layer_amounts_with_spaces_work(ns):
    model = ns.user_ns["model"]
    magic(ns, "prune model {'0': 0.5, '2': 0.25}")
    assert zero_fraction(model[0].weight) == pytest.approx(0.5, abs=0.02)
    assert zero_fraction(model[2].weight) == pytest.approx(0.25, abs=0.02)


def test_an_expression_with_spaces_in_brackets_is_one_value(ns):
    ns.user_ns["acc"] = lambda m: 0.75
    result = magic(ns, "sensitivity model --eval (lambda m: acc(m)) --ratios 0.5 --no-widget")
    assert result.baseline == 0.75
    with pytest.raises(UsageError, match=r"brackets around an expression, e\.g\. --eval \("):
        magic(ns, "sensitivity model --eval lambda m: acc(m)")


def test_an_unclosed_bracket_is_one_line_about_the_expression(ns):
    saved = snapshot(ns.user_ns["conv"])
    with pytest.raises(UsageError, match=r"^--input: evaluating 'torch.randn\(2, 1,' failed"):
        magic(ns, "summary conv --input torch.randn(2, 1,")
    assert_same_state(ns.user_ns["conv"], saved)


# ----------------------------------------------------------------------- mistakes
@pytest.mark.parametrize(
    "line, message",
    [
        (
            "prune model 0.5 --typo-flag",
            r"^--typo-flag: %prune has no such option; see %prune\? for the options\.$",
        ),
        (
            "prune model 0.5 --seeed 1",
            r"^--seeed: %prune has no such option; did you mean --seed\? See %prune\?",
        ),
        (
            "quantize model int8 --per-tensr",
            r"^--per-tensr: %quantize has no such option; did you mean --per-tensor\?",
        ),
        ("summary", r"^model: missing; name the model, e.g\. %summary model --input x\.$"),
        ("undo", r"^model: missing; name the model, e.g\. %undo model"),
        (
            "prune model 0.5 --input",
            r"^--input: its value is missing, e\.g\. --input x; see %prune\?",
        ),
        ("prune model 0.5 -i", r"^--input: its value is missing"),
        (
            "prune model 0.5 --re",
            r"^--re: could be --reconstruct, --remove-masks, --remove; write the option out",
        ),
        (
            "summary model --input x 3",
            r"^'3': an extra argument %summary does not take \(usage: %summary model \[options\]\)",
        ),
        ('prune model 0.5 --layers "features.*', r"^the line has a quote that is not closed"),
        ("prune model 0.5 --min-density 2", r"^--min-density: 2.0 must be in \[0, 1\]"),
    ],
)
def test_argparse_mistakes_are_one_line_with_the_fix(ns, line, message):
    saved = snapshot(ns.user_ns["model"])
    with pytest.raises(UsageError, match=message) as caught:
        magic(ns, line)
    text = str(caught.value)
    assert "\n" not in text and "unrecognized arguments" not in text
    assert not text.startswith(("argument ", "the following")), text
    assert_same_state(ns.user_ns["model"], saved)
    assert len(nc.history(ns.user_ns["model"])) == 0


def test_a_mistake_shows_as_one_usage_error_line_in_a_cell(ns, capsys):
    ns.run_cell("%summary")
    out = capsys.readouterr()
    text = out.out + out.err
    assert "UsageError: model: missing; name the model" in text and "Traceback" not in text


# ----------------------------------------------------------------------- one line mid-cell
def test_prune_mid_cell_prints_one_line_with_what_it_did_and_the_undo(ns, capsys):
    ns.run_cell("%prune model 0.5\ny = 1")
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("model: prune")]
    assert len(lines) == 1, out
    assert "50% l1 element (layer scope) on 2 layer(s); output layer 4 left alone" in lines[0]
    assert lines[0].endswith("(%undo model reverts it)")


def test_every_mutating_magic_says_what_it_did_and_undo_says_it_once(ns, capsys):
    ns.run_cell("%quantize model int8 --input x --repeats 1\ny = 1")
    out = capsys.readouterr().out
    assert "model: quantize int8 dynamic" in out and "(%undo model reverts it)" in out
    ns.run_cell("%undo model\ny = 1")
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("Undid 'quantize'"), out


def test_a_magic_that_changes_nothing_or_fails_prints_no_such_line(ns, capsys):
    ns.run_cell("%summary model --input x --repeats 1\ny = 1")
    ns.run_cell("%prune model 1.5\ny = 1")
    assert "reverts it" not in capsys.readouterr().out
