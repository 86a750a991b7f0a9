"""The sensitivity explorer in a real JupyterLab: slider, Apply and Undo reach the kernel,
``%prune`` / ``%undo`` run in other cells reach the explorer, and its layout holds up:
every one of 20 sliders on the page without scrolling inside the widget, a long status
wrapped rather than cut, accuracy in percent, captions readable in the dark theme.

Every assertion reads text the *kernel* wrote into a widget (the model label counts the
live model's nonzero parameters), so a frontend that merely renders widgets cannot pass.
"""

from __future__ import annotations

import re

import pytest

try:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
except ImportError:  # the `browser` fixture skips, or fails under REQUIRE_BROWSER=1
    PlaywrightTimeout = TimeoutError

pytestmark = pytest.mark.browser

NOTEBOOK = "explorer.ipynb"
OUTSIDE = "explorer_outside.ipynb"  # setup, explorer, `%prune model 0.9`, `%undo model`
MANY = "explorer_many.ipynb"  # 20 layers in 10 groups, an accuracy-like metric


def _nonzero(text: str) -> int:
    match = re.search(r"model now: ([\d,]+) nonzero", text)
    assert match, f"unexpected model label: {text!r}"
    return int(match.group(1).replace(",", ""))


def _wait_kernel_connected(page, frames: list) -> None:
    # The "idle" indicator shows before the kernel's websocket is up; cells run then are
    # dropped and widgets created during a reconnect stay "Loading widget...". The first
    # frame the kernel sends (kernel_info reply) means the connection is really up.
    for _ in range(300):
        if frames:
            return
        page.wait_for_timeout(100)
    pytest.fail("the kernel's websocket never delivered a message")


def _open(page, lab, name: str) -> None:
    frames: list[object] = []

    def watch(ws) -> None:
        if "/channels" in ws.url:
            ws.on("framereceived", lambda payload: frames.append(payload))

    page.on("websocket", watch)
    page.goto(lab.notebook_url(name))
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell")
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']")
    _wait_kernel_connected(page, frames)
    # The lab settings start the kernel without asking; accept the dialog if one shows anyway.
    accept = page.locator(".jp-Dialog .jp-Dialog-button.jp-mod-accept")
    if accept.count():
        accept.first.click()


def _run_from_menu(page, item: str) -> None:
    # A run sent before the kernel's websocket is connected is silently dropped, and the
    # idle indicator shows before that; retry until the first code cell has started.
    prompt = page.locator(".jp-CodeCell .jp-InputPrompt").first
    for _ in range(6):
        page.locator(".lm-MenuBar-item", has_text="Run").first.click()
        page.locator(".lm-Menu-item", has_text=item).first.click()
        try:
            page.wait_for_function(
                "el => /\\[[0-9*]+\\]/.test(el.innerText)",
                arg=prompt.element_handle(),
                timeout=5_000,
            )
            return
        except PlaywrightTimeout:
            continue
    pytest.fail(f"Run → {item} never started the notebook")


def _open_and_run(page, lab) -> None:
    _open(page, lab, NOTEBOOK)
    _run_from_menu(page, "Run All Cells")


def test_slider_apply_undo_change_the_kernel_model(page, lab, shot) -> None:
    _open_and_run(page, lab)
    label = page.locator(".nbc-model")
    label.wait_for(timeout=60_000)
    dense = _nonzero(label.inner_text())
    status = page.locator(".nbc-status")
    readout = page.locator(".nbc-readout")
    shot("explorer-loaded.png", page.locator(".nbc-explorer"))

    # Move the first layer's slider with the keyboard, as a user would. One key at a time,
    # each awaited in the kernel-written readout: ipywidgets holds back state updates while
    # one is in flight, and a button click can overtake them.
    slider = page.locator(".nbc-explorer .widget-slider").first
    before_value = slider.locator(".widget-readout").inner_text()
    slider.locator(".noUi-handle").focus()
    for _ in range(3):
        old = readout.inner_text()
        page.keyboard.press("ArrowRight")
        page.wait_for_function(
            "([el, old]) => el.innerText !== old", arg=[readout.element_handle(), old]
        )
    assert slider.locator(".widget-readout").inner_text() != before_value
    shown = re.search(r"sparsity\s+([\d.]+%)", readout.inner_text()).group(1)

    page.locator(".nbc-explorer .widget-button", has_text="Apply").click()
    page.wait_for_function("el => el.innerText.startsWith('applied')", arg=status.element_handle())
    pruned = _nonzero(label.inner_text())
    assert pruned < dense, (dense, pruned)
    assert f"{pruned:,} nonzero" in status.inner_text()
    # What was applied is the setting the readout showed, not a stale one.
    assert status.inner_text().startswith(f"applied: {shown} sparsity"), (shown, status)
    shot("explorer-applied.png", page.locator(".nbc-explorer"))

    page.locator(".nbc-explorer .widget-button", has_text="Undo").click()
    page.wait_for_function("el => el.innerText.startsWith('undone')", arg=status.element_handle())
    assert _nonzero(label.inner_text()) == dense
    shot("explorer-undone.png")


def _run_cell(page, index: int) -> None:
    """Run code cell ``index`` as a user does: select it, then Shift+Enter."""
    cell = page.locator(".jp-Notebook .jp-CodeCell").nth(index)
    cell.locator(".jp-InputPrompt").click()  # selects the cell, in command mode
    page.keyboard.press("Shift+Enter")
    page.wait_for_function(
        "el => /\\[[0-9]+\\]/.test(el.innerText)",
        arg=cell.locator(".jp-InputPrompt").element_handle(),
        timeout=60_000,
    )


def test_prune_and_undo_in_other_cells_reach_the_explorer(page, lab, shot) -> None:
    _open(page, lab, OUTSIDE)
    # Select the `%prune` cell, then run the setup and explorer cells above it.
    page.locator(".jp-Notebook .jp-CodeCell").nth(2).locator(".jp-InputPrompt").click()
    _run_from_menu(page, "Run All Above Selected Cell")
    label = page.locator(".nbc-model")
    label.wait_for(timeout=60_000)
    warning = page.locator(".nbc-warning")
    dense = _nonzero(label.inner_text())
    assert warning.is_hidden()  # the model is the swept one

    _run_cell(page, 2)  # %prune model 0.9
    page.wait_for_function(
        "([el, dense]) => !el.innerText.includes(dense)",
        arg=[label.element_handle(), f"model now: {dense:,} nonzero"],
    )
    pruned = _nonzero(label.inner_text())
    assert pruned < dense, (dense, pruned)
    warning.wait_for(state="visible")
    text = warning.inner_text()
    assert "the model changed since the sweep (a prune step in another cell" in text, text
    assert "predictions are for the swept model; re-run %sensitivity" in text, text
    assert "now 90.0%" in page.locator(".nbc-explorer").inner_text()
    shot("explorer-outside-prune.png", page.locator(".nbc-explorer"))

    _run_cell(page, 3)  # %undo model
    page.wait_for_function(
        "([el, dense]) => el.innerText.includes(dense)",
        arg=[label.element_handle(), f"model now: {dense:,} nonzero"],
    )
    warning.wait_for(state="hidden")
    shot("explorer-outside-undo.png", page.locator(".nbc-explorer"))


# Slider rows whose box between them and the explorer scrolls on its own (a nested scroll).
_NESTED_SCROLL = """
els => els.filter(el => {
  for (let p = el.parentElement; p && !p.classList.contains('nbc-explorer'); p = p.parentElement) {
    const overflow = getComputedStyle(p).overflowY;
    if ((overflow === 'auto' || overflow === 'scroll') && p.scrollHeight > p.clientHeight + 1)
      return true;
  }
  return false;
}).length
"""

# WCAG contrast of an element's text against the first opaque background behind it.
_CONTRAST = """
el => {
  const rgba = s => (s.match(/[\\d.]+/g) || []).map(Number);
  let [r, g, b, a] = rgba(getComputedStyle(el).color);
  let bg = null;
  for (let p = el; p && !bg; p = p.parentElement) {
    const c = rgba(getComputedStyle(p).backgroundColor);
    if (c.length === 3 || (c.length === 4 && c[3] > 0.99)) bg = c;
  }
  bg = bg || [255, 255, 255];
  if (a === undefined) a = 1;
  const mix = [r, g, b].map((v, i) => a * v + (1 - a) * bg[i]);
  const lum = c => {
    const [R, G, B] = c.slice(0, 3).map(v => {
      v /= 255;
      return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4);
    });
    return 0.2126 * R + 0.7152 * G + 0.0722 * B;
  };
  const [hi, lo] = [lum(mix), lum(bg)].sort((x, y) => y - x);
  return (hi + 0.05) / (lo + 0.05);
}
"""


def _set_theme(page, name: str) -> None:
    page.locator(".lm-MenuBar-item", has_text="Settings").first.click()
    page.locator(".lm-Menu-item", has_text="Theme").first.hover()
    page.locator(".lm-Menu-item", has_text=name).first.click()
    light = "false" if "Dark" in name else "true"
    page.wait_for_selector(f"body[data-jp-theme-light='{light}']", state="attached")


def test_twenty_sliders_are_on_the_page_and_the_text_reads_well(page, lab, shot) -> None:
    _open(page, lab, MANY)
    _run_from_menu(page, "Run All Cells")
    label = page.locator(".nbc-model")
    label.wait_for(timeout=60_000)
    explorer = page.locator(".nbc-explorer")
    readout, status = page.locator(".nbc-readout"), page.locator(".nbc-status")

    # Every slider is shown (no folded accordion page), none behind a scroll of its own.
    sliders = explorer.locator(".widget-slider")
    assert sliders.count() == 20
    assert all(sliders.nth(i).is_visible() for i in range(20))
    assert sliders.evaluate_all(_NESTED_SCROLL) == 0
    sliders.last.scroll_into_view_if_needed()
    shot("explorer-many.png", explorer)

    # The filter leaves only the matching block's sliders; cleared, all come back.
    box = explorer.locator("input[placeholder^='type part of a layer name']")
    box.fill("3.")
    page.wait_for_function(
        "el => [...el.querySelectorAll('.widget-slider')].filter(s => s.offsetParent).length === 2",
        arg=explorer.element_handle(),
    )
    box.fill("")
    page.wait_for_function(
        "el => [...el.querySelectorAll('.widget-slider')].filter(s => s.offsetParent).length"
        " === 20",
        arg=explorer.element_handle(),
    )

    # An accuracy reads as the notebooks print it: 94.67%, −1.33 pts.
    text = readout.inner_text()
    assert re.search(r"\d+\.\d\d%\s+[−+]\d+\.\d\d pts vs baseline 100\.00%", text), text

    # A hand-set slider replaced by the other target says so.
    handle = sliders.last.locator(".noUi-handle")  # at 0%: it can move right
    handle.focus()
    old = readout.inner_text()
    page.keyboard.press("ArrowRight")
    page.wait_for_function(
        "([el, old]) => el.innerText !== old", arg=[readout.element_handle(), old]
    )
    explorer.locator(".widget-toggle-button", has_text="max drop").click()
    page.wait_for_function(
        "el => el.innerText.includes('It replaced the slider(s) you had set')",
        arg=status.element_handle(),
    )

    # A long status wraps inside the widget instead of being cut at its right edge.
    page.set_viewport_size({"width": 900, "height": 1000})
    explorer.locator(".widget-button", has_text="Undo").click()
    page.wait_for_function(
        "el => el.innerText.startsWith('nothing undone')", arg=status.element_handle()
    )
    clipped = status.evaluate("el => el.scrollWidth - el.clientWidth")
    assert clipped <= 1, (clipped, status.inner_text())
    assert status.bounding_box()["height"] > 30  # more than one line: it wrapped
    edge = explorer.bounding_box()
    box = status.bounding_box()
    assert box["x"] + box["width"] <= edge["x"] + edge["width"] + 1
    shot("explorer-many-status.png", explorer)

    # Captions and layer notes stay readable on a dark background (WCAG AA: 4.5:1).
    _set_theme(page, "JupyterLab Dark")
    try:
        captions = [
            readout.locator("div[style*='font-size:85%']").first,
            readout.locator("div[style*='font-size:80%']").first,
            explorer.locator(".widget-html span[title^='weights in']").first,
            status,
        ]
        for caption in captions:
            ratio = caption.evaluate(_CONTRAST)
            assert ratio >= 4.5, (caption.inner_text(), ratio)
        shot("explorer-many-dark.png", explorer)
    finally:
        _set_theme(page, "JupyterLab Light")
