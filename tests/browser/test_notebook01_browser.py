"""A new user's first run: example notebook 01 in a real JupyterLab, on a cold numba cache.

Run All on ``01_quickstart.ipynb`` exactly as shipped (copied into the lab's directory) in
a kernel whose ``NUMBA_CACHE_DIR`` is an empty directory (see ``conftest._lab_env``), then
read what the page rendered: no output in the stderr (pink) box and no error anywhere
except the one-line ``UsageError`` of the cell tagged ``raises-exception`` (the shown
mistake), and no table wider than its output area unless it sits in a horizontally
scrolling box that itself fits.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests.browser.conftest import REPO
from tests.browser.test_explorer_browser import _open, _run_from_menu

pytestmark = pytest.mark.browser

NOTEBOOK = "01_quickstart.ipynb"
SOURCE = REPO / "example_notebooks" / NOTEBOOK
STDERR = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'
ERROR = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"]'

# Every code cell has run: its prompt shows a number, none is waiting ([ ]) or busy ([*]).
ALL_RAN = """n => {
    const prompts = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')];
    return prompts.length === n && prompts.every(p => /\\[[0-9]+\\]/.test(p.innerText));
}"""

# Tables wider than their output area, unless inside a horizontally scrolling box that fits.
WIDE_TABLES = """() => {
    const found = [];
    for (const out of document.querySelectorAll('.jp-OutputArea-output')) {
        const room = out.getBoundingClientRect().width;
        for (const table of out.querySelectorAll('table')) {
            if (table.getBoundingClientRect().width <= room + 1) continue;
            let box = table.parentElement, scrolls = false;
            while (box && box !== out.parentElement) {
                const overflow = getComputedStyle(box).overflowX;
                const fits = box.getBoundingClientRect().width <= room + 1;
                scrolls = (overflow === 'auto' || overflow === 'scroll') && fits;
                if (scrolls) break;
                box = box.parentElement;
            }
            if (!scrolls) found.push({
                table: Math.round(table.getBoundingClientRect().width), room: Math.round(room),
                text: table.innerText.slice(0, 120),
            });
        }
        // Anything else spilling out of the output area (a long unbroken line, an image).
        const style = getComputedStyle(out).overflowX;
        if (out.scrollWidth > out.clientWidth + 1 && style !== 'auto' && style !== 'scroll') {
            found.push({output: out.scrollWidth, room: out.clientWidth,
                        text: out.innerText.slice(0, 120)});
        }
    }
    return found;
}"""


def _code_cells() -> list[dict]:
    cells = json.loads(SOURCE.read_text())["cells"]
    return [c for c in cells if c["cell_type"] == "code"]


def test_notebook01_runs_clean_on_a_cold_numba_cache(page, lab, shot) -> None:
    shutil.copy(SOURCE, lab.root / NOTEBOOK)
    cells = _code_cells()
    expected_errors = {
        i
        for i, c in enumerate(cells)
        if "raises-exception" in c.get("metadata", {}).get("tags", [])
    }
    _open(page, lab, NOTEBOOK)
    _run_from_menu(page, "Run All Cells")
    # Training, the compile of the sparse kernels on a cold cache, and every magic.
    page.wait_for_function(ALL_RAN, arg=len(cells), timeout=300_000)
    shot("notebook01-page.png")

    code = page.locator(".jp-Notebook .jp-CodeCell")
    noise, mistakes = [], []
    for i in range(code.count()):
        shown = code.nth(i).locator(f"{STDERR}, {ERROR}")
        texts = [shown.nth(k).inner_text().strip() for k in range(shown.count())]
        (mistakes if i in expected_errors else noise).append((i, texts))
    # No stderr (pink box) and no error anywhere but in the cell that shows a mistake.
    assert all(not texts for _, texts in noise), [n for n in noise if n[1]]
    for i, texts in mistakes:  # IPython shows a UsageError as one stderr line
        assert len(texts) == 1 and texts[0].startswith("UsageError: "), (i, texts)
        assert "\n" not in texts[0] and "Traceback" not in texts[0], (i, texts)
    assert page.locator(STDERR).count() == len(mistakes)  # the count over the whole page

    wide = page.evaluate(WIDE_TABLES)
    assert not wide, f"outputs wider than their output area: {wide}"
