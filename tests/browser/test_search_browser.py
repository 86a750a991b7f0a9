"""The live view of ``%search`` in a real JupyterLab: plot, progress, Apply and Undo.

The notebook runs ``%search`` (NSGA-II, 40 trials, a few seconds) on a trained LeNet-300-100;
the test waits for the plot and the full progress bar, chooses a front point, applies it
and undoes it. Every assertion reads text the *kernel* wrote (the status line counts the
live model's nonzero parameters; a later cell prints them), so a frontend that merely
renders widgets cannot pass.
"""

from __future__ import annotations

import re

import pytest

# The explorer's browser test holds the page helpers (kernel connection, Run menu, one cell).
from test_explorer_browser import _open, _run_from_menu

pytestmark = pytest.mark.browser

NOTEBOOK = "search.ipynb"  # setup, `r = %search model ... --trials 40`, print the nonzero count
TRIALS = 40


def _counts(status: str) -> tuple[int, int]:
    """(now, was) from "... 1,234 nonzero parameters (was 5,678) ..."."""
    match = re.search(r"([\d,]+) nonzero parameters \(was ([\d,]+)\)", status)
    assert match, f"unexpected status: {status!r}"
    now, was = (int(g.replace(",", "")) for g in match.groups())
    return now, was


def _printed_nonzero(page, run: bool = True) -> int:
    """The count the last cell printed; with ``run``, after running it again (Ctrl+Enter)."""
    cell = page.locator(".jp-Notebook .jp-CodeCell").nth(2)
    prompt = cell.locator(".jp-InputPrompt")
    if run:
        before = prompt.inner_text()
        prompt.click()  # selects the cell, in command mode
        page.keyboard.press("Control+Enter")  # run it in place (no new cell below)
        # A new execution count: the cell ran again (its old output cannot pass for it).
        page.wait_for_function(
            "([el, old]) => /\\[[0-9]+\\]/.test(el.innerText) && el.innerText !== old",
            arg=[prompt.element_handle(), before],
        )
    output = cell.locator(".jp-OutputArea-output", has_text="nonzero now")
    output.wait_for()
    output = output.inner_text()
    match = re.search(r"nonzero now: ([\d,]+)", output)
    assert match, output
    return int(match.group(1).replace(",", ""))


def test_search_view_fills_in_then_applies_and_undoes_a_front_point(page, lab, shot) -> None:
    _open(page, lab, NOTEBOOK)
    _run_from_menu(page, "Run All Cells")
    view = page.locator(".nbc-search")
    status = view.locator(".nbc-search-status")
    progress = view.locator(".nbc-search-progress")
    view.wait_for(timeout=60_000)
    page.wait_for_function(
        "el => el.innerText.startsWith('search done')", arg=status.element_handle(), timeout=60_000
    )
    assert progress.inner_text().startswith(f"{TRIALS}/{TRIALS} trials · "), progress.inner_text()
    bar = view.locator(".widget-hprogress .progress-bar")
    page.wait_for_function("el => el.style.width === '100%'", arg=bar.element_handle())
    plot = view.locator("img.nbc-search-plot")
    assert plot.get_attribute("src")  # the kernel's PNG
    # Run All also ran the last cell: the dense model's count, as the kernel sees it.
    dense = _printed_nonzero(page, run=False)
    shot("search-view-done.png", view)

    # Choose the second front point; the kernel redraws with it ringed (a new image).
    select = view.locator(".widget-dropdown select")
    # ipywidgets writes the option labels with non-breaking spaces.
    options = [o.replace("\xa0", " ") for o in select.locator("option").all_inner_texts()]
    assert len(options) >= 2 and all(o.startswith("sparsity ") for o in options), options
    first_src = plot.get_attribute("src")
    select.select_option(index=1)
    page.wait_for_function(
        "([el, old]) => el.getAttribute('src') !== old", arg=[plot.element_handle(), first_src]
    )
    number = re.search(r"trial #(\d+)$", options[1]).group(1)
    sparsity = re.search(r"^sparsity ([\d.]+%)", options[1]).group(1)

    view.locator(".widget-button", has_text="Apply").click()
    page.wait_for_function("el => el.innerText.startsWith('applied')", arg=status.element_handle())
    text = status.inner_text()
    assert text.startswith(f"applied trial #{number} (sparsity {sparsity}, metric "), text
    assert text.endswith("Undo or %undo model reverts it"), text
    now, was = _counts(text)
    assert (was, now < was) == (dense, True), text
    shot("search-view-applied.png", view)
    assert _printed_nonzero(page) == now  # a later cell sees the pruned model

    # Apply again: refused, the model keeps its one step.
    view.locator(".widget-button", has_text="Apply").click()
    page.wait_for_function(
        "el => el.innerText.startsWith('not applied')", arg=status.element_handle()
    )
    assert f"trial #{number} is already applied; Undo first" in status.inner_text()

    view.locator(".widget-button", has_text="Undo").click()
    page.wait_for_function("el => el.innerText.startsWith('undone')", arg=status.element_handle())
    assert _counts(status.inner_text()) == (dense, now)
    assert _printed_nonzero(page) == dense
    shot("search-view-undone.png", view)
